"""The loss-curve picture of a run: training and validation loss against tokens seen.

Drawn from the run's ``metrics.jsonl`` (every logged step: the training loss of that step's
batch; evaluation steps: the loss on the fixed held-out windows) at the end of training, as
``loss_curve.png`` in the run directory. :func:`draw_losses` draws one run on given axes, so the
sweep's picture of all its runs (``engram_cli.sweep.plots``) draws them the same way.
"""

from __future__ import annotations

from pathlib import Path

from engram_cli.core import plotting
from engram_cli.train.run import METRICS_FILE, read_metrics

LOSS_CURVE_FILE = "loss_curve.png"


def draw_losses(ax_train, ax_val, rows: list[dict], *, color: str, label: str | None = None,
                linestyle: str = "-") -> int:
    """One run's training loss on ``ax_train`` and validation loss on ``ax_val`` (either may be
    None), against tokens; returns the number of validation points drawn."""
    train = [(r["tokens"], r["loss"]) for r in rows if r.get("loss") is not None and "tokens" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None and "tokens" in r]
    if ax_train is not None and train:
        ax_train.plot(*zip(*train), color=color, lw=0.8, ls=linestyle, alpha=0.85, label=label)
    if ax_val is not None and val:
        ax_val.plot(*zip(*val), color=color, lw=1.0, ls=linestyle, marker="o", ms=2.5, label=label)
    return len(val)


def write_loss_curve(run_dir: Path, *, title: str) -> list[str]:
    """``run_dir/loss_curve.png`` from ``run_dir/metrics.jsonl``; returns the plotting warnings."""

    rows, _ = read_metrics(Path(run_dir) / METRICS_FILE)
    with plotting.figure(4.2, 2.8) as (fig, warnings):
        ax = fig.add_subplot()
        draw_losses(ax, None, rows, color="C0", label="training (batch of the step)")
        draw_losses(None, ax, rows, color="C1", label="validation (held-out windows)")
        last = next((r["val_loss"] for r in reversed(rows) if r.get("val_loss") is not None), None)
        subtitle = f"{rows[-1]['step']:,} steps" + (f", final validation loss {last:.3f}" if last is not None else "") \
            if rows else "no metrics were logged"
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.25, lw=0.4)
        if rows:
            ax.legend(frameon=False)
        fig.tight_layout(rect=plotting.titles(fig, title, subtitle))
        warnings += plotting.save(fig, Path(run_dir) / LOSS_CURVE_FILE)
    return warnings
