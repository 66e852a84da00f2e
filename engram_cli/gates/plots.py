"""The pictures of ``engram inspect-gates``: the gate heatmap of a text (one run or several
stacked), the gate histogram and the mean gate by token frequency of a corpus.

Drawn through :mod:`engram_cli.core.plotting` (style, CJK font, saving); matplotlib is imported only
when a picture is drawn. Every function returns its warnings (e.g. no CJK font) instead of
printing them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.ticker import FixedLocator, NullLocator

from engram_cli.core import plotting
from engram_cli.core.errors import ConfigError
from engram_cli.core.text import display_token, is_cjk
from engram_cli.gates.forward import GateTrace

# ---------------------------------------------------------------------------------------------
# the heatmap: tokens along x, layers (branches) along y, wrapped into rows of panels


def _tick_label(text: str) -> tuple[str, bool]:
    """The x tick label of a token and whether it is set upright (CJK: characters stacked)."""
    shown = display_token(text, max_len=12)
    if shown and all(is_cjk(ch) for ch in shown):
        return "\n".join(shown[:6]), True
    return shown, False


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass
class _HeatmapLayout:
    """Geometry of the heatmap in inches; the token labels of each panel row get the height of
    its longest label."""

    chunks: list[tuple[int, int]]      # [start, end) tokens of each panel row
    labels: list[tuple[str, bool]]     # tick label of every token, upright or not
    run_names: list[tuple[str, str]]   # (name, "step N") of every trace
    left: float
    wrap: int
    label_h: list[float]               # per panel row: height of its tick labels
    trace_h: list[float]               # per trace: height of its rows
    panels_h: float                    # height of one panel row (all traces)
    width: float
    height: float
    cell_w: float = 0.2
    row_h: float = 0.22
    trace_gap: float = 0.08
    chunk_gap: float = 0.16
    right: float = 0.85
    top: float = 0.36

    @classmethod
    def of(cls, traces: Sequence[GateTrace], wrap: int) -> _HeatmapLayout:
        tokens = traces[0].tokens
        T = len(tokens)
        wrap = max(1, min(wrap, T))
        chunks = [(s, min(s + wrap, T)) for s in range(0, T, wrap)]
        labels = [_tick_label(t) for t in tokens]
        run_names = [(_short(t.model, 22), "" if t.step is None else f"step {t.step}") for t in traces]
        left = 0.3 + 0.045 * max(len(lab) for t in traces for lab in t.row_labels)
        if len(traces) > 1:
            left += 0.1 + 0.052 * max(len(part) for name in run_names for part in name)

        def label_height(lab: str, upright: bool) -> float:
            return 0.11 * (lab.count("\n") + 1) if upright else 0.058 * len(lab)

        label_h = [0.12 + max(label_height(*labels[i]) for i in range(s, e)) for s, e in chunks]
        lay = cls(chunks=chunks, labels=labels, run_names=run_names, left=left, wrap=wrap, label_h=label_h,
                  trace_h=[], panels_h=0.0, width=0.0, height=0.0)
        lay.trace_h = [len(t.row_labels) * lay.row_h for t in traces]
        lay.panels_h = sum(lay.trace_h) + lay.trace_gap * (len(traces) - 1)
        lay.width = left + wrap * lay.cell_w + lay.right
        lay.height = (lay.top + len(chunks) * lay.panels_h + sum(label_h) + (len(chunks) - 1) * lay.chunk_gap
                      + 0.05)
        return lay

    def axes(self, fig, x: float, y_top: float, w: float, h: float):
        """Axes at ``x`` inches from the left, ``y_top`` inches from the top."""
        return fig.add_axes((x / self.width, 1 - (y_top + h) / self.height, w / self.width, h / self.height))


def plot_gate_heatmap(traces: Sequence[GateTrace], path_png: str | os.PathLike | None,
                      path_svg: str | os.PathLike | None = None, *, wrap: int = 40) -> list[str]:
    """Heatmap of the gates of one or more traces on the same tokens: PNG (DPI 200) and/or SVG.

    Tokens run along x (their text below, whitespace made visible), wrapped every ``wrap``
    tokens into rows of panels; each panel stacks the layer (branch) rows of every trace, so
    compared runs share the token axis; one colour bar 0..1 (viridis). Returns warnings (e.g.
    no CJK font installed) instead of printing them.
    """
    if not traces:
        raise ConfigError("nothing to plot", "pass at least one trace")
    if any(t.tokens != traces[0].tokens for t in traces[1:]):
        raise ConfigError("the traces to compare have different tokens", "inspect the same text with one tokenizer")
    lay = _HeatmapLayout.of(traces, wrap)
    texts = [lab for lab, _ in lay.labels] + [t.model for t in traces]
    with plotting.figure(lay.width, lay.height, texts=texts) as (fig, warnings):
        y, first_mesh = lay.top, None
        for c, (s, e) in enumerate(lay.chunks):
            for k in range(len(traces)):
                mesh = _draw_panel(fig, lay, traces, k, s, e, y)
                first_mesh = mesh if first_mesh is None else first_mesh
                y += lay.trace_h[k] + (lay.trace_gap if k < len(traces) - 1 else 0)
            if len(lay.chunks) > 1:  # index of the row's first token, at its left
                fig.text((lay.left - 0.05) / lay.width, 1 - (y + 0.1) / lay.height, f"{s}", fontsize=5.5,
                         color="0.5", ha="right", va="top")
            y += lay.label_h[c] + lay.chunk_gap
        _heatmap_colorbar_and_titles(fig, lay, traces, first_mesh)
        warnings += plotting.save(fig, path_png, path_svg)
    return warnings


def _draw_panel(fig, lay: _HeatmapLayout, traces: Sequence[GateTrace], k: int, s: int, e: int, y: float):
    """The rows of trace ``k`` over tokens [s, e), its top at ``y`` inches; token labels below
    the last trace of the panel row. Returns the colour mesh."""

    trace = traces[k]
    ax = lay.axes(fig, lay.left, y, (e - s) * lay.cell_w, lay.trace_h[k])
    data = trace.gates[:, s:e]  # (R, n)
    mesh = ax.pcolormesh(np.arange(e - s + 1), np.arange(data.shape[0] + 1), data, cmap=colormaps[plotting.COLORMAP],
                         norm=Normalize(0.0, 1.0), edgecolors="white", linewidth=0.5, antialiased=False,
                         rasterized=False)
    ax.set_xlim(0, e - s)
    ax.set_ylim(data.shape[0], 0)
    ax.set_yticks(np.arange(data.shape[0]) + 0.5, trace.row_labels)
    ax.tick_params(axis="both", length=0, pad=2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if len(traces) > 1:
        name, step = lay.run_names[k]
        ax.set_ylabel(name + ("\n" + step if step else ""), fontsize=6.5, rotation=0, ha="right",
                      va="center", labelpad=5, color="0.2", linespacing=1.3)
    if k < len(traces) - 1:
        ax.set_xticks([])
        return mesh
    ax.set_xticks(np.arange(e - s) + 0.5)
    ax.set_xticklabels([lay.labels[i][0] for i in range(s, e)])
    for tick, i in zip(ax.get_xticklabels(), range(s, e)):
        tick.set_rotation(0 if lay.labels[i][1] else 90)
        tick.set_verticalalignment("top")
        tick.set_horizontalalignment("center")
        tick.set_linespacing(0.95)
    return mesh


def _heatmap_colorbar_and_titles(fig, lay: _HeatmapLayout, traces: Sequence[GateTrace], mesh) -> None:
    """One colour bar beside the first panel row; the title (runs and steps) and the subtitle."""
    bar_h = min(max(lay.panels_h, 0.9), 2.4)
    cax = lay.axes(fig, lay.left + lay.wrap * lay.cell_w + 0.18, lay.top, 0.1, bar_h)
    cb = fig.colorbar(mesh, cax=cax, ticks=[0, 0.25, 0.5, 0.75, 1.0])
    cb.outline.set_linewidth(0.4)
    cb.ax.tick_params(length=2, width=0.4, labelsize=6)
    cb.set_label("gate α", fontsize=7, labelpad=3)
    title = "Engram gate α — " + " vs ".join(t.label for t in traces)
    fig.text(lay.left / lay.width, 1 - 0.12 / lay.height, title, fontsize=8.5, fontweight="bold", ha="left",
             va="top")
    sub = f"{len(traces[0].tokens)} tokens · Engram layers {', '.join(str(i) for i in traces[0].layer_ids)}"
    if traces[0].hc_mult > 1:
        sub += f" · {traces[0].hc_mult} hyper-connection branches"
    fig.text(lay.left / lay.width, 1 - 0.27 / lay.height, sub, fontsize=6.5, color="0.35", ha="left", va="top")


# ---------------------------------------------------------------------------------------------
# corpus mode: the gate histogram and the gate by token frequency


def plot_gate_histogram(hist: np.ndarray, labels: list[str], path_png: str | os.PathLike, *, title: str,
                        subtitle: str = "") -> list[str]:
    """One panel per Engram layer: the share of tokens per gate bin (branches overlaid), with the mean."""
    layers: dict[str, list[int]] = {}
    for r, lab in enumerate(labels):
        layers.setdefault(lab.split(".")[0], []).append(r)
    size = (max(0.5 + 2.3 * len(layers), 3.6), 2.0 + plotting.TITLE_BAND)
    with plotting.figure(*size, texts=[title]) as (fig, warnings):
        axs = fig.subplots(1, len(layers), sharey=True, squeeze=False)[0]
        for ax, (layer, rows) in zip(axs, layers.items()):
            for j, r in enumerate(rows):
                _histogram_row(ax, hist[r], j, labels[r].split(".")[1] if len(rows) > 1 else None)
            ax.set_title(f"layer {layer[1:]}", fontsize=7.5)
            ax.set_xlim(0, 1)
            ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "0.25", "0.5", "0.75", "1"])
            ax.set_xlabel("gate α")
            ax.spines[["top", "right"]].set_visible(False)
            if len(rows) > 1:
                ax.legend(fontsize=6, frameon=False, loc="upper left")
        axs[0].set_ylabel("share of tokens (%)")
        fig.tight_layout(pad=0.4, w_pad=1.5, rect=plotting.titles(fig, title, subtitle))
        warnings += plotting.save(fig, path_png)
    return warnings


def _histogram_row(ax, counts: np.ndarray, j: int, branch: str | None) -> None:
    """One gate row's histogram in ``ax``: bars (a layer without branches) or the ``j``-th
    branch's outline, and its mean as a dashed line with a label."""

    bins = counts.shape[0]
    edges = np.linspace(0, 1, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    total = max(int(counts.sum()), 1)
    share = counts / total * 100
    mean = float((counts * centers).sum() / total)
    colors = plotting.LINE_COLORS
    color = colors[j % len(colors)] if branch is not None else colormaps[plotting.COLORMAP](0.35)
    if branch is None:
        ax.bar(centers, share, width=1 / bins, color=color, edgecolor="none", alpha=0.9)
    else:
        ax.stairs(share, edges, color=color, linewidth=1.0, label=branch)
    ax.axvline(mean, color="0.15" if branch is None else color, linestyle="--", linewidth=0.7)
    ax.text(mean + (0.015 if mean < 0.7 else -0.015), 0.98 - 0.1 * j, f"mean {mean:.2f}",
            transform=ax.get_xaxis_transform(), fontsize=6, va="top", ha="left" if mean < 0.7 else "right",
            color="0.15" if branch is None else color,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.8, "alpha": 0.85})


