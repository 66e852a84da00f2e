"""How often the Engram hash collides on a corpus's distinct N-grams, beside uniform hashing.

Every distinct N-gram of order n is a key; each of the order's heads maps it to a slot of a
prime-sized table (``engram_cli.hashing``). Keys that share a slot share a table row, so the model
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

The keys are hashed by :func:`engram_cli.hashing.hash_ngrams` itself: a key row of length n, in
text order, is a sequence whose last position's order-n suffix is exactly the key. Everything is
vectorized (``np.bincount`` / ``np.unique``); there is no Python loop over keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engram_cli import plotting
from engram_cli.errors import InputError
from engram_cli.hashing import TablePlan, expected_colliding_share, hash_ngrams, make_primes
from engram_cli.progress import ProgressFn, report

COLLISIONS_FORMAT = "engram.collisions"
COLLISIONS_VERSION = 1

_HASH_ROWS = 1 << 17   # key rows hashed per hash_ngrams call: bounds the [rows, n, H] temporary


# -----------------------------------------------------------------------------
# what uniform hashing predicts


def expected_occupied(n_keys: int, n_slots: int) -> float:
    """Expected occupied slots when k keys fall uniformly into m slots: m (1 - (1 - 1/m)^k)."""
    if n_keys <= 0:
        return 0.0
    if n_slots == 1:
        return 1.0
    return -n_slots * math.expm1(n_keys * math.log1p(-1.0 / n_slots))


def expected_max_load(n_keys: int, n_slots: int) -> float:
    """Approximate expected largest slot load for k keys in m slots under uniform hashing.

    Treats the m loads as independent Poisson(k/m) variables (the Poisson approximation of
    occupancy): E[max] = sum_{L>=1} P(max >= L) ~ sum_{L>=1} 1 - (1 - P[X >= L])^m. Accurate to a
    few percent when m is large; exact figures for tiny tables are not the use case.
    """
    if n_keys <= 0:
        return 0.0
    if n_slots == 1:
        return float(n_keys)
    lam = n_keys / n_slots
    # P[X >= L] is ~1 below the window and ~0 above it: only loads within it need the pmf
    lo = max(1, int(lam - 12 * math.sqrt(lam) - 40))
    hi = int(lam + 12 * math.sqrt(lam) + 40)
    i = np.arange(lo, hi + 1, dtype=np.float64)
    log_pmf = -lam + i * math.log(lam) - np.array([math.lgamma(x + 1) for x in i])
    tail = np.cumsum(np.exp(log_pmf)[::-1])[::-1]             # P[X >= L] for L = lo..hi, small terms first
    q = np.clip(tail, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        p_max_ge = -np.expm1(n_slots * np.log1p(-q))            # P(max >= L) = 1 - (1 - q)^m
    p_max_ge = np.where(q >= 1.0, 1.0, p_max_ge)
    return float((lo - 1) + np.sum(p_max_ge))                 # loads 1..lo-1 are reached surely


def expected_indistinguishable_share(n_keys: int, n_slots: list[int] | tuple[int, ...]) -> float:
    """Expected share of keys that share every head's slot with one same other key.

    A given other key matches in all heads with probability prod_j 1/m_j, so the share is
    1 - (1 - prod_j 1/m_j)^(k-1).
    """
    if n_keys <= 1:
        return 0.0
    log_p = -sum(math.log(m) for m in n_slots)
    p = math.exp(log_p)
    if p >= 1.0:
        return 1.0
    return -math.expm1((n_keys - 1) * math.log1p(-p))


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


def _check_inputs(ngrams_by_order: dict[int, np.ndarray], counts_by_order: dict[int, np.ndarray] | None,
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
    mix = keys[:, n - 1].astype(np.int64) * np.int64(mults[0])      # (K,)
    for k in range(1, n):
        mix ^= keys[:, n - 1 - k].astype(np.int64) * np.int64(mults[k])
    return mix


def mix_slots(mix: np.ndarray, p: int) -> np.ndarray:
    """``mix`` reduced to slots of a head of ``p`` slots: floor modulo, int64 in [0, p).

    Computed as ``x - (x // p) * p`` (exact; NumPy vectorizes ``//`` by a scalar but not ``%``),
    unsigned when no mix is negative (always so for ids in [0, V)), as in ``hashing._hash_numpy``.
    """
    if mix.shape[0] and int(mix.min()) >= 0:
        src, d = mix.view(np.uint64), np.uint64(p)
    else:
        src, d = mix, np.int64(p)
    out = np.floor_divide(src, d)
    np.multiply(out, d, out=out)
    np.subtract(src, out, out=out)
    return out.view(np.int64)


def hash_keys(keys: np.ndarray, plan: TablePlan, layer_id: int, n: int) -> np.ndarray:
    """Slots of distinct N-grams of order n in each head of that order: [K, n] -> [H_n, K] int64.

    ``keys`` rows are in text order (column 0 oldest, column n-1 the newest token). The fast path:
    one :func:`key_mix` per key, reduced modulo each head's prime (:func:`mix_slots`); equal to
    :func:`hash_keys_reference` (tested). Returned head-major so each head's slots are contiguous.
    """
    primes = plan.primes[plan._layer(layer_id)][n - 2]
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


def shared_in_all_heads(slots: np.ndarray, sizes: list[int], first_loads: np.ndarray | None = None) -> np.ndarray:
    """Mask [K] of keys whose whole slot tuple (all heads) equals another key's: [H, K] -> [K] bool.

    Exact grouping on the tuple, refined head by head over the keys still tied: after head 0 only
    keys in shared slots remain, after each further head only keys tied with another in all heads
    so far, so later steps are cheap. ``first_loads`` (load of each key's head-0 slot) saves a count.
    """
    H, K = slots.shape
    if first_loads is None:
        first_loads = _slot_loads(slots[0], sizes[0])[0]
    idx = np.flatnonzero(first_loads >= 2)             # candidates: tied in head 0
    group = slots[0, idx]
    for j in range(1, H):
        if idx.shape[0] == 0:
            break
        group, size = _group_pairs(group, slots[j, idx], sizes[j])
        keep = size[group] >= 2                        # still tied with some key in heads 0..j
        idx, group = idx[keep], group[keep]
    mask = np.zeros(K, dtype=bool)
    mask[idx] = True
    return mask


def measure_collisions(ngrams_by_order: dict[int, np.ndarray], counts_by_order: dict[int, np.ndarray],
                       plan: TablePlan, progress: ProgressFn | None = None) -> CollisionReport:
    """Measure collisions of ``plan`` on distinct N-grams, for every layer, order and head.

    ngrams_by_order: order n -> distinct N-grams [K, n] of canonical ids in text order (column 0
        the oldest token). Rows must be distinct: duplicates would count as colliding keys.
    counts_by_order: order n -> corpus occurrences [K] of each row (for the weighted shares).
    progress: called as ``progress("collisions", done, total, layer=..., n=...)`` per (layer, order).
    """
    progress = report(progress)
    orders = _check_inputs(ngrams_by_order, counts_by_order, plan)
    total = len(plan.layer_ids) * len(orders)
    result: list[OrderCollisions] = []
    progress("collisions", 0, total)
    for layer in plan.layer_ids:
        for n in orders:
            keys = np.asarray(ngrams_by_order[n])
            counts = np.asarray(counts_by_order[n], dtype=np.int64)   # (K,)
            K = keys.shape[0]
            total_count = int(counts.sum())
            sizes = list(plan.primes[layer][n - 2])
            slots = hash_keys(keys, plan, layer, n)                    # (H_n, K)
            heads = []
            first_loads = None
            for j, m in enumerate(sizes):
                key_loads, occupied, max_load = _slot_loads(slots[j], m)
                if j == 0:
                    first_loads = key_loads
                shared = key_loads >= 2                                # (K,)
                heads.append(HeadCollisions(
                    layer=layer, n=n, head=j, head_index=(n - 2) * plan.n_head_per_ngram + j, keys=K,
                    slots=m, occupied=occupied, colliding=int(np.count_nonzero(shared)),
                    colliding_weighted=int(counts[shared].sum()), max_load=max_load,
                    occupied_pred=expected_occupied(K, m), colliding_share_pred=expected_colliding_share(K, m),
                    max_load_pred=expected_max_load(K, m), total_count=total_count))
            tied = shared_in_all_heads(slots, sizes, first_loads)     # (K,) bool
            result.append(OrderCollisions(
                layer=layer, n=n, keys=K, indistinguishable=int(np.count_nonzero(tied)),
                indistinguishable_weighted=int(counts[tied].sum()),
                indistinguishable_share_pred=expected_indistinguishable_share(K, sizes),
                total_count=total_count, heads=heads))
            progress("collisions", len(result), total, layer=layer, n=n)
    return CollisionReport(orders=result)


def sweep_collisions(ngrams_by_order: dict[int, np.ndarray], counts_by_order: dict[int, np.ndarray],
                     plan: TablePlan, sizes: list[int], *, layer_id: int | None = None, n_heads: int = 2,
                     progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Collision rate vs table size for one layer (default: the plan's first), measured and predicted.

    For each target size t in ``sizes`` a plan like ``plan`` but with ``n_heads`` heads per order
    and every order's target set to t (primes chosen by the same rule, same multipliers) is
    measured on the keys. Returns one row per (order, size): ``layer, n, target_size, heads, keys,
    slots_mean, colliding_share, colliding_share_weighted, colliding_share_pred, occupied_share,
    occupied_share_pred, max_load, max_load_pred, indistinguishable_share,
    indistinguishable_share_pred`` (per-head figures are means over the heads; max_load the largest).
    """
    progress = report(progress)
    layer = plan.layer_ids[0] if layer_id is None else plan._layer(layer_id)
    _check_inputs(ngrams_by_order, counts_by_order, plan)
    n_orders = plan.n_orders
    rows = []
    for i, t in enumerate(sizes):
        targets = (int(t),) * n_orders
        small = dataclasses.replace(
            plan, layer_ids=(layer,), n_head_per_ngram=n_heads, target_sizes=targets,
            multipliers={layer: plan.multipliers[layer]},
            primes=make_primes((layer,), plan.max_ngram_size, n_heads, targets))
        report_ = measure_collisions(ngrams_by_order, counts_by_order, small)
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
# plots (drawn through engram_cli.plotting: matplotlib imported lazily, no pyplot state)

_FONT_SIZE = 9.0  # these figures are wider than the gate pictures: a larger font keeps them readable


def plot_sweep(rows: list[dict[str, Any]], path_png: str | os.PathLike) -> list[str]:
    """Colliding share vs table size per order: measured (markers) and uniform prediction (line).
    Returns the plotting warnings (none expected: the labels are ASCII)."""
    from matplotlib.ticker import NullFormatter

    with plotting.figure(7.0, 4.5, font_size=_FONT_SIZE) as (fig, warnings):
        ax = fig.add_subplot(1, 1, 1)
        for i, n in enumerate(sorted({r["n"] for r in rows})):
            rs = sorted((r for r in rows if r["n"] == n), key=lambda r: r["slots_mean"])
            x = [r["slots_mean"] for r in rs]
            color = f"C{i}"
            ax.plot(x, [r["colliding_share_pred"] for r in rs], "-", color=color,
                    label=f"{n}-grams: uniform hashing ({rs[0]['keys']:,} keys)")
            ax.plot(x, [r["colliding_share"] for r in rs], "o", color=color, label=f"{n}-grams: measured")
            ax.plot(x, [r["colliding_share_weighted"] for r in rs], "x", color=color, alpha=0.6,
                    label=f"{n}-grams: measured, weighted by count")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())              # decade labels only: no overlaps
        ax.set_xlabel("slots per head (table size m)")
        ax.set_ylabel("share of distinct n-grams sharing their slot")
        layer = rows[0]["layer"] if rows else "?"
        heads = rows[0]["heads"] if rows else "?"
        ax.set_title(f"Collision rate vs table size (layer {layer}, mean over {heads} heads)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=_FONT_SIZE - 1)
        fig.tight_layout()
        warnings += plotting.save(fig, path_png)
    return warnings


def plot_slot_load_histogram(ngrams_by_order: dict[int, np.ndarray], plan: TablePlan,
                             path_png: str | os.PathLike, *, layer_id: int | None = None, head: int = 0) -> list[str]:
    """Slots per load (keys in a slot) for one head of each order, with the uniform prediction.

    Bars: measured number of slots holding L keys; line: m * P[Binomial(k, 1/m) = L], computed in
    log space. Log y axis, so the tail of heavily loaded slots stays visible. Returns the
    plotting warnings.
    """
    layer = plan.layer_ids[0] if layer_id is None else plan._layer(layer_id)
    orders = _check_inputs(ngrams_by_order, None, plan)
    with plotting.figure(4.2 * max(1, len(orders)), 4.0, font_size=_FONT_SIZE) as (fig, warnings):
        for i, n in enumerate(orders):
            ax = fig.add_subplot(1, len(orders), i + 1)
            keys = np.asarray(ngrams_by_order[n])
            K = keys.shape[0]
            m = plan.primes[layer][n - 2][head]
            slots = hash_keys(keys, plan, layer, n)[head]
            _, loads = np.unique(slots, return_counts=True)           # loads of the occupied slots
            hist = np.bincount(loads, minlength=1)                    # slots with load L, L = 0..max
            hist[0] = m - loads.shape[0]                              # empty slots
            L = np.arange(hist.shape[0])
            ax.bar(L, hist, width=0.8, color="C0", alpha=0.7, label="measured")
            Lp = np.arange(max(hist.shape[0], 1) + 2)
            log_choose = np.array([math.lgamma(K + 1) - math.lgamma(x + 1) - math.lgamma(K - x + 1)
                                   if x <= K else -np.inf for x in Lp])
            with np.errstate(divide="ignore", invalid="ignore"):
                log_pmf = log_choose + Lp * math.log(1 / m) + (K - Lp) * math.log1p(-1 / m)
            ax.plot(Lp, m * np.exp(log_pmf), "-o", color="C1", markersize=3, label="uniform hashing")
            ax.set_yscale("log")
            ax.set_xlabel("keys in a slot (load)")
            ax.set_ylabel("number of slots")
            ax.set_title(f"{n}-grams, layer {layer} head {head}\n{K:,} keys in {m:,} slots", fontsize=_FONT_SIZE)
            ax.legend(fontsize=_FONT_SIZE - 1)
        fig.tight_layout()
        warnings += plotting.save(fig, path_png)
    return warnings


__all__ = [
    "CollisionReport", "OrderCollisions", "HeadCollisions", "ROW_COLUMNS", "measure_collisions",
    "sweep_collisions", "plot_sweep", "plot_slot_load_histogram", "hash_keys", "shared_in_all_heads",
    "expected_occupied", "expected_max_load", "expected_indistinguishable_share",
]
