"""The fast paths behind :func:`engram_cli.tables.hashing.hash_ngrams`: a chunked, multithreaded NumPy
kernel and a torch kernel for tensors on a device. Both compute exactly the reference formula
(``engram_cli.tables.hashing.hash_ngrams_reference``, kept beside ``hash_ngrams``; the tests and
``benchmarks/bench_hashing.py`` compare them bit for bit). Measured speed: docs/hashing.md.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from engram_cli.tables.boundary import torch_document_mask

_CHUNK = 32768             # tokens per work chunk: amortizes ~60 NumPy calls; buffers stay in L3


_MAX_AUTO_THREADS = 4      # default thread cap for hash_ngrams (memory bandwidth saturates)


def _wrap64(x: int) -> int:
    """Python int -> the int64 value with the same low 64 bits (two's complement wrap-around)."""
    return ((x + 2**63) % 2**64) - 2**63


def hash_array(x: np.ndarray, mults: tuple[int, ...], primes: tuple[tuple[int, ...], ...],
                pad: int, num_threads: int | None) -> np.ndarray:
    """NumPy entry: [T] or [B, T] integer ids -> [..., total_heads] int64 slots."""
    shape = x.shape
    x2 = x.reshape(1, -1) if x.ndim == 1 else x
    B, T = x2.shape
    n_heads = sum(len(o) for o in primes)
    out = np.empty((B * T, n_heads), dtype=np.int64)        # (B*T, H)
    if B * T:
        flat = np.ascontiguousarray(x2, dtype=np.int64).reshape(-1)   # (B*T,)
        _hash_numpy(flat, T, mults, primes, pad, out, num_threads)
    return out.reshape(*shape, n_heads)


def _hash_numpy(flat: np.ndarray, T: int, mults: tuple[int, ...], primes: tuple[tuple[int, ...], ...],
                pad: int, out: np.ndarray, num_threads: int | None = None) -> None:
    """Fill ``out`` (B*T, H) with the slots of the flattened ids ``flat`` (B*T,) of rows of length T.

    Chunks of the flattened stream are independent (each reads up to N-1 ids to its left), so a
    few threads take chunks from a shared counter; NumPy releases the GIL inside its loops. On the
    2-core development machine two threads are ~1.35x faster than one (docs/hashing.md).
    """
    n_chunks = -(-flat.shape[0] // _CHUNK)
    if num_threads is None:
        num_threads = min(_MAX_AUTO_THREADS, available_cpus(), n_chunks // 2)
    num_threads = max(1, min(num_threads, n_chunks))
    next_chunk = itertools.count().__next__  # atomic under the GIL: threads never share a chunk
    if num_threads == 1:
        _hash_worker(flat, T, mults, primes, pad, out, next_chunk)
        return
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        futures = [pool.submit(_hash_worker, flat, T, mults, primes, pad, out, next_chunk)
                   for _ in range(num_threads)]
        for f in futures:
            f.result()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _hash_worker(flat: np.ndarray, T: int, mults: tuple[int, ...], primes: tuple[tuple[int, ...], ...],
                 pad: int, out: np.ndarray, next_chunk: Callable[[], int]) -> None:
    """Hash chunks [i*C, (i+1)*C) for i = next_chunk() until the stream is done."""
    N = flat.shape[0]
    C = min(_CHUNK, N)
    n_heads = out.shape[1]
    mix = np.empty(C, dtype=np.int64)                 # (C,) mix of the current order
    lag = np.empty(C, dtype=np.int64)                 # (C,) id[t-k] * m_k
    slots = np.empty((n_heads, C), dtype=np.int64)    # (H, C) head-major: vectorized per head
    m64 = [np.int64(m) for m in mults]
    pad_m = [np.int64(_wrap64(pad * m)) for m in mults]   # what a pad position contributes per lag
    # per order: (head row, divisor) pairs; unsigned and signed flavours of the same numbers
    heads_u, heads_i, h = [], [], 0
    for order in primes:
        heads_u.append([(slots[h + j].view(np.uint64), np.uint64(p)) for j, p in enumerate(order)])
        heads_i.append([(slots[h + j], np.int64(p)) for j, p in enumerate(order)])
        h += len(order)

    while (s := next_chunk() * C) < N:
        e = min(N, s + C)
        n = e - s
        mx, lg = mix[:n], lag[:n]
        np.multiply(flat[s:e], m64[0], out=mx)
        # positions t < k of a row read the pad id k back; only chunks near a row start have them
        first_row = (s // T) * T
        near_start = s - first_row < len(mults) - 1 or first_row + T < e
        row_starts = np.arange(first_row - s, n, T) if near_start else None  # relative to s
        for k in range(1, len(mults)):
            a = max(s, k)  # positions before k have no id k back in the flat stream (they are pads)
            if a < e:
                np.multiply(flat[a - k:e - k], m64[k], out=lg[a - s:])
            for j in range(min(k, T) if near_start else 0):
                idx = row_starts + j
                lg[idx[(idx >= 0) & (idx < n)]] = pad_m[k]
            np.bitwise_xor(mx, lg, out=mx)
            # order k+1 is complete: reduce it modulo each of its heads' primes as
            # x mod p = x - (x // p) * p, exact; NumPy vectorizes // by a scalar but not %.
            # Unsigned // is faster still and equals floor division when no mix is negative
            # (always so for ids in [0, V): every id * m_k is below 2^63).
            if mx.min() >= 0:
                src, heads = mx.view(np.uint64), heads_u[k - 1]
            else:
                src, heads = mx, heads_i[k - 1]
            for row, p in heads:
                dst = row[:n]
                np.floor_divide(src, p, out=dst)
                np.multiply(dst, p, out=dst)
                np.subtract(src, dst, out=dst)
        np.copyto(out[s:e], slots[:, :n].T)               # (n, H): the one transposing copy


def hash_torch(x: Any, mults: tuple[int, ...], primes: tuple[tuple[int, ...], ...], pad: int,
                separator: int | None = None) -> Any:
    """Torch path (any device): same arithmetic in torch ops. x [T] or [B, T] int64. With a
    ``separator`` (the document rule) ids before a document's start read the pad id too."""
    import torch  # lazy: torch is loaded only where tensors are given; build-tables and normalize-vocab never need it
    import torch.nn.functional as F  # lazy: torch is loaded only where tensors are given; build-tables and normalize-vocab never need it


    squeeze = x.dim() == 1
    x2 = x.unsqueeze(0) if squeeze else x                      # (B, T)
    T = x2.shape[1]
    outs = []
    mix = x2 * mults[0]                                         # (B, T) int64, wraps on overflow
    for k in range(1, len(mults)):
        shifted = F.pad(x2, (k, 0), value=pad)[:, :T]            # id[t-k], pad before the start
        if separator is not None:                                 # and before the document's start
            shifted = torch.where(torch_document_mask(x2, separator, k), shifted, pad)
        mix = torch.bitwise_xor(mix, shifted * mults[k])
        for p in primes[k - 1]:
            outs.append(torch.remainder(mix, p))                # floor mod: in [0, p)
    out = torch.stack(outs, dim=-1)                             # (B, T, H)
    return out[0] if squeeze else out
