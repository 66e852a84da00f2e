"""How often the Engram hash collides on a corpus's distinct N-grams, beside uniform hashing.

Every distinct N-gram of order n is a key; each of the order's heads maps it to a slot of a
prime-sized table (``engram_cli.tables.hashing``). Keys that share a slot share a table row, so the model
sees their sum of updates. Per (layer, order, head) this module measures

* occupied slots, and the share of keys that share their slot with another key ("colliding"),
  also weighted by how often each N-gram occurs in the corpus, and the largest slot load;

and per (layer, order) the share of keys that are *indistinguishable*: they share their slot with
one and the same other key in every head of the order, so no combination of heads tells them
apart. Beside each figure is what uniform random hashing of k keys into m slots predicts:

* occupied slots        m (1 - (1 - 1/m)^k)
* colliding share       1 - (1 - 1/m)^(k-1)   (same expectation with or without count weights)
* max load              sum over L >= 1 of 1 - (1 - P[Poisson(k/m) >= L])^m: bins treated as
                        independent Poisson(k/m) loads (the usual Poisson approximation)
* indistinguishable     1 - (1 - prod_j 1/m_j)^(k-1)

The keys are hashed by :func:`engram_cli.tables.hashing.hash_ngrams` itself: a key row of length n, in
text order, is a sequence whose last position's order-n suffix is exactly the key. Everything is
vectorized (``np.bincount`` / ``np.unique``); there is no Python loop over keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engram_cli.core.errors import InputError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.tables.hashing import hash_ngrams
from engram_cli.tables.kernels import available_cpus
from engram_cli.tables.plan import TablePlan, make_primes
from engram_cli.tables.sizing import (
    expected_colliding_share,
    expected_indistinguishable_share,
    expected_max_load,
    expected_occupied,
)

COLLISIONS_FORMAT = "engram.collisions"
COLLISIONS_VERSION = 1

_HASH_ROWS = 1 << 17   # key rows hashed per hash_ngrams call: bounds the [rows, n, H] temporary
_THREAD_KEYS = 1 << 20  # orders with fewer distinct keys are measured in the calling thread


# -----------------------------------------------------------------------------
# what uniform hashing predicts


# -----------------------------------------------------------------------------
# result objects


@dataclass
class HeadCollisions:
    """Measured and predicted figures for one hash head of one order of one layer."""

    layer: int
    n: int                          # N-gram order
    head: int                       # head index within the order (0..n_head_per_ngram-1)
    head_index: int                 # index in hash_ngrams' last dim (order 2's heads first)
    keys: int                       # distinct N-grams of order n (k)
    slots: int                      # table size of this head (prime m)
    occupied: int                   # slots holding at least one key
    colliding: int                  # keys sharing their slot with another key
    colliding_weighted: int         # total corpus count of those keys
    max_load: int                   # most keys in one slot
    occupied_pred: float            # uniform hashing: m (1 - (1 - 1/m)^k)
    colliding_share_pred: float     # uniform hashing: 1 - (1 - 1/m)^(k-1)
    max_load_pred: float            # uniform hashing, Poisson approximation
    total_count: int                # corpus occurrences of all keys (denominator of weighted share)

    @property
    def occupied_share(self) -> float:
        return self.occupied / self.slots

    @property
    def colliding_share(self) -> float:
        return self.colliding / self.keys if self.keys else 0.0

    @property
    def colliding_share_weighted(self) -> float:
        return self.colliding_weighted / self.total_count if self.total_count else 0.0


@dataclass
class OrderCollisions:
    """Figures for one (layer, order): its heads plus the all-heads (indistinguishable) figure."""

    layer: int
    n: int
    keys: int
    indistinguishable: int          # keys sharing every head's slot with one same other key
    indistinguishable_weighted: int  # total corpus count of those keys
    indistinguishable_share_pred: float
    total_count: int
    heads: list[HeadCollisions] = field(default_factory=list)

    @property
    def indistinguishable_share(self) -> float:
        return self.indistinguishable / self.keys if self.keys else 0.0

    @property
    def indistinguishable_share_weighted(self) -> float:
        return self.indistinguishable_weighted / self.total_count if self.total_count else 0.0


# the columns of to_rows(), in order; order rows leave the per-head ones None
ROW_COLUMNS = (
    "layer", "n", "head", "head_index", "keys", "slots", "occupied", "occupied_share",
    "occupied_share_pred", "colliding", "colliding_share", "colliding_share_pred",
    "colliding_share_weighted", "max_load", "max_load_pred", "indistinguishable",
    "indistinguishable_share", "indistinguishable_share_weighted", "indistinguishable_share_pred",
)


@dataclass
class CollisionReport:
    """All (layer, order) figures of one plan on one corpus. Made by :func:`measure_collisions`."""

    orders: list[OrderCollisions]

    def to_rows(self) -> list[dict[str, Any]]:
        """Flat rows for a Parquet table, every row with the keys of ``ROW_COLUMNS``.

        Per (layer, order): one row per head (``head`` 0..H-1, the per-head figures) followed by
        one order row (``head`` None, the indistinguishable figures). ``*_pred`` columns are the
        uniform-hashing predictions of the column without the suffix.
        """
        rows = []
        for o in self.orders:
            for h in o.heads:
                row = dict.fromkeys(ROW_COLUMNS)
                row.update(layer=o.layer, n=o.n, head=h.head, head_index=h.head_index, keys=h.keys,
                           slots=h.slots, occupied=h.occupied, occupied_share=h.occupied_share,
                           occupied_share_pred=h.occupied_pred / h.slots, colliding=h.colliding,
                           colliding_share=h.colliding_share, colliding_share_pred=h.colliding_share_pred,
                           colliding_share_weighted=h.colliding_share_weighted, max_load=h.max_load,
                           max_load_pred=h.max_load_pred)
                rows.append(row)
            row = dict.fromkeys(ROW_COLUMNS)
            row.update(layer=o.layer, n=o.n, keys=o.keys, indistinguishable=o.indistinguishable,
                       indistinguishable_share=o.indistinguishable_share,
                       indistinguishable_share_weighted=o.indistinguishable_share_weighted,
                       indistinguishable_share_pred=o.indistinguishable_share_pred)
            rows.append(row)
        return rows

    def summary(self) -> list[dict[str, Any]]:
        """One compact dict per (layer, order): means over its heads (``*_mean``), the largest
        load of any head, and the all-heads (indistinguishable) figures. What reports show."""
        out = []
        for o in self.orders:
            hs = o.heads

            def mean(f, hs=hs) -> float:
                return float(np.mean([f(h) for h in hs])) if hs else 0.0
            out.append({
                "layer": o.layer, "n": o.n, "keys": o.keys, "heads": len(hs),
                "slots_mean": mean(lambda h: h.slots),
                "occupied_share_pred_mean": mean(lambda h: h.occupied_pred / h.slots),
                "max_load_pred_mean": mean(lambda h: h.max_load_pred),
                "colliding_share_mean": mean(lambda h: h.colliding_share),
                "colliding_share_pred_mean": mean(lambda h: h.colliding_share_pred),
                "colliding_share_weighted_mean": mean(lambda h: h.colliding_share_weighted),
                "occupied_share_mean": mean(lambda h: h.occupied_share),
                "max_load": max((h.max_load for h in hs), default=0),
                "indistinguishable_share": o.indistinguishable_share,
                "indistinguishable_share_weighted": o.indistinguishable_share_weighted,
                "indistinguishable_share_pred": o.indistinguishable_share_pred,
            })
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (format and version first), derived shares included."""
        orders = []
        for o in self.orders:
            d = asdict(o)
            d["indistinguishable_share"] = o.indistinguishable_share
            d["indistinguishable_share_weighted"] = o.indistinguishable_share_weighted
            for hd, h in zip(d["heads"], o.heads):
                hd.update(occupied_share=h.occupied_share, colliding_share=h.colliding_share,
                          colliding_share_weighted=h.colliding_share_weighted)
            orders.append(d)
        return {"format": COLLISIONS_FORMAT, "format_version": COLLISIONS_VERSION, "orders": orders}


