"""``engram sweep``: many runs at controlled budgets, summarized with their seed spread
(library: ``engram_cli.sweep``). A Typer sub-app with one command per kind of sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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


@app.callback()
def sweep_command() -> None:
    """Train many runs at controlled budgets and summarize them: does the memory pay, and where?

    allocation: one point per allocation ratio at equal total and activated parameters; memory: the backbone fixed, only the Engram table size changes (plus the backbone alone, and --slots 1 for one row per head); grid: every combination of --axis KEY=V1,V2 over config keys. Every point is trained once per seed; the summary gives each point's mean and spread over the seeds and calls a difference no larger than that spread "within seed spread". Every run is an ordinary run directory. Run the same command again to continue an interrupted sweep.
    """


def _run(kind: str, corpus, tables, out, config, set_, seeds, jobs, threads, evaluate, eval_windows, device,
         cache_dir, log, force, json_out, quiet, **values) -> None:
    from engram_cli.commands.render import run_command
    from engram_cli.sweep import SweepConfig, parse_seeds, sweep

    cfg = SweepConfig(kind=kind, out=out, tables=tables, sources=list(corpus), config=config, overrides=list(set_ or []),
                      seeds=parse_seeds(seeds), jobs=jobs, threads=threads, evaluate=evaluate,
                      eval_windows=eval_windows, device=device, cache_dir=cache_dir, log=log, force=force, **values)
    run_command(sweep, cfg, render, json_out=json_out, quiet=quiet)


@app.command("allocation", epilog="Example: engram sweep allocation corpus/ -T out/tables -c configs/tiny.toml "
             "--ratios 1,0.8,0.6 -o out/sweep")
def allocation_command(
    corpus: Corpus, tables: Tables = ..., out: Out = ...,  # type: ignore[assignment]
    ratios: Annotated[str, typer.Option("--ratios", metavar="R1,R2", help="Allocation ratios in [0, 1] "
                                        "(share of the inactive expert parameters kept in experts; 1 = pure MoE).")] = ...,  # type: ignore[assignment]
    config: Config = None, set_: Sets = None, seeds: Seeds = "0", jobs: Jobs = 1, threads: Threads = None,
    evaluate: Evaluate = True, eval_windows: EvalWindows = None, device: Device = "auto", cache_dir: CacheDir = None,
    log: Log = None, force: Force = False, json_out: Json = False, quiet: Quiet = False,
    engine: Engine = "local", ray_address: RayAddress = None,
) -> None:
    """Loss against the allocation ratio rho at equal total and activated parameters (the paper's Figure 3)."""
    from engram_cli.sweep import parse_ratios

    _run("allocation", corpus, tables, out, config, set_, seeds, jobs, threads, evaluate, eval_windows, device,
         cache_dir, log, force, json_out, quiet, ratios=parse_ratios(ratios), engine=engine, ray_address=ray_address)


@app.command("memory", epilog="Example: engram sweep memory corpus/ -T out/tables -c configs/tiny.toml "
             "--slots 1,1e3,1e4 -o out/sweep")
def memory_command(
    corpus: Corpus, tables: Tables = ..., out: Out = ...,  # type: ignore[assignment]
    slots: Annotated[str, typer.Option("--slots", metavar="S1,S2", help="Table sizes in slots per head "
                                       "(1 = one row per head: the capacity-1 control).")] = ...,  # type: ignore[assignment]
    config: Config = None, set_: Sets = None, seeds: Seeds = "0", jobs: Jobs = 1, threads: Threads = None,
    evaluate: Evaluate = True, eval_windows: EvalWindows = None, device: Device = "auto", cache_dir: CacheDir = None,
    log: Log = None, force: Force = False, json_out: Json = False, quiet: Quiet = False,
    engine: Engine = "local", ray_address: RayAddress = None,
) -> None:
    """Loss against the Engram table size with the backbone fixed, a power law fitted (the paper's Figure 4)."""
    from engram_cli.sweep import parse_slots

    _run("memory", corpus, tables, out, config, set_, seeds, jobs, threads, evaluate, eval_windows, device,
         cache_dir, log, force, json_out, quiet, slots=parse_slots(slots), engine=engine, ray_address=ray_address)


@app.command("grid", epilog="Example: engram sweep grid corpus/ -T out/tables -c configs/tiny.toml "
             "--axis plan.n_head_per_ngram=2,4 -o out/sweep")
def grid_command(
    corpus: Corpus, tables: Tables = ..., out: Out = ...,  # type: ignore[assignment]
    axis: Annotated[list[str], typer.Option("--axis", metavar="KEY=V1,V2", help="A config key and its values "
                                            "(repeat); [plan] keys re-plan the tables.")] = ...,  # type: ignore[assignment]
    allocation: Annotated[Optional[float], typer.Option("--allocation", "-a", metavar="RHO", help="Every run at this "
                                                        "allocation ratio: equal parameters across the grid.")] = None,
    config: Config = None, set_: Sets = None, seeds: Seeds = "0", jobs: Jobs = 1, threads: Threads = None,
    evaluate: Evaluate = True, eval_windows: EvalWindows = None, device: Device = "auto", cache_dir: CacheDir = None,
    log: Log = None, force: Force = False, json_out: Json = False, quiet: Quiet = False,
    engine: Engine = "local", ray_address: RayAddress = None,
) -> None:
    """Every combination of the axes' values (the ablations of the paper's Section 6)."""
    from engram_cli.sweep import parse_axis

    _run("grid", corpus, tables, out, config, set_, seeds, jobs, threads, evaluate, eval_windows, device,
         cache_dir, log, force, json_out, quiet, axes=[parse_axis(a) for a in axis], allocation=allocation,
         engine=engine, ray_address=ray_address)


# ---------------------------------------------------------------------------------------------
# rendering


def _f(v: float | None, digits: int = 3, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def render(result) -> None:
    from rich.table import Table

    from engram_cli.commands.render import out

    t = Table(title=f"Sweep {result.out} ({result.kind}): validation loss by point, over the seeds",
              title_justify="left")
    for col, just in (("point", "left"), ("seeds", "right"), ("params total / activated", "right"),
                      ("table rows", "right"), ("val loss mean", "right"), ("min – max", "right"),
                      ("Δ vs reference", "right"), ("verdict", "left")):
        t.add_column(col, justify=just)
    if result.evaluated:
        t.add_column("bits/byte", justify="right")
    for p in result.points:
        row = [p["point"], str(p["seeds"]), f"{count(p['total_params'])} / {count(p['activated_params'])}",
               f"{p['table_rows']:,}" if p["table_rows"] is not None else "–", f"[bold]{_f(p['val_loss_mean'])}[/]",
               f"{_f(p['val_loss_min'])} – {_f(p['val_loss_max'])}", _f(p["delta_vs_reference"], signed=True),
               p["verdict"]]
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
    out.print(f"[dim]losses in nats per token; {len(result.trained)} runs trained, {len(result.skipped)} kept; "
              f"{result.jobs} job(s) × {result.threads} thread(s); {result.seconds:.0f} s; wrote[/] {result.out}/")
