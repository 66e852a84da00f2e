"""The sweep's pictures (drawn through ``engram_cli.core.plotting``).

* ``sweep.png``/``.svg``: validation loss of every run (one marker each), the mean over the seeds
  and a band from the lowest to the highest seed —

  - allocation: against the allocation ratio rho, the paper's Figure 3, with the parameter
    counts in the legend;
  - memory: against the table rows on a log axis with the fitted power law and its exponent,
    the backbone without Engram as a horizontal band and the one-row-per-head control (the
    paper's Figure 4);
  - grid: per grid cell, beside the reference cell's mean;

* ``loss_curves.png``: every run's training and validation loss against tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engram_cli.core import plotting
from engram_cli.core.text import short_count
from engram_cli.sweep.config import SINGLE_ROW_SLOTS
from engram_cli.sweep.summary import HIGHER, LOWER, METRIC, WITHIN
from engram_cli.train.curves import draw_losses
from engram_cli.train.run import METRICS_FILE, read_metrics

SEED_STYLES = ("-", "--", ":", "-.")


def _span(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "?"
    lo, hi = min(values), max(values)
    a, b = short_count(lo, "?"), short_count(hi, "?")
    return a if a == b else f"{a}–{b}"


def _params(rows: list[dict]) -> str:
    return f"total {_span([r['total_params'] for r in rows])}, activated {_span([r['activated_params'] for r in rows])}"


def _finished(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["status"] == "finished" and r.get(METRIC) is not None]


def _runs_and_band(ax, xs: list[float], runs_at: list[list[float]], color: str, label: str) -> int:
    """Markers for every run, the mean line and the min-max band; returns the markers drawn."""
    mx = [x for x, v in zip(xs, runs_at) if v]
    means = [float(np.mean(v)) for v in runs_at if v]
    ax.fill_between(mx, [min(v) for v in runs_at if v], [max(v) for v in runs_at if v], color=color, alpha=0.18,
                    lw=0, label="lowest to highest seed")
    ax.plot(mx, means, color=color, lw=1.2, label=label)
    px = [x for x, v in zip(xs, runs_at) for _ in v]
    py = [y for v in runs_at for y in v]
    ax.scatter(px, py, s=9, color=color, edgecolor="white", linewidth=0.4, zorder=3, label="one run (seed)")
    return len(py)


def _allocation(ax, runs: list[dict], points: list[dict]) -> int:
    pts = sorted(points, key=lambda p: p["allocation"])
    xs = [p["allocation"] for p in pts]
    vals = [[r[METRIC] for r in runs if r["point"] == p["point"]] for p in pts]
    n = _runs_and_band(ax, xs, vals, "C0", f"mean over seeds — {_params(runs)}")
    ax.set_xlabel("allocation ratio ρ (share of the inactive expert parameters kept in experts; 1 = pure MoE)")
    return n


def _memory(ax, runs: list[dict], points: list[dict], fit: dict | None) -> int:
    tables = sorted([p for p in points if p["slots"] not in (None, SINGLE_ROW_SLOTS)], key=lambda p: p["table_rows"] or 0)
    xs = [p["table_rows"] for p in tables]
    vals = [[r[METRIC] for r in runs if r["point"] == p["point"]] for p in tables]
    n = _runs_and_band(ax, xs, vals, "C0", f"Engram tables — {_params([r for r in runs if r['slots']])}") if xs else 0
    if fit is not None and xs:
        grid = np.geomspace(min(xs), max(xs), 50)
        ax.plot(grid, fit["a"] * grid ** (-fit["alpha"]), color="C1", lw=1.0, ls="--",
                label=f"fit: loss = {fit['a']:.3f} · rows^{-fit['alpha']:+.4f} ({fit['runs']} runs, R² = {fit['r2']:.2f})")
    for p in points:
        v = [r[METRIC] for r in runs if r["point"] == p["point"]]
        if not v:
            continue
        if p["slots"] is None:  # the backbone
            ax.axhspan(min(v), max(v), color="0.5", alpha=0.15, lw=0)
            ax.axhline(float(np.mean(v)), color="0.3", lw=1.0, ls=":",
                       label=f"backbone without Engram — {_params([r for r in runs if r['point'] == p['point']])}")
            n += len(v)
        elif p["slots"] == SINGLE_ROW_SLOTS:
            ax.scatter([p["table_rows"]] * len(v), v, s=16, marker="s", color="C2", zorder=3,
                       label=f"one row per head (capacity 1, {p['table_rows']} rows)")
            n += len(v)
    ax.set_xscale("log")
    ax.set_xlabel("Engram table rows (all heads and layers; log scale)")
    return n


def _grid(ax, runs: list[dict], points: list[dict]) -> int:
    xs = list(range(len(points)))
    n = 0
    for x, p in zip(xs, points):
        v = [r[METRIC] for r in runs if r["point"] == p["point"]]
        if not v:
            continue
        ax.vlines(x, min(v), max(v), color="C0", lw=3, alpha=0.25)
        ax.hlines(float(np.mean(v)), x - 0.25, x + 0.25, color="C0", lw=1.2)
        ax.scatter([x] * len(v), v, s=9, color="C0", edgecolor="white", linewidth=0.4, zorder=3,
                   label="one run (seed); bar: mean, band: lowest to highest seed" if n == 0 else None)
        n += len(v)
    ref = next((p for p in points if p["reference"]), None)
    if ref is not None and ref["val_loss_mean"] is not None:
        ax.axhline(ref["val_loss_mean"], color="0.3", lw=0.8, ls=":", label=f"reference {ref['point']} — {_params(runs)}")
    ax.set_xticks(xs)
    ax.set_xticklabels([p["point"].replace("--", "\n") for p in points], fontsize=5.5)
    ax.set_xlabel("grid cell")
    return n


def plot_sweep(kind: str, runs: list[dict], points: list[dict], fit: dict | None, png: Path, svg: Path,
               title: str) -> tuple[int, list[str]]:
    """The sweep's figure; returns (run markers drawn, plotting warnings)."""

    done = _finished(runs)
    seeds = sorted({r["seed"] for r in done})
    within = sum(p["range_verdict"] == WITHIN for p in points)
    paired = {v: sum(p["paired_verdict"] == v for p in points) for v in (LOWER, HIGHER)}
    spread = (f"{within} of {len(points) - 1} points within the seed spread of the reference (range verdict); "
              f"paired: {paired[LOWER]} lower, {paired[HIGHER]} higher" if len(seeds) > 1
              else "one seed: no seed spread to compare differences with")
    subtitle = (f"{len(done)} runs, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
                f"validation loss at the last step; {spread}")
    with plotting.figure(5.6 if kind != "grid" else max(5.6, 0.7 * len(points)), 3.4) as (fig, warnings):
        ax = fig.add_subplot()
        markers = {"allocation": lambda: _allocation(ax, done, points), "memory": lambda: _memory(ax, done, points, fit),
                   "grid": lambda: _grid(ax, done, points)}[kind]()
        ax.set_ylabel("validation loss (nats per token)")
        ax.grid(alpha=0.25, lw=0.4)
        if markers:
            ax.legend(frameon=False, fontsize=5.5, loc="best")
        fig.tight_layout(rect=plotting.titles(fig, title, subtitle))
        warnings += plotting.save(fig, png, svg)
    return markers, warnings