# -----------------------------------------------------------------------------
# measuring


def check_inputs(ngrams_by_order: dict[int, np.ndarray], counts_by_order: dict[int, np.ndarray] | None,
                  plan: TablePlan) -> list[int]:
    orders = sorted(int(n) for n in ngrams_by_order)
    for n in orders:
        if not 2 <= n <= plan.max_ngram_size:
            raise InputError(f"order {n} is not hashed by this plan (orders 2..{plan.max_ngram_size})")
        keys = np.asarray(ngrams_by_order[n])
        if keys.ndim != 2 or keys.shape[1] != n or keys.dtype.kind not in "iu":
            raise InputError(f"order-{n} n-grams must be an integer array [K, {n}], got {keys.dtype} {keys.shape}")
        if counts_by_order is not None:
            if n not in counts_by_order:
                raise InputError(f"no counts given for order {n}")
            if np.shape(counts_by_order[n]) != (keys.shape[0],):
                raise InputError(f"order-{n} counts have shape {np.shape(counts_by_order[n])}, "
                                 f"expected ({keys.shape[0]},)")
    return orders


def key_mix(keys: np.ndarray, mults: tuple[int, ...] | list[int]) -> np.ndarray:
    """The 64-bit mix of distinct n-grams [K, n] (text order): ``XOR_k id[n-1-k] * m_k``, int64 [K].

    What :func:`hash_ngrams` mixes at the last position of a sequence that ends with the n-gram
    (``m_0`` multiplies the newest id), in the same wrap-around int64 arithmetic.
    """
    keys = np.asarray(keys)
    n = keys.shape[1]
    mix = keys[:, n - 1].astype(np.int64)                           # (K,)
    mix *= np.int64(mults[0])
    term = np.empty_like(mix)                                       # (K,) one temporary, reused
    for k in range(1, n):
        np.multiply(keys[:, n - 1 - k].astype(np.int64, copy=False), np.int64(mults[k]), out=term)
        mix ^= term
    return mix


