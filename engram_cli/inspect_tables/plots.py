"""The report's pictures, drawn through ``engram_cli.core.plotting``: norm and movement of every row
against the summed count of its n-grams (hexbin), and the singular values of each head."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from engram_cli.core import plotting
from engram_cli.inspect_tables.survey import LayerSurvey


def plot_norm_vs_count(layers: Sequence[LayerSurvey], png: str | os.PathLike) -> list[str]:
    """One row of two hexbins per layer: row norm and row movement against 1 + summed count (log)."""
    with plotting.figure(6.4, 2.4 * len(layers) + 0.4) as (fig, warnings):
        for i, s in enumerate(layers):
            x = np.log10(s.count.astype(np.float64) + 1.0)
            for j, (y, what) in enumerate(((s.norm, "row norm"), (s.movement, "movement from init"))):
                ax = fig.add_subplot(len(layers), 2, 2 * i + j + 1)
                hb = ax.hexbin(x, y, gridsize=40, bins="log", mincnt=1, cmap=plotting.COLORMAP, linewidths=0)
                ax.set_xlabel("log10(1 + summed count of the row's n-grams)")
                ax.set_ylabel(what)
                ax.set_title(f"layer {s.layer}: {what}", fontsize=7, loc="left")
                fig.colorbar(hb, ax=ax, label="rows")
        fig.tight_layout(rect=plotting.titles(fig, "Norm and movement of every row against its corpus count",
                                              "rows with count 0 hold no n-gram of the tables' corpus"))
        warnings += plotting.save(fig, png, crop=False)
    return warnings


def plot_spectrum(layers: Sequence[LayerSurvey], png: str | os.PathLike) -> list[str]:
    """Per layer: every head's singular values (updated rows, normalized to the largest), trained
    (solid) and the same rows at their initial values (dashed)."""
    with plotting.figure(3.4 * len(layers) + 0.2, 2.8) as (fig, warnings):
        for i, s in enumerate(layers):
            ax = fig.add_subplot(1, len(layers), i + 1)
            for k, h in enumerate(s.heads):
                c = f"C{k % len(plotting.LINE_COLORS)}"
                for sv, ls in ((h.singular_values, "-"), (h.singular_values_init, "--")):
                    sv = np.asarray(sv)
                    if sv.size and sv[0] > 0:
                        ax.plot(np.arange(1, sv.size + 1), sv / sv[0], ls, color=c, lw=0.8,
                                label=f"head {h.head} (n={h.n})" if ls == "-" else None)
            ax.set_xlabel("index")
            ax.set_ylabel("singular value / largest")
            ax.set_title(f"layer {s.layer}", fontsize=7, loc="left")
            ax.legend(fontsize=5, frameon=False)
        fig.tight_layout(rect=plotting.titles(fig, "Spectrum of the updated rows per head",
                                              "solid: trained; dashed: the same rows at their initial values"))
        warnings += plotting.save(fig, png, crop=False)
    return warnings