def plot_gate_by_frequency(rows: list[dict[str, Any]], labels: list[str], path_png: str | os.PathLike, *,
                           title: str, subtitle: str = "") -> list[str]:
    """Mean gate (± one standard deviation) by token-frequency bucket, and the tokens per bucket."""

    with plotting.figure(4.6, 3.2 + plotting.TITLE_BAND, texts=[title]) as (fig, warnings):
        top_ax, bottom_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.6, 1]})
        xs_all: list[float] = []
        for j, lab in enumerate(labels):
            mine = [r for r in rows if r["row"] == lab]
            if not mine:
                continue
            x = np.array([math.sqrt(r["freq_lo"] * r["freq_hi"]) for r in mine])
            m = np.array([r["mean_gate"] for r in mine])
            sd = np.array([r["std_gate"] for r in mine])
            color = plotting.LINE_COLORS[j % len(plotting.LINE_COLORS)]
            top_ax.fill_between(x, np.clip(m - sd, 0, 1), np.clip(m + sd, 0, 1), color=color, alpha=0.1, linewidth=0)
            top_ax.plot(x, m, marker="o", markersize=2.8, linewidth=1.1, color=color, label=lab)
            xs_all = list(x)
            if j == 0:
                share = np.array([r["tokens"] for r in mine], dtype=float)
                bottom_ax.bar(x, share / share.sum() * 100, width=x * 0.55, color="0.55", edgecolor="none")
        top_ax.set_xscale("log", base=2)
        top_ax.set_ylim(0, 1)
        top_ax.set_ylabel("mean gate α")
        top_ax.legend(fontsize=6, frameon=False, ncol=min(4, len(labels)), loc="lower right")
        top_ax.grid(axis="y", linewidth=0.3, color="0.85")
        bottom_ax.set_ylabel("tokens (%)")
        bottom_ax.set_xlabel("frequency of the token in the corpus (log scale)")
        if xs_all:
            bottom_ax.xaxis.set_major_locator(FixedLocator(xs_all))
            bottom_ax.xaxis.set_minor_locator(NullLocator())
            bottom_ax.set_xticklabels([_freq_label(r) for r in rows if r["row"] == labels[0]], rotation=45,
                                      ha="right", fontsize=5.5)
        for ax in (top_ax, bottom_ax):
            ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout(pad=0.4, h_pad=0.3, rect=plotting.titles(fig, title, subtitle))
        warnings += plotting.save(fig, path_png)
    return warnings


def _freq_label(row: dict[str, Any]) -> str:
    lo, hi = row["freq_lo"], row["freq_hi"]
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"