def mix_slots(mix: np.ndarray, p: int) -> np.ndarray:
    """``mix`` reduced to slots of a head of ``p`` slots: floor modulo, int64 in [0, p).

    Unsigned when no mix is negative (always so for ids in [0, V)), which NumPy divides faster.
    """
    if mix.shape[0] and int(mix.min()) >= 0:
        return np.remainder(mix.view(np.uint64), np.uint64(p)).view(np.int64)
    return np.remainder(mix, np.int64(p))


def hash_keys(keys: np.ndarray, plan: TablePlan, layer_id: int, n: int) -> np.ndarray:
    """Slots of distinct N-grams of order n in each head of that order: [K, n] -> [H_n, K] int64.

    ``keys`` rows are in text order (column 0 oldest, column n-1 the newest token). The fast path:
    one :func:`key_mix` per key, reduced modulo each head's prime (:func:`mix_slots`); equal to
    :func:`hash_keys_reference` (tested). Returned head-major so each head's slots are contiguous.
    """
    primes = plan.primes[plan.checked_layer(layer_id)][n - 2]
    mix = key_mix(keys, plan.multipliers[layer_id])
    out = np.empty((len(primes), mix.shape[0]), dtype=np.int64)     # (H_n, K)
    for j, p in enumerate(primes):
        out[j] = mix_slots(mix, p)
    return out


