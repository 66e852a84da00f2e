"""Hot-row planning for offloaded tables: how many of a layer's rows serve most lookups.

Serving systems keep Engram tables in host memory or on SSD and cache the hottest rows on the
device. Lookups follow the n-grams' Zipf distribution, so a small cache serves most of them. From
the exact counts of build-tables this module computes, for every Engram layer, the share of the
corpus's lookups (token-weighted: an n-gram seen c times is looked up c times in each of its
order's heads) that the K hottest rows of the layer's table serve, for K from 10^3 up to the
table size.

Collisions are accounted for: a row's heat is the summed count of every n-gram hashed into it
(in that head), so two frequent n-grams sharing a row make one hot row, not two. The counts follow
the plan's document-boundary rule (``engram_cli.tables.boundary``), so the curve describes the lookups
the model makes over the corpus read as one stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from engram_cli.core import plotting
from engram_cli.core.progress import ProgressFn, report
from engram_cli.tables.collisions import hash_keys
from engram_cli.tables.plan import TablePlan, row_bytes

#: the shares the report names the cache size for
HEADLINE_SHARES = (0.5, 0.9, 0.99)


@dataclass
class HotRowCurve:
    """One layer: the share of lookups the K hottest rows serve, at log-spaced K."""

    layer: int
    rows: int                    # rows of the layer's table (all heads of all orders)
    lookups: int                 # token-weighted lookups of the counted n-grams, all heads
    used_rows: int               # rows looked up at least once
    k: list[int]                 # cache sizes (rows), ascending, the last = rows
    share: list[float]           # share of lookups served by the k hottest rows
    rows_for: dict[float, int]   # HEADLINE_SHARES -> smallest cache serving that share

    def to_rows(self) -> list[dict[str, Any]]:
        return [{"layer": self.layer, "cache_rows": k, "lookup_share": s} for k, s in zip(self.k, self.share)]


def row_heat(ngrams_by_order: dict[int, np.ndarray], counts_by_order: dict[int, np.ndarray], plan: TablePlan,
             layer_id: int) -> np.ndarray:
    """Heat of every used row of the layer's concatenated table (unsorted, zeros dropped)."""
    heats = []  # rows of different heads are different rows: their heats never add up
    H = plan.n_head_per_ngram
    for n in sorted(ngrams_by_order):
        keys = np.asarray(ngrams_by_order[n])
        if keys.shape[0] == 0:
            continue
        counts = np.asarray(counts_by_order[n], dtype=np.int64)
        slots = hash_keys(keys, plan, layer_id, n)                  # (H_n, K)
        for h in range(H):
            size = plan.primes[layer_id][n - 2][h]
            heats.append(_slot_sums(slots[h], counts, size))
    return np.concatenate(heats) if heats else np.zeros(0, dtype=np.int64)


