"""``engram sweep``: many runs at controlled budgets, summarized with their seed spread
(library: ``engram_cli.sweep``). A Typer sub-app with one command per kind of sweep."""

from __future__ import annotations

import functools
import inspect
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer

from engram_cli.commands.options import Engine, Force, Json, Quiet, RayAddress
from engram_cli.commands.render import count

EXAMPLES = [
    ("engram sweep allocation sample_data/sotu sample_data/zh_classics.jsonl -T out/tables -c configs/tiny.toml "
     "--ratios 1,0.9,0.8,0.7,0.6,0.4 --seeds 0,1 --jobs 2 -o out/sweep-alloc",
     "loss against the allocation ratio at equal total and activated parameters (Figure 3)"),
    ("engram sweep memory sample_data/sotu -T out/tables -c configs/tiny.toml --slots 1,1e3,1e4,1e5 -o out/sweep-mem",
     "the backbone fixed, only the table size changes; slots 1 = one row per head (Figure 4)"),
    ("engram sweep grid sample_data/sotu -T out/tables -c configs/tiny.toml --axis plan.n_head_per_ngram=2,4 "
     "--axis train.engram_lr_mult=1,5 --allocation 0.75 -o out/sweep-grid", "ablations: every combination of the axes"),
    ("engram sweep allocation sample_data/sotu -T out/tables -c configs/tiny.toml --ratios 1,0.75 -o out/sweep-alloc",
     "the same command again continues an interrupted sweep: finished runs are kept"),
    ("engram sweep allocation corpus/ -T out/tables --ratios 1,0.5 --set train.steps=100 --no-eval --json -o out/s",
     "shorter runs, no bits-per-byte scoring, the summary as JSON"),
]

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich", context_settings={"help_option_names": ["-h", "--help"]})

Corpus = Annotated[list[str], typer.Argument(
    metavar="CORPUS...", show_default=False, help="The corpus every run trains on (as for `engram train`).")]
Tables = Annotated[Path, typer.Option("--tables", "-T", metavar="DIR", help="Tables artifact from `engram build-tables`: "
                                      "the vocab, tokenizer and the plan every run's tables are made from.")]