def hash_keys_reference(keys: np.ndarray, plan: TablePlan, layer_id: int, n: int) -> np.ndarray:
    """The plain reference of :func:`hash_keys`: every row hashed as a sequence by :func:`hash_ngrams`,
    whose order-n suffix at the last position is the row itself (in blocks of ``_HASH_ROWS`` rows)."""
    H = plan.n_head_per_ngram
    lo = (n - 2) * H                                   # the order's heads in hash_ngrams' output
    K = keys.shape[0]
    if plan.restarts:  # a key is one n-gram, hashed as it stands: no restart after a separator in it
        plan = dataclasses.replace(plan, boundary="pad-start")
    out = np.empty((H, K), dtype=np.int64)             # (H_n, K)
    for s in range(0, K, _HASH_ROWS):
        rows = np.asarray(keys[s:s + _HASH_ROWS], dtype=np.int64)
        slots = hash_ngrams(rows, plan, layer_id)      # (rows, n, total_heads)
        out[:, s:s + rows.shape[0]] = slots[:, n - 1, lo:lo + H].T
    return out


def _dense(n_slots: int, n_keys: int) -> bool:
    """Count per slot in an array of the table's size (O(K + m)), or sort the slots (huge m)."""
    return n_slots <= 8 * n_keys + (1 << 22)


def _slot_loads(slots: np.ndarray, n_slots: int) -> tuple[np.ndarray, int, int]:
    """For one head's slots [K] in [0, m): (load of each key's slot [K], occupied, max load)."""
    K = slots.shape[0]
    if K == 0:
        return np.zeros(0, dtype=np.int64), 0, 0
    if _dense(n_slots, K):                             # dense count: O(K + m)
        loads = np.bincount(slots, minlength=n_slots)  # (m,)
        return loads[slots], int(np.count_nonzero(loads)), int(loads.max())
    uniq, inverse, counts = np.unique(slots, return_inverse=True, return_counts=True)  # huge m: sort
    return counts[inverse.reshape(-1)], int(uniq.shape[0]), int(counts.max())
def _group_pairs(g: np.ndarray, s: np.ndarray, s_bound: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense group ids of the pairs (g[i], s[i]) and each group's size. g, s >= 0, s < s_bound."""
    if g.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    g_bound = int(g.max()) + 1
    if g_bound * s_bound < 2**63:                      # one int64 code per pair: a single sort
        _, inverse, counts = np.unique(g * s_bound + s, return_inverse=True, return_counts=True)
        return inverse.reshape(-1), counts
    order = np.lexsort((s, g))                         # codes would overflow: sort on both
    gs, ss = g[order], s[order]
    new = np.empty(order.shape[0], dtype=bool)
    new[0] = True
    new[1:] = (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])
    group_sorted = np.cumsum(new) - 1
    inverse = np.empty_like(group_sorted)
    inverse[order] = group_sorted
    return inverse, np.bincount(group_sorted)


def _tied_keys(head_slots: Callable[[int, np.ndarray], np.ndarray], sizes: list[int] | tuple[int, ...],
               candidates: np.ndarray) -> np.ndarray:
    """Indices of the keys whose whole slot tuple equals another key's, from the keys ``candidates``
    that share their head-0 slot; ``head_slots(j, idx)`` gives head j's slots of the keys ``idx``.

    Exact grouping on the tuple, refined head by head over the keys still tied, so later heads only
    see the few keys left.
    """
    idx = candidates
    group = head_slots(0, idx)
    for j in range(1, len(sizes)):
        if idx.shape[0] == 0:
            break
        group, size = _group_pairs(group, head_slots(j, idx), sizes[j])
        keep = size[group] >= 2                        # still tied with some key in heads 0..j
        idx, group = idx[keep], group[keep]
    return idx


def shared_in_all_heads(slots: np.ndarray, sizes: list[int], first_loads: np.ndarray | None = None) -> np.ndarray:
    """Mask [K] of keys whose whole slot tuple (all heads) equals another key's: [H, K] -> [K] bool.

    ``first_loads`` (load of each key's head-0 slot) saves a count.
    """
    H, K = slots.shape
    if first_loads is None:
        first_loads = _slot_loads(slots[0], sizes[0])[0]
    idx = _tied_keys(lambda j, i: slots[j, i], sizes, np.flatnonzero(first_loads >= 2))
    mask = np.zeros(K, dtype=bool)
    mask[idx] = True
    return mask


