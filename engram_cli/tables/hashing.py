"""The N-gram hash: every suffix N-gram's slot in every head of an Engram layer (the one
implementation the model, build-tables, eval and inspect-gates use), with its plain reference.

Engram (DeepSeek, "Conditional Memory via Scalable Lookup", arXiv 2601.07372, Section 2.2) gives
every Engram layer one embedding table per (N-gram order, hash head). At position t the suffix
N-gram of order n (the canonical ids of tokens t-n+1 .. t) is mixed into one 64-bit integer and
each head reduces that integer modulo its own prime table size (:mod:`engram_cli.tables.plan`).
Different primes per head make two N-grams that collide in one head unlikely to collide in the
others. As in the reference: ``mix_n(t) = XOR_k (id[t-k] * m_k)`` for k = 0..n-1 in wrap-around
int64, positions before the start of a sequence read the canonical pad id; head j's slot is
``mix_n(t) mod p_j`` in [0, p_j) (floor modulo). Heads are laid out order 2 first, then order 3, ...

The fast NumPy path (:mod:`engram_cli.tables.kernels`) works on cache-sized chunks of the flattened
token stream, writes straight into the preallocated output and replaces NumPy's slow 64-bit ``%``
(a scalar division loop) by ``x - (x // p) * p``, whose ``//`` by a scalar is vectorized by NumPy;
both are exact integer arithmetic, so no exactness argument is needed.
``benchmarks/bench_hashing.py`` compares it with :func:`hash_ngrams_reference`;
``docs/hashing.md`` has the figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engram_cli.core.errors import InputError
from engram_cli.tables.boundary import document_mask_reference, restart_after_separators
from engram_cli.tables.kernels import hash_array, hash_torch
from engram_cli.tables.plan import TablePlan


def hash_ngrams(canonical_ids: Any, plan: TablePlan, layer_id: int, *,
                num_threads: int | None = None) -> Any:
    """Slot of every suffix N-gram in every head of one Engram layer.

    canonical_ids: canonical token ids, [B, T] (B sequences) or [T] (one sequence), as a NumPy
        integer array or a torch integer tensor on any device. Each row is a sequence: positions
        before its start read ``plan.canonical_pad_id``; under the plan's ``document`` boundary
        rule so do positions before the start of a document (after a separator; see
        ``engram_cli.tables.boundary``). Ids are not range-checked; ids outside
        [0, V) are hashed with the same wrap-around int64 arithmetic as the reference.
    layer_id: one of ``plan.layer_ids`` (each layer has its own multipliers and primes).
    num_threads: worker threads of the NumPy path (None: up to 4, one per 2 chunks of 32768
        tokens, never more than the CPUs available; 1: hash in the calling thread).

    Returns int64 slots of shape ``canonical_ids.shape + (plan.total_heads,)``, the same kind as
    the input (NumPy array, or torch tensor on the input's device). Head h's slot is in
    [0, head_sizes(layer_id)[h]); add ``head_offsets`` to index one concatenated table.
    """
    mults = plan.multipliers[plan.checked_layer(layer_id)]
    primes = plan.primes[layer_id]
    if _is_torch(canonical_ids):
        import torch  # lazy: torch is loaded only where tensors are given; build-tables and normalize-vocab never need it

        x = canonical_ids
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise InputError(f"token ids must be integers, got a {x.dtype} tensor")
        if x.dim() not in (1, 2):
            raise InputError(f"token ids must be [T] or [B, T], got shape {tuple(x.shape)}")
        if x.device.type != "cpu":
            sep = plan.canonical_separator_id if plan.restarts else None
            return hash_torch(x.long(), mults, primes, plan.canonical_pad_id, sep)
        return torch.from_numpy(_hash_numpy_ids(x.detach().long().numpy(), plan, mults, primes, num_threads))
    x = np.asarray(canonical_ids)
    if x.dtype.kind not in "iu":
        raise InputError(f"token ids must be integers, got dtype {x.dtype}")
    if x.ndim not in (1, 2):
        raise InputError(f"token ids must be [T] or [B, T], got shape {x.shape}")
    return _hash_numpy_ids(x, plan, mults, primes, num_threads)


def _hash_numpy_ids(x: np.ndarray, plan: TablePlan, mults, primes, num_threads: int | None) -> np.ndarray:
    """The NumPy path: the fast kernel, then (document rule) every document restarted."""
    out = hash_array(x, mults, primes, plan.canonical_pad_id, num_threads)
    if plan.restarts and x.size:
        ids2 = x.reshape(1, -1) if x.ndim == 1 else x
        restart_after_separators(ids2, out.reshape(*ids2.shape, -1), plan.canonical_separator_id,
                                 plan.max_ngram_size - 1,
                                 lambda w: hash_array(w, mults, primes, plan.canonical_pad_id, 1))
    return out


def hash_ngrams_reference(canonical_ids: np.ndarray, plan: TablePlan, layer_id: int) -> np.ndarray:
    """The plain reference of :func:`hash_ngrams`: the reference algorithm written the obvious way.

    Pad-shift the [B, T] ids right by k = 1..N-1 positions (filling with the canonical pad id),
    XOR the id * multiplier products of each suffix n-gram, take ``%`` of every head's prime, and
    stack the heads. Under the document rule (``plan.boundary``) an id before the start of the
    position's document (after a separator) reads the pad id as well. Slow and memory-hungry (N-1 shifted copies), but easy to check line by line
    against the reference; the tests and ``benchmarks/bench_hashing.py`` compare the fast path
    with it bit for bit.
    """
    ids = np.asarray(canonical_ids, dtype=np.int64)
    ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
    T = ids.shape[1]
    mults = plan.multipliers[plan.checked_layer(layer_id)]
    shifted = [ids] + [np.pad(ids, ((0, 0), (k, 0)), constant_values=plan.canonical_pad_id)[:, :T]
                       for k in range(1, plan.max_ngram_size)]
    if plan.restarts:  # the document rule: ids before the document's start read the pad id too
        shifted = [ids] + [np.where(document_mask_reference(ids, plan.canonical_separator_id, k), s,
                                    plan.canonical_pad_id) for k, s in enumerate(shifted[1:], start=1)]
    heads = []
    for n in range(2, plan.max_ngram_size + 1):
        mix = shifted[0] * np.int64(mults[0])
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifted[k] * np.int64(mults[k]))
        heads += [mix % np.int64(p) for p in plan.primes[layer_id][n - 2]]
    out = np.stack(heads, axis=2)                    # (B, T, H)
    return out.reshape(*np.shape(canonical_ids), out.shape[2])


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")