def _slot_sums(slots: np.ndarray, counts: np.ndarray, size: int) -> np.ndarray:
    """Summed counts per used slot of one head (dense bincount when the table is small enough)."""
    if size <= 8 * slots.shape[0] + (1 << 22):
        sums = np.bincount(slots, weights=counts, minlength=size)
        return sums[sums > 0].astype(np.int64)
    order = np.argsort(slots, kind="stable")
    s = slots[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return np.add.reduceat(counts[order], starts).astype(np.int64)


def _served(heat: np.ndarray) -> np.ndarray:
    """Lookups served by the k hottest rows, k = 1..len(heat): the cumulative sum of the heats
    sorted hottest first (float64)."""
    return np.cumsum(np.sort(heat)[::-1], dtype=np.float64)


def cache_curve(heat: np.ndarray, rows: int, points: int = 64, *, served: np.ndarray | None = None
                ) -> tuple[list[int], list[float]]:
    """(K, share of lookups served by the K hottest rows) at log-spaced K from 10^3 to ``rows``.
    ``served`` is ``_served(heat)`` when already computed."""
    cum = _served(heat) if served is None else served
    total = float(cum[-1]) if cum.size else 0.0
    start = min(1000, rows)
    ks = np.unique(np.geomspace(start, rows, points).astype(np.int64)) if rows > start else np.array([rows])
    served_k = [float(cum[min(k, cum.size) - 1]) / total if total and cum.size else 0.0 for k in ks]
    return ks.tolist(), served_k


def rows_for_share(heat: np.ndarray, share: float, *, served: np.ndarray | None = None) -> int:
    """The smallest number of hottest rows that serve at least ``share`` of the lookups."""
    cum = _served(heat) if served is None else served
    if not cum.size or cum[-1] == 0:
        return 0
    return int(np.searchsorted(cum, share * cum[-1] - 1e-9 * cum[-1]) + 1)


def hot_row_curves(ngrams_by_order: dict[int, np.ndarray], counts_by_order: dict[int, np.ndarray], plan: TablePlan,
                   progress: ProgressFn | None = None, *, heat: dict[int, np.ndarray] | None = None) -> list[HotRowCurve]:
    """One :class:`HotRowCurve` per Engram layer of ``plan``. ``heat`` (layer -> row heats) when
    already measured (:attr:`engram_cli.tables.collisions.TableMeasurement.row_heat`), else :func:`row_heat`."""
    progress = report(progress)
    curves = []
    for i, layer in enumerate(plan.layer_ids):
        h = heat[layer] if heat is not None else row_heat(ngrams_by_order, counts_by_order, plan, layer)
        rows = plan.total_slots(layer)
        served = _served(h)                                        # one sort per layer
        k, share = cache_curve(h, rows, served=served)
        curves.append(HotRowCurve(layer=layer, rows=rows, lookups=int(h.sum()), used_rows=int(h.size), k=k,
                                  share=share,
                                  rows_for={s: rows_for_share(h, s, served=served) for s in HEADLINE_SHARES}))
        progress("hot rows", i + 1, len(plan.layer_ids), layer=layer)
    return curves


def cache_lines(curves: list[HotRowCurve], plan: TablePlan, dtype: str) -> list[str]:
    """The curves in words: "layer 1: a cache of 1.2M rows (300.0 MiB at fp8) serves 90% of this
    corpus's lookups, 4.8M rows (1.2 GiB) 99%; ..."."""
    rb = row_bytes(dtype, plan.embed_dim_per_head)
    lines = []
    for c in curves:
        parts = [f"{_count(n)} rows ({_size(n * rb)}{f' at {dtype}' if i == 0 else ''}) "
                 f"{'serves ' if i == 0 else ''}{s:.0%}{' of this corpus’s lookups' if i == 0 else ''}"
                 for i, (s, n) in enumerate(c.rows_for.items())]
        lines.append(f"layer {c.layer}: a cache of " + ", ".join(parts)
                     + f"; {c.used_rows:,} of its {c.rows:,} rows are ever looked up")
    return lines


def plot_hot_rows(curves: list[HotRowCurve], dtype: str, plan: TablePlan, path_png: str | os.PathLike) -> list[str]:
    """Lookup share served against cache size (log x), one line per layer; returns plot warnings."""

    rb = row_bytes(dtype, plan.embed_dim_per_head)
    with plotting.figure(6.5, 4.0, font_size=8.0) as (fig, warnings):
        ax = fig.add_subplot(1, 1, 1)
        for i, c in enumerate(curves):
            ax.plot(c.k, c.share, "-", color=f"C{i}", label=f"layer {c.layer} ({c.rows:,} rows)")
            for s, n in c.rows_for.items():
                if n:
                    ax.plot([n], [s], "o", color=f"C{i}", ms=3)
                    ax.annotate(f"{_count(n)} rows, {_size(n * rb)}", (n, s), textcoords="offset points",
                                xytext=(4, -10), fontsize=6.5, color=f"C{i}")
        ax.set_xscale("log")
        plotting.log_axis(ax.xaxis)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("cache size: hottest rows kept on the device")
        ax.set_ylabel("share of lookups served")
        ax.set_title(f"Hot-row cache: lookups served by the K hottest rows ({dtype} rows of "
                     f"{plan.embed_dim_per_head} dims)", y=1.0)                 # a fixed place: no layout pass
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
        plotting.margins(fig, left=0.55, right=0.2, bottom=0.45, top=0.3)
        warnings += plotting.save(fig, path_png, crop=False)
    return warnings


def _count(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _size(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)