@dataclass
class _HeadPass:
    """What one pass over one head's slots gives (see :func:`_measure_head`)."""

    occupied: int
    colliding: int                  # keys in slots holding 2 or more keys
    colliding_weighted: int         # their summed counts
    max_load: int
    shared: np.ndarray | None       # (K,) bool, key shares its slot: head 0 only (indistinguishability)
    heat: np.ndarray | None         # summed counts of every used slot, int64, unsorted (hot rows)
    hist: np.ndarray | None         # slots holding L keys, L = 0..max load (the slot-load picture)


def _measure_head(mix: np.ndarray, p: int, counts: np.ndarray, *, first: bool, heat: bool,
                  hist: bool) -> _HeadPass:
    """One head of ``p`` slots: hash (:func:`mix_slots`), count keys and occurrences per slot, and
    derive every figure from the per-slot arrays (so each key is visited by two counts only).
    ``counts``: the keys' occurrences as float64 (exact sums below 2^53) or int64."""
    K = mix.shape[0]
    if K == 0:
        return _HeadPass(0, 0, 0, 0, np.zeros(0, bool) if first else None,
                         np.zeros(0, np.int64) if heat else None, np.array([p]) if hist else None)
    slots = mix_slots(mix, p)                                     # (K,)
    if _dense(p, K):
        loads = np.bincount(slots, minlength=p)                   # (p,) keys per slot
        where = slots                                             # each key's index into loads
    else:                                                         # huge table: the used slots only
        _, where, loads = np.unique(slots, return_inverse=True, return_counts=True)
        where = where.reshape(-1)
        del slots
    sums = _sum_by_slot(where, counts, loads.shape[0])            # (len(loads),) occurrences per slot
    shared_slot = loads >= 2
    h = None
    if hist:
        h = np.bincount(loads)                                    # dense: [0] = empty slots
        h[0] = p - int(np.count_nonzero(loads))
    return _HeadPass(occupied=int(np.count_nonzero(loads)), colliding=int(loads[shared_slot].sum()),
                     colliding_weighted=int(sums[shared_slot].sum()), max_load=int(loads.max()),
                     shared=shared_slot[where] if first else None, heat=sums[sums > 0] if heat else None, hist=h)


def _sum_by_slot(where: np.ndarray, counts: np.ndarray, size: int) -> np.ndarray:
    """int64 sums of ``counts`` per slot index ``where`` in [0, size): a ``bincount`` when the
    counts come as float64 (exact: their total is below 2^53), else a sort."""
    if counts.dtype == np.float64:
        return np.bincount(where, weights=counts, minlength=size).astype(np.int64)
    order = np.argsort(where, kind="stable")
    w = where[order]
    starts = np.flatnonzero(np.r_[True, w[1:] != w[:-1]])
    out = np.zeros(size, dtype=np.int64)
    out[w[starts]] = np.add.reduceat(counts[order], starts)
    return out


def _shared_values(x: np.ndarray) -> np.ndarray:
    """Indices of the entries of ``x`` whose value another entry has too (one sort)."""
    s = np.sort(x)
    dup = np.unique(s[1:][s[1:] == s[:-1]])                        # (D,) the repeated values, few
    if dup.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.minimum(np.searchsorted(dup, x), dup.shape[0] - 1)
    return np.flatnonzero(dup[pos] == x)


@dataclass
class TableMeasurement:
    """Everything one hashing pass over a corpus's distinct n-grams gives (:func:`measure_tables`)."""

    collisions: CollisionReport
    row_heat: dict[int, np.ndarray]        # layer -> summed counts of every used row (all heads), unsorted
    slot_load_hist: dict[int, np.ndarray]  # order -> slots holding L keys, head 0 of the plan's first layer


