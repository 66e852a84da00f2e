"""``engram sweep``: many runs at controlled budgets — does the memory pay, and where?

Three kinds of sweep, each a set of ordinary ``engram train`` runs on the same corpus, tables,
tokens and seeds (every run directory can be read by ``engram inspect-gates`` and ``engram eval``):

* **allocation** (the paper's Figure 3, arXiv 2601.07372 Section 3): one point per allocation
  ratio rho at equal total and activated parameters (``engram_cli.model.budget.allocate``, the
  ``--allocation`` accounting); rho = 1 (pure MoE) is the reference;
* **memory** (the paper's Figure 4): the backbone fixed, only the Engram table size changes
  (``[plan] target_size``), beside the backbone without Engram (the reference) and, for
  ``--slots 1``, the capacity-1 control: one row per head (``TablePlan.single_row``) — the
  smallest prime tables (2, 3, 5, ...) would still tell many n-grams apart, so that is not it;
  the validation loss is fitted by a power law of the table rows;
* **grid** (the ablations of Section 6): the cartesian product of ``--axis KEY=V1,V2`` over any
  ``engram train --set`` key, the ``[plan]`` keys included (re-planned with
  ``engram_cli.tables.plan.replan`` on the tables' vocabulary); the first cell is the reference.

Each point is trained once per seed. The summary reports each point's mean and spread (max - min)
over the seeds with two verdicts against the reference: the **range verdict** calls a difference
no larger than the spread ``within seed spread``; the **paired verdict** pairs the runs of the
same seed (same data order, same shared initialization) and asks whether their differences are
consistently below or above zero (a t-interval, or a sign count with few seeds). With ``engram eval``'s library, each run is also scored on its held-out
split: bits per byte and the loss by training count of the target's n-gram.

A sweep directory holds ``manifest.json`` (format ``engram.sweep``, written before the first run
and rewritten after every run, so a sweep killed at any instant is recognized and continued),
``runs/<point>--seed=<s>/`` (the run directories), ``runs.parquet``, ``points.parquet``,
``sweep.png``/``.svg`` and ``loss_curves.png``. Running the same command again continues an
interrupted sweep: finished runs are never trained again, interrupted ones resume from their
checkpoint (or restart when they had none). ``jobs`` trains several runs at once, in processes.

The modules, in dependency order:

* ``config``: :class:`SweepConfig`, points and runs, reading the option values, the files;
* ``runner``: a run directory's state, training/resuming/scoring one run, parallel processes;
* ``summary``: the rows of every run and point, the range and paired verdicts, the power-law fit;
* ``plots``: the pictures (``engram_cli.core.plotting``);
* ``report``: :func:`sweep` (the command's one library call) and :class:`SweepResult`.

The library never prints.

Imports: ``core`` .. ``train`` and ``eval`` (each run is scored with its library).

>>> res = sweep(SweepConfig(kind="allocation", out=Path("out/sweep"), tables=Path("out/tables"),
...                         sources=["corpus/"], config=Path("configs/tiny.toml"), ratios=[1, 0.75],
...                         seeds=[0, 1]))                                           # doctest: +SKIP
>>> [(p["point"], p["range_verdict"], p["paired_verdict"]) for p in res.points]     # doctest: +SKIP
"""

from __future__ import annotations

from engram_cli.sweep.config import (
    FILES,
    FORMAT,
    KINDS,
    SINGLE_ROW_SLOTS,
    Point,
    RunSpec,
    SweepConfig,
    make_points,
    make_runs,
    parse_axis,
    parse_ratios,
    parse_seeds,
    parse_slots,
)
from engram_cli.sweep.report import SweepResult, sweep
from engram_cli.sweep.summary import (
    HIGHER,
    LOWER,
    NO_PAIRED_DIFFERENCE,
    ONE_SEED,
    WITHIN,
    paired_comparison,
    point_rows,
    power_law_fit,
    range_verdict,
    run_rows,
)

__all__ = [
    "FILES", "FORMAT", "HIGHER", "KINDS", "LOWER", "NO_PAIRED_DIFFERENCE", "ONE_SEED", "SINGLE_ROW_SLOTS", "WITHIN",
    "Point", "RunSpec", "SweepConfig", "SweepResult", "make_points", "make_runs", "paired_comparison", "parse_axis",
    "parse_ratios", "parse_seeds", "parse_slots", "point_rows", "power_law_fit", "range_verdict", "run_rows", "sweep",
]
