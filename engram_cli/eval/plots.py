"""The picture of ``engram eval``: loss by bucket, runs side by side, the knockout deltas and the
deltas of the tables at another dtype, drawn through ``engram_cli.core.plotting`` (matplotlib is imported only here, when drawing)."""

from __future__ import annotations

import os

import numpy as np

from engram_cli.core import plotting
from engram_cli.eval.config import (
    COUNT_BUCKETS,
    KIND_COUNT,
    KIND_EXPOSURE,
    KIND_SCRIPT,
    REFERENCE_DTYPE,
    SCRIPT_BUCKETS,
)

PANEL_W, PANEL_H = 3.4, 1.9   # inches per panel
LEGEND_COLUMNS = 4            # legend entries per row (the legend sits in a band under the panels)
LEGEND_ROW = 0.17             # inches per legend row


def _compact(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


def plot_eval(result, png: str | os.PathLike | None, svg: str | os.PathLike | None = None) -> list[str]:
    """Loss (nats/token) by training-count bucket, by script and by collision exposure (when a run
    has tables), one bar per run; with a knockout a mark at the loss without Engram on each bar and
    a row of its deltas; with a table dtype a row of the deltas of the tables at that dtype.
    Returns warnings."""
    runs = result.runs
    kinds = [(KIND_COUNT, COUNT_BUCKETS, f"training count of the {result.bucket_n}-gram (context + target)"),
             (KIND_SCRIPT, SCRIPT_BUCKETS, "script of the target token")]
    exposure = exposure_names(runs)
    if exposure:
        layers = sorted({r.exposure_layer for r in runs if r.exposure_layer is not None})
        kinds.append((KIND_EXPOSURE, exposure, f"collision exposure (heads of layer {'/'.join(map(str, layers))} "
                                               "whose row holds a more frequent n-gram)"))
    knockout = result.knockout is not None
    quant = result.table_dtype != REFERENCE_DTYPE
    deltas = ([("delta", "Δ nats/token without Engram")] if knockout else []) + (
        [("quant_delta", f"Δ nats/token at {result.table_dtype}")] if quant else [])
    rows = 1 + len(deltas)
    cols = len(kinds)
    entries = len(runs) + knockout                           # legend entries, in a band under the panels
    legend_rows = -(-entries // LEGEND_COLUMNS)
    band = LEGEND_ROW * legend_rows + 0.05
    height = PANEL_H * rows + plotting.TITLE_BAND + band
    with plotting.figure(PANEL_W * cols, height, texts=[r.label for r in runs]) as (fig, warns):
        axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
        for col, (kind, names, xlabel) in enumerate(kinds):
            _bars(axes[0, col], runs, kind, names, "loss", knockout)
            axes[0, col].set_title(f"by {xlabel}", fontsize=7, loc="left")
            axes[0, col].set_ylabel("loss (nats/token)")
            for row, (field, ylabel) in enumerate(deltas, start=1):
                _bars(axes[row, col], runs, kind, names, field, False)
                axes[row, col].axhline(0, color="0.3", lw=0.6)
                axes[row, col].set_ylabel(ylabel)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=6, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 0.005),
                   ncol=min(len(labels), LEGEND_COLUMNS))
        what = "held-out split of each run" if result.text == "held-out" else "the given corpus"
        sub = f"{what} · tokens per bucket under the bars" + (" · Δ with its 95% interval over windows"
                                                              if deltas else "")
        left, _, right, top = plotting.titles(fig, "Where the memory pays: loss by bucket", sub)
        fig.tight_layout(rect=(left, band / height, right, top))
        warns += plotting.save(fig, png, svg)
    return warns


def exposure_names(runs) -> tuple[str, ...]:
    """The exposure buckets of the run with the most heads ("0" .. "H"); empty when no run has tables."""
    return tuple(str(k) for k in range(max(r.exposure_heads for r in runs) + 1)) \
        if any(r.exposure_layer is not None for r in runs) else ()


def _bars(ax, runs, kind: str, names, field: str, mark_knockout: bool) -> None:
    """Grouped bars of ``field`` (``loss``, ``delta`` or ``quant_delta``) per bucket, one colour per
    run; a bucket a run does not have (exposure beyond its heads) is left empty."""
    x = np.arange(len(names))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        got = [r.find_bucket(kind, name) for name in names]
        pos = x - 0.4 + width * (i + 0.5)
        vals = np.array([getattr(b, field) if b is not None and b.tokens and getattr(b, field) is not None
                         else np.nan for b in got], dtype=float)
        shown = ~np.isnan(vals)
        err = None
        if field != "loss":  # the 95% interval as error bars
            ci = np.array([getattr(b, field + "_ci95") or (np.nan, np.nan) if b is not None else (np.nan, np.nan)
                           for b in got], dtype=float)
            err = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))[:, shown]
            err = np.nan_to_num(err)
        ax.bar(pos[shown], vals[shown], width * 0.9, color=f"C{i}", label=r.label, yerr=err,
               error_kw={"elinewidth": 0.7, "capsize": 1.5, "ecolor": "0.25"})
        if mark_knockout:
            ko = np.array([b.knockout_loss if b is not None and b.tokens else np.nan for b in got], dtype=float)
            ok = ~np.isnan(ko)
            ax.scatter(pos[ok], ko[ok], marker="_", s=60, color="black", linewidths=1.2, zorder=3,
                       label="loss without Engram" if i == 0 else None)
    # tokens per bucket: one number when every run scored the same text, else one per run
    per_run = [[_compact(b.tokens) if (b := r.find_bucket(kind, name)) is not None else "–" for r in runs]
               for name in names]
    counts = [c[0] if len(set(c)) == 1 else "/".join(c) for c in per_run]
    ax.set_xticks(x, [f"{name}\n{c}" for name, c in zip(names, counts)], fontsize=6)
    ax.spines[["top", "right"]].set_visible(False)