def measure_tables(ngrams_by_order: dict[int, np.ndarray], counts_by_order: dict[int, np.ndarray],
                   plan: TablePlan, progress: ProgressFn | None = None, *,
                   num_threads: int | None = None) -> TableMeasurement:
    """Collisions (:func:`measure_collisions`), row heat (``engram_cli.tables.hotrows``) and the slot-load
    histogram in one pass: every key is mixed once per (layer, order), every head's slots are
    computed once, and the heads run in ``num_threads`` threads (None: the available CPUs; NumPy
    releases the GIL in its loops)."""
    return _measure(ngrams_by_order, counts_by_order, plan, progress, heat=True, hist=True, num_threads=num_threads)


def measure_collisions(ngrams_by_order: dict[int, np.ndarray], counts_by_order: dict[int, np.ndarray],
                       plan: TablePlan, progress: ProgressFn | None = None, *,
                       num_threads: int | None = None) -> CollisionReport:
    """Measure collisions of ``plan`` on distinct N-grams, for every layer, order and head.

    ngrams_by_order: order n -> distinct N-grams [K, n] of canonical ids in text order (column 0
        the oldest token). Rows must be distinct: duplicates would count as colliding keys.
    counts_by_order: order n -> corpus occurrences [K] of each row (for the weighted shares).
    progress: called as ``progress("collisions", done, total, layer=..., n=...)`` per (layer, order).

    Equal to :func:`measure_collisions_reference` (tested), in one pass per head.
    """
    return _measure(ngrams_by_order, counts_by_order, plan, progress, heat=False, hist=False,
                    num_threads=num_threads).collisions


def _measure(ngrams_by_order, counts_by_order, plan: TablePlan, progress: ProgressFn | None, *, heat: bool,
             hist: bool, num_threads: int | None) -> TableMeasurement:
    progress = report(progress)
    orders = check_inputs(ngrams_by_order, counts_by_order, plan)
    total = len(plan.layer_ids) * len(orders)
    result: list[OrderCollisions] = []
    heats: dict[int, list[np.ndarray]] = {layer: [] for layer in plan.layer_ids}
    hists: dict[int, np.ndarray] = {}
    keys_max = max((np.shape(ngrams_by_order[n])[0] for n in orders), default=0)
    # threads pay off from about a million keys; below, starting them costs more than they save
    threads = max(1, min(plan.n_head_per_ngram, num_threads or available_cpus())) if keys_max >= _THREAD_KEYS else 1
    progress("collisions", 0, total)
    with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
        for layer in plan.layer_ids:
            for n in orders:
                order, passes = _measure_order(ngrams_by_order[n], counts_by_order[n], plan, layer, n, pool,
                                               heat=heat, hist=hist and layer == plan.layer_ids[0])
                result.append(order)
                if heat:
                    heats[layer] += [r.heat for r in passes]
                if passes[0].hist is not None:
                    hists[n] = passes[0].hist
                progress("collisions", len(result), total, layer=layer, n=n)
    row_heat = {layer: np.concatenate(h) if h else np.zeros(0, np.int64) for layer, h in heats.items()}
    return TableMeasurement(collisions=CollisionReport(orders=result), row_heat=row_heat, slot_load_hist=hists)


