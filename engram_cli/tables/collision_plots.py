"""The pictures of build-tables' collision report, drawn through ``engram_cli.core.plotting``:
collision rate against table size (``--sweep``) and the slot-load histogram of one head."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from matplotlib.ticker import NullFormatter

from engram_cli.core import plotting
from engram_cli.tables.collisions import check_inputs, slot_load_hist
from engram_cli.tables.plan import TablePlan

_FONT_SIZE = 9.0  # these figures are wider than the gate pictures: a larger font keeps them readable


def plot_sweep(rows: list[dict[str, Any]], path_png: str | os.PathLike) -> list[str]:
    """Colliding share vs table size per order: measured (markers) and uniform prediction (line).
    Returns the plotting warnings (none expected: the labels are ASCII)."""

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
                             path_png: str | os.PathLike, *, layer_id: int | None = None, head: int = 0,
                             hists: dict[int, np.ndarray] | None = None) -> list[str]:
    """Slots per load (keys in a slot) for one head of each order, with the uniform prediction.

    Bars: measured number of slots holding L keys (``hists``, per order, when already measured:
    :attr:`TableMeasurement.slot_load_hist`; else :func:`slot_load_hist`); line: m * P[Binomial(k,
    1/m) = L], computed in log space. Log y axis, so the tail of heavily loaded slots stays
    visible. Returns the plotting warnings.
    """
    layer = plan.layer_ids[0] if layer_id is None else plan.checked_layer(layer_id)
    orders = check_inputs(ngrams_by_order, None, plan)
    with plotting.figure(4.2 * max(1, len(orders)), 4.0, font_size=_FONT_SIZE) as (fig, warnings):
        for i, n in enumerate(orders):
            ax = fig.add_subplot(1, len(orders), i + 1)
            keys = np.asarray(ngrams_by_order[n])
            K = keys.shape[0]
            m = plan.primes[layer][n - 2][head]
            hist = hists[n] if hists is not None else slot_load_hist(keys, plan, layer, n, head)
            L = np.arange(hist.shape[0])
            ax.bar(L, hist, width=0.8, color="C0", alpha=0.7, label="measured")
            Lp = np.arange(max(hist.shape[0], 1) + 2)
            log_choose = np.array([math.lgamma(K + 1) - math.lgamma(x + 1) - math.lgamma(K - x + 1)
                                   if x <= K else -np.inf for x in Lp])
            with np.errstate(divide="ignore", invalid="ignore"):
                log_pmf = log_choose + Lp * math.log(1 / m) + (K - Lp) * math.log1p(-1 / m)
            ax.plot(Lp, m * np.exp(log_pmf), "-o", color="C1", markersize=3, label="uniform hashing")
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.1)                                   # below 0.1 slot the prediction says nothing
            plotting.log_axis(ax.yaxis)
            ax.set_xlabel("keys in a slot (load)")
            ax.set_ylabel("number of slots")
            ax.set_title(f"{n}-grams, layer {layer} head {head}\n{K:,} keys in {m:,} slots", fontsize=_FONT_SIZE,
                         y=1.0)                                       # a fixed place: no layout pass
            ax.legend(fontsize=_FONT_SIZE - 1, loc="upper right")
        plotting.margins(fig, left=0.6, right=0.15, bottom=0.45, top=0.5, wspace=0.7)
        warnings += plotting.save(fig, path_png, crop=False)
    return warnings