Out = Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="The sweep directory (run again to continue it).")]
Config = Annotated[Optional[Path], typer.Option("--config", "-c", metavar="FILE", help="TOML of the base settings "
                                                "(e.g. configs/tiny.toml).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                   help="Override a config key in every run (repeat).")]
Seeds = Annotated[str, typer.Option("--seeds", metavar="S1,S2", help="Seeds: every point is trained once per seed.")]
Jobs = Annotated[int, typer.Option("--jobs", "-j", help="Runs trained at once, each in its own process.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="Torch threads per run (default: cores / jobs).")]
Evaluate = Annotated[bool, typer.Option("--eval/--no-eval", help="Score every run with `engram eval` "
                                        "(bits per byte, loss by training count of the n-gram).")]
EvalWindows = Annotated[Optional[int], typer.Option("--eval-windows", min=1, help="Score at most this many held-out "
                                                    "windows per run (default: all).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", metavar="DIR", help="Token cache "
                                                  "(default: <out>/runs/.engram-cache).")]
Log = Annotated[Optional[str], typer.Option("--log", metavar="tensorboard", help="Every run also logs TensorBoard "
                                            "events (needs `pip install tensorboard`).")]


@dataclass
class SweepOptions:
    """The options every kind of sweep takes, defined once: :func:`with_sweep_options` adds them
    to each subcommand's signature and hands the command one of these."""

    corpus: Corpus
    tables: Tables
    out: Out
    config: Config = None
    set_: Sets = None
    seeds: Seeds = "0"
    jobs: Jobs = 1
    threads: Threads = None
    evaluate: Evaluate = True
    eval_windows: EvalWindows = None
    device: Device = "auto"
    cache_dir: CacheDir = None
    log: Log = None
    force: Force = False
    json_out: Json = False
    quiet: Quiet = False
    engine: Engine = "local"
    ray_address: RayAddress = None

    def run(self, kind: str, **values) -> None:
        """Build the sweep's config (``values``: the kind's own: ratios, slots or axes), call the
        library and render its result."""
        from engram_cli.commands.render import run_command
        from engram_cli.sweep import SweepConfig, parse_seeds, sweep

        cfg = SweepConfig(kind=kind, out=self.out, tables=self.tables, sources=list(self.corpus), config=self.config,
                          overrides=list(self.set_ or []), seeds=parse_seeds(self.seeds), jobs=self.jobs,
                          threads=self.threads, evaluate=self.evaluate, eval_windows=self.eval_windows,
                          device=self.device, cache_dir=self.cache_dir, log=self.log, force=self.force,
                          engine=self.engine, ray_address=self.ray_address, **values)
        run_command(sweep, cfg, render, json_out=self.json_out, quiet=self.quiet)


def with_sweep_options(command):
    """``command(options: SweepOptions, **own)`` -> a Typer command taking the corpus, ``--tables``
    and ``--out``, then its own options, then the rest of :class:`SweepOptions`."""
    hints = get_type_hints(SweepOptions, include_extras=True)
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                default=inspect.Parameter.empty if f.default is MISSING else f.default)
              for f in fields(SweepOptions)]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for p in list(inspect.signature(command, eval_str=True).parameters.values())[1:]]
    names = [f.name for f in fields(SweepOptions)]

    @functools.wraps(command)
    def typer_command(**kwargs) -> None:
        command(SweepOptions(**{n: kwargs.pop(n) for n in names}), **kwargs)

    typer_command.__signature__ = inspect.Signature([*shared[:3], *own, *shared[3:]])
    return typer_command


@app.callback()
def sweep_command() -> None:
    """Train many runs at controlled budgets and summarize them: does the memory pay, and where?

    allocation: one point per allocation ratio at equal total and activated parameters; memory: the backbone fixed, only the Engram table size changes (plus the backbone alone, and --slots 1 for one row per head); grid: every combination of --axis KEY=V1,V2 over config keys. Every point is trained once per seed; the summary gives each point's mean and spread over the seeds with two verdicts against the reference point: the range verdict ("within seed spread" when the difference is no larger than the spread) and the paired verdict (runs with the same seed are paired: the per-seed difference, its mean with a 95% t-interval, or a sign count with fewer than 3 seeds). Every run is an ordinary run directory. Run the same command again to continue an interrupted (or killed) sweep.
    """


@app.command("allocation", epilog="Example: engram sweep allocation corpus/ -T out/tables -c configs/tiny.toml "
             "--ratios 1,0.8,0.6 -o out/sweep")
@with_sweep_options
def allocation_command(
    options: SweepOptions,
    ratios: Annotated[str, typer.Option("--ratios", metavar="R1,R2", help="Allocation ratios in [0, 1] "
                                        "(share of the inactive expert parameters kept in experts; 1 = pure MoE).")] = ...,  # type: ignore[assignment]
) -> None:
    """Loss against the allocation ratio rho at equal total and activated parameters (the paper's Figure 3)."""
    from engram_cli.sweep import parse_ratios

    options.run("allocation", ratios=parse_ratios(ratios))


@app.command("memory", epilog="Example: engram sweep memory corpus/ -T out/tables -c configs/tiny.toml "
             "--slots 1,1e3,1e4 -o out/sweep")
@with_sweep_options
def memory_command(
    options: SweepOptions,
    slots: Annotated[str, typer.Option("--slots", metavar="S1,S2", help="Table sizes in slots per head "
                                       "(1 = one row per head: the capacity-1 control).")] = ...,  # type: ignore[assignment]
) -> None:
    """Loss against the Engram table size with the backbone fixed, a power law fitted (the paper's Figure 4)."""
    from engram_cli.sweep import parse_slots

    options.run("memory", slots=parse_slots(slots))


@app.command("grid", epilog="Example: engram sweep grid corpus/ -T out/tables -c configs/tiny.toml "
             "--axis plan.n_head_per_ngram=2,4 -o out/sweep")
@with_sweep_options
def grid_command(
    options: SweepOptions,
    axis: Annotated[list[str], typer.Option("--axis", metavar="KEY=V1,V2", help="A config key and its values "
                                            "(repeat); [plan] keys re-plan the tables.")] = ...,  # type: ignore[assignment]
    allocation: Annotated[Optional[float], typer.Option("--allocation", "-a", metavar="RHO", help="Every run at this "
                                                        "allocation ratio: equal parameters across the grid.")] = None,
) -> None:
    """Every combination of the axes' values (the ablations of the paper's Section 6)."""
    from engram_cli.sweep import parse_axis

    options.run("grid", axes=[parse_axis(a) for a in axis], allocation=allocation)


# ---------------------------------------------------------------------------------------------
# rendering


def _f(v: float | None, digits: int = 3, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _paired(p: dict) -> str:
    """The paired difference of a point: its mean with the 95% t-interval, or the sign count."""
    if p["paired_verdict"] == "reference" or p["paired_delta_mean"] is None:
        return "–"
    if p["paired_delta_ci95_low"] is None:
        return f"{_f(p['paired_delta_mean'], signed=True)} ({p['paired_sign_count']})"
    return (f"{_f(p['paired_delta_mean'], signed=True)} "
            f"[{_f(p['paired_delta_ci95_low'], signed=True)}, {_f(p['paired_delta_ci95_high'], signed=True)}]")


def render(result) -> None:
    from rich.table import Table

    from engram_cli.commands.render import out

    t = Table(title=f"Sweep {result.out} ({result.kind}): validation loss by point, over the seeds",
              title_justify="left")
    for col, just in (("point", "left"), ("seeds", "right"), ("params total / activated", "right"),
                      ("table rows", "right"), ("val loss mean", "right"), ("min – max", "right"),
                      ("Δ vs reference", "right"), ("range verdict", "left"), ("paired Δ [95% CI]", "right"),
                      ("paired verdict", "left")):
        t.add_column(col, justify=just, no_wrap=col in ("point", "min – max"))
    if result.evaluated:
        t.add_column("bits/byte", justify="right")
    for p in result.points:
        row = [p["point"], str(p["seeds"]), f"{count(p['total_params'])} / {count(p['activated_params'])}",
               f"{p['table_rows']:,}" if p["table_rows"] is not None else "–", f"[bold]{_f(p['val_loss_mean'])}[/]",
               f"{_f(p['val_loss_min'])} – {_f(p['val_loss_max'])}", _f(p["delta_vs_reference"], signed=True),
               p["range_verdict"], _paired(p), p["paired_verdict"]]
        t.add_row(*row, *([_f(p.get("bits_per_byte_mean"))] if result.evaluated else []))
    out.print(t)
    r = Table(title="Runs", title_justify="left")
    for col in ("run", "status", "this call", "train loss", "val loss", "bits/byte", "time"):
        r.add_column(col, justify="left" if col in ("run", "status", "this call") else "right")
    for row, name in ((x, x["run"]) for x in result.runs):
        done = "trained" if name in result.trained else "kept"
        r.add_row(name, row["status"] or "–", done, _f(row["train_loss"]), _f(row["val_loss"]),
                  _f(row.get("bits_per_byte")), f"{row['seconds']:.0f} s" if row["seconds"] is not None else "–")
    out.print(r)
    if result.fit is not None:
        f = result.fit
        out.print(f"power law: validation loss = {f['a']:.4f} · table_rows^{-f['alpha']:+.4f}  "
                  f"(R² {f['r2']:.3f}, {f['runs']} runs)")
    if not result.evaluated:
        out.print("[dim]bits per byte and bucket losses left out (--no-eval)[/]")
    out.print("[dim]range verdict: the difference of the means against the seeds' min – max spread; paired "
              "verdict: the runs of the same seed paired, their differences' mean with a 95% t-interval "
              "(a sign count below 3 seeds)[/]")
    out.print(f"[dim]losses in nats per token; {len(result.trained)} runs trained, {len(result.skipped)} kept; "
              f"{result.jobs} job(s) × {result.threads} thread(s); {result.seconds:.0f} s; wrote[/] {result.out}/")