def _measure_order(keys, counts, plan: TablePlan, layer: int, n: int, pool: ThreadPoolExecutor | None, *,
                   heat: bool, hist: bool) -> tuple[OrderCollisions, list[_HeadPass]]:
    """One (layer, order): the keys mixed once, every head measured (in ``pool``), then the keys tied
    in all heads found among those sharing their head-0 slot (their slots recomputed, few keys)."""
    keys = np.asarray(keys)
    counts = np.asarray(counts, dtype=np.int64)                 # (K,)
    K = keys.shape[0]
    total_count = int(counts.sum())
    weights = counts.astype(np.float64) if total_count < 2**53 else counts   # float64 sums are exact
    sizes = list(plan.primes[layer][n - 2])
    mix = key_mix(keys, plan.multipliers[layer])                # (K,)
    # Two keys share their slot in every head iff their mixes are congruent modulo every prime,
    # i.e. modulo their product (CRT: the primes are distinct). Once that product reaches 2^64,
    # more than any difference of two int64 mixes, that means equal mixes: one sort finds them.
    by_mix = math.prod(sizes) >= 2**64

    def head(j: int) -> _HeadPass:
        return _measure_head(mix, sizes[j], weights, first=j == 0 and not by_mix, heat=heat, hist=hist and j == 0)

    passes = list(pool.map(head, range(len(sizes))) if pool is not None else map(head, range(len(sizes))))
    heads = [HeadCollisions(
        layer=layer, n=n, head=j, head_index=(n - 2) * plan.n_head_per_ngram + j, keys=K, slots=m,
        occupied=r.occupied, colliding=r.colliding, colliding_weighted=r.colliding_weighted, max_load=r.max_load,
        occupied_pred=expected_occupied(K, m), colliding_share_pred=expected_colliding_share(K, m),
        max_load_pred=expected_max_load(K, m), total_count=total_count)
        for j, (m, r) in enumerate(zip(sizes, passes))]
    tied = _shared_values(mix) if by_mix else \
        _tied_keys(lambda j, idx: mix_slots(mix[idx], sizes[j]), sizes, np.flatnonzero(passes[0].shared))
    order = OrderCollisions(layer=layer, n=n, keys=K, indistinguishable=int(tied.shape[0]),
                            indistinguishable_weighted=int(counts[tied].sum()),
                            indistinguishable_share_pred=expected_indistinguishable_share(K, sizes),
                            total_count=total_count, heads=heads)
    return order, passes


def measure_collisions_reference(ngrams_by_order: dict[int, np.ndarray], counts_by_order: dict[int, np.ndarray],
                                 plan: TablePlan) -> CollisionReport:
    """The plain reference of :func:`measure_collisions`: all heads' slots through
    :func:`hash_keys_reference`, each key's slot load looked up per head, the indistinguishable
    keys from :func:`shared_in_all_heads` on the whole [H, K] slot array."""
    check_inputs(ngrams_by_order, counts_by_order, plan)
    result: list[OrderCollisions] = []
    for layer in plan.layer_ids:
        for n in sorted(ngrams_by_order):
            keys = np.asarray(ngrams_by_order[n])
            counts = np.asarray(counts_by_order[n], dtype=np.int64)   # (K,)
            K = keys.shape[0]
            total_count = int(counts.sum())
            sizes = list(plan.primes[layer][n - 2])
            slots = hash_keys_reference(keys, plan, layer, n)          # (H_n, K)
            heads = []
            for j, m in enumerate(sizes):
                key_loads, occupied, max_load = _slot_loads(slots[j], m)
                shared = key_loads >= 2                                # (K,)
                heads.append(HeadCollisions(
                    layer=layer, n=n, head=j, head_index=(n - 2) * plan.n_head_per_ngram + j, keys=K,
                    slots=m, occupied=occupied, colliding=int(np.count_nonzero(shared)),
                    colliding_weighted=int(counts[shared].sum()), max_load=max_load,
                    occupied_pred=expected_occupied(K, m), colliding_share_pred=expected_colliding_share(K, m),
                    max_load_pred=expected_max_load(K, m), total_count=total_count))
            tied = shared_in_all_heads(slots, sizes)                   # (K,) bool
            result.append(OrderCollisions(
                layer=layer, n=n, keys=K, indistinguishable=int(np.count_nonzero(tied)),
                indistinguishable_weighted=int(counts[tied].sum()),
                indistinguishable_share_pred=expected_indistinguishable_share(K, sizes),
                total_count=total_count, heads=heads))
    return CollisionReport(orders=result)