def plot_curves(runs: list[dict], png: Path, title: str) -> list[str]:
    """Every run's training (left) and validation (right) loss against tokens: one colour per
    point, one line style per seed."""

    names = list(dict.fromkeys(r["point"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    colors: dict[str, Any] = {n: plotting.LINE_COLORS[i % len(plotting.LINE_COLORS)] for i, n in enumerate(names)}
    with plotting.figure(7.0, 3.0) as (fig, warnings):
        ax_train, ax_val = fig.subplots(1, 2)
        for r in runs:
            rows, _ = read_metrics(Path(r["run_dir"]) / METRICS_FILE)
            label = r["point"] if r["seed"] == seeds[0] else None
            draw_losses(ax_train, ax_val, rows, color=colors[r["point"]], label=label,
                        linestyle=SEED_STYLES[seeds.index(r["seed"]) % len(SEED_STYLES)])
        for ax, what in ((ax_train, "training loss (batch of the step)"), (ax_val, "validation loss")):
            ax.set_xlabel("tokens seen")
            ax.set_ylabel(f"{what}, nats per token")
            ax.grid(alpha=0.25, lw=0.4)
        ax_val.legend(frameon=False, fontsize=5.5)
        styles = ", ".join(f"seed {s}: {SEED_STYLES[i % len(SEED_STYLES)]}" for i, s in enumerate(seeds))
        fig.tight_layout(rect=plotting.titles(fig, title, f"{len(runs)} runs; line style by seed ({styles})"))
        warnings += plotting.save(fig, png)
    return warnings
