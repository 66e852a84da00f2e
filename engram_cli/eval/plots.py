"""The picture of ``engram eval``: loss by bucket, runs side by side, and the knockout deltas,
drawn through ``engram_cli.core.plotting`` (matplotlib is imported only here, when drawing)."""

from __future__ import annotations

import os

import numpy as np

from engram_cli.core import plotting
from engram_cli.eval.config import COUNT_BUCKETS, KIND_COUNT, KIND_SCRIPT, SCRIPT_BUCKETS

PANEL_W, PANEL_H = 3.4, 1.9   # inches per panel
LEGEND_COLUMNS = 4            # legend entries per row (the legend sits in a band under the panels)
LEGEND_ROW = 0.17             # inches per legend row


def _compact(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


def plot_eval(result, png: str | os.PathLike | None, svg: str | os.PathLike | None = None) -> list[str]:
    """Loss (nats/token) by training-count bucket and by script, one bar per run; with a knockout
    a mark at the loss without Engram on each bar and a second row of the deltas. Returns warnings."""
    runs = result.runs
    kinds = ((KIND_COUNT, COUNT_BUCKETS, f"training count of the {result.bucket_n}-gram (context + target)"),
             (KIND_SCRIPT, SCRIPT_BUCKETS, "script of the target token"))
    knockout = result.knockout is not None
    rows = 2 if knockout else 1
    entries = len(runs) + knockout                           # legend entries, in a band under the panels
    legend_rows = -(-entries // LEGEND_COLUMNS)
    band = LEGEND_ROW * legend_rows + 0.05
    height = PANEL_H * rows + plotting.TITLE_BAND + band
    with plotting.figure(PANEL_W * 2, height, texts=[r.label for r in runs]) as (fig, warns):
        axes = np.asarray(fig.subplots(rows, 2, squeeze=False))
        for col, (kind, names, xlabel) in enumerate(kinds):
            _bars(axes[0, col], runs, kind, names, "loss", knockout)
            axes[0, col].set_title(f"by {xlabel}", fontsize=7, loc="left")
            axes[0, col].set_ylabel("loss (nats/token)")
            if knockout:
                _bars(axes[1, col], runs, kind, names, "delta", False)
                axes[1, col].axhline(0, color="0.3", lw=0.6)
                axes[1, col].set_ylabel("Δ nats/token without Engram")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=6, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 0.005),
                   ncol=min(len(labels), LEGEND_COLUMNS))
        what = "held-out split of each run" if result.text == "held-out" else "the given corpus"
        sub = f"{what} · tokens per bucket under the bars" + (" · Δ with its 95% interval over windows"
                                                              if knockout else "")
        left, _, right, top = plotting.titles(fig, "Where the memory pays: loss by bucket", sub)
        fig.tight_layout(rect=(left, band / height, right, top))
        warns += plotting.save(fig, png, svg)
    return warns


def _bars(ax, runs, kind: str, names, field: str, mark_knockout: bool) -> None:
    """Grouped bars of ``field`` (``loss`` or ``delta``) per bucket, one colour per run."""
    x = np.arange(len(names))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        got = [r.bucket(kind, name) for name in names]
        pos = x - 0.4 + width * (i + 0.5)
        vals = np.array([getattr(b, field) if b.tokens and getattr(b, field) is not None else np.nan for b in got])
        shown = ~np.isnan(vals)
        err = None
        if field == "delta":  # the 95% interval as error bars
            ci = np.array([b.delta_ci95 if b.delta_ci95 else (np.nan, np.nan) for b in got], dtype=float)
            err = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))[:, shown]
            err = np.nan_to_num(err)
        ax.bar(pos[shown], vals[shown], width * 0.9, color=f"C{i}", label=r.label, yerr=err,
               error_kw={"elinewidth": 0.7, "capsize": 1.5, "ecolor": "0.25"})
        if mark_knockout:
            ko = np.array([b.knockout_loss if b.tokens else np.nan for b in got], dtype=float)
            ok = ~np.isnan(ko)
            ax.scatter(pos[ok], ko[ok], marker="_", s=60, color="black", linewidths=1.2, zorder=3,
                       label="loss without Engram" if i == 0 else None)
    # tokens per bucket: one number when every run scored the same text, else one per run
    per_run = [[_compact(r.bucket(kind, name).tokens) for r in runs] for name in names]
    counts = [c[0] if len(set(c)) == 1 else "/".join(c) for c in per_run]
    ax.set_xticks(x, [f"{name}\n{c}" for name, c in zip(names, counts)], fontsize=6)
    ax.spines[["top", "right"]].set_visible(False)