def sweep_collisions(ngrams_by_order: dict[int, np.ndarray], counts_by_order: dict[int, np.ndarray],
                     plan: TablePlan, sizes: list[int], *, layer_id: int | None = None, n_heads: int = 2,
                     progress: ProgressFn | None = None, num_threads: int | None = None) -> list[dict[str, Any]]:
    """Collision rate vs table size for one layer (default: the plan's first), measured and predicted.

    For each target size t in ``sizes`` a plan like ``plan`` but with ``n_heads`` heads per order
    and every order's target set to t (primes chosen by the same rule, same multipliers) is
    measured on the keys. Returns one row per (order, size): ``layer, n, target_size, heads, keys,
    slots_mean, colliding_share, colliding_share_weighted, colliding_share_pred, occupied_share,
    occupied_share_pred, max_load, max_load_pred, indistinguishable_share,
    indistinguishable_share_pred`` (per-head figures are means over the heads; max_load the largest).
    """
    progress = report(progress)
    layer = plan.layer_ids[0] if layer_id is None else plan.checked_layer(layer_id)
    check_inputs(ngrams_by_order, counts_by_order, plan)
    n_orders = plan.n_orders
    rows = []
    for i, t in enumerate(sizes):
        targets = (int(t),) * n_orders
        small = dataclasses.replace(
            plan, layer_ids=(layer,), n_head_per_ngram=n_heads, target_sizes=targets,
            multipliers={layer: plan.multipliers[layer]},
            primes=make_primes((layer,), plan.max_ngram_size, n_heads, targets))
        report_ = measure_collisions(ngrams_by_order, counts_by_order, small, num_threads=num_threads)
        for o in report_.orders:
            hs = o.heads
            rows.append({
                "layer": layer, "n": o.n, "target_size": int(t), "heads": n_heads, "keys": o.keys,
                "slots_mean": float(np.mean([h.slots for h in hs])),
                "colliding_share": float(np.mean([h.colliding_share for h in hs])),
                "colliding_share_weighted": float(np.mean([h.colliding_share_weighted for h in hs])),
                "colliding_share_pred": float(np.mean([h.colliding_share_pred for h in hs])),
                "occupied_share": float(np.mean([h.occupied_share for h in hs])),
                "occupied_share_pred": float(np.mean([h.occupied_pred / h.slots for h in hs])),
                "max_load": max(h.max_load for h in hs),
                "max_load_pred": float(np.mean([h.max_load_pred for h in hs])),
                "indistinguishable_share": o.indistinguishable_share,
                "indistinguishable_share_pred": o.indistinguishable_share_pred,
            })
        progress("sweep", i + 1, len(sizes), target_size=int(t))
    return rows


# -----------------------------------------------------------------------------
# plots (drawn through engram_cli.core.plotting: matplotlib imported lazily, no pyplot state)


def slot_load_hist(keys: np.ndarray, plan: TablePlan, layer_id: int, n: int, head: int = 0) -> np.ndarray:
    """Slots holding L keys (L = 0..max load) in one head of order n: what the picture shows."""
    m = plan.primes[plan.checked_layer(layer_id)][n - 2][head]
    slots = mix_slots(key_mix(keys, plan.multipliers[layer_id]), m)
    _, loads = np.unique(slots, return_counts=True)           # loads of the occupied slots
    hist = np.bincount(loads, minlength=1)                    # slots with load L, L = 0..max
    hist[0] = m - loads.shape[0]                              # empty slots
    return hist


__all__ = [
    "CollisionReport", "OrderCollisions", "HeadCollisions", "ROW_COLUMNS", "measure_collisions",
    "sweep_collisions", "hash_keys", "shared_in_all_heads",
    "TableMeasurement", "measure_tables", "measure_collisions_reference", "hash_keys_reference", "key_mix",
    "mix_slots", "slot_load_hist",
]
