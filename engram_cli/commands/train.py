"""``engram train``: train an Engram + MoE model (library: ``engram_cli.train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from engram_cli.commands.options import Force, Json, Quiet
from engram_cli.commands.render import count

EXAMPLES = [
    ("engram train sample_data/sotu/*.txt sample_data/zh_classics.jsonl --tables out/tables --out out/run "
     "--config configs/tiny.toml", "the tiny model on the sample data (about 2 minutes on 2 CPU cores)"),
    ("engram train corpus/ --tables out/tables --out out/run-0.75 --config configs/tiny.toml --allocation 0.75",
     "keep 75% of the inactive expert parameters, turn the rest into Engram table slots"),
    ("engram train --out out/run --resume", "continue a run from its latest checkpoint (its own config and inputs)"),
    ("engram train --out out/run --resume --set train.steps=1200", "train a finished run further"),
    ("engram train corpus/ -T out/tables -o out/run -c configs/tiny.toml --set train.lr=1e-3 --set n_layer=6 --force",
     "override config keys; replace the earlier run"),
    ("engram train corpus/ -T out/tables -o out/run --set data.text_column=body --set data.max_tokens=5000000",
     "read field `body` of JSONL/Parquet inputs; stop after 5M tokens"),
    ("engram train corpus/ -T out/tables -o out/run-h4 -c configs/tiny.toml --set plan.n_head_per_ngram=4 "
     "--allocation 0.75", "re-plan the tables (4 heads per order), then size them by the allocation"),
    ("engram train corpus/ -T out/tables -o out/run-big -c configs/tiny.toml --table-store mmap",
     "keep the Engram tables in memory-mapped sparse files in out/run-big/tables/ (tables larger than RAM)"),
    ("engram train corpus/ -T out/tables -o out/run -c configs/tiny.toml --log tensorboard",
     "also write TensorBoard event files to out/run/tensorboard/"),
]


def train_command(
    corpus: Annotated[Optional[list[str]], typer.Argument(
        metavar="CORPUS...", show_default=False,
        help="Text files (.txt/.md), JSONL, Parquet, directories, globs, a `datasets` save_to_disk directory, or hf:NAME. "
             "Optional with --resume.")] = None,
    tables: Annotated[Optional[Path], typer.Option(
        "--tables", "-T", metavar="DIR", help="Tables artifact from `engram build-tables` (its plan, vocab and tokenizer). "
                                             "Optional with --resume.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Run directory (checkpoints, metrics, manifest).")] = ...,  # type: ignore[assignment]
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", metavar="FILE", help="TOML with \\[model], \\[train], \\[data] sections (e.g. configs/tiny.toml), "
                                              "or a run's config.json.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", metavar="KEY=VALUE", help="Override one config key, e.g. train.lr=1e-3 or n_layer=6 (repeat).")] = None,
    allocation: Annotated[Optional[float], typer.Option(
        "--allocation", "-a", metavar="RHO", help="Share of the base model's inactive expert parameters kept in experts; "
                                                 "the rest becomes Engram table slots (1 = pure MoE). Default: the tables' plan as is.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", metavar="DIR", help="Token cache (default: .engram-cache next to --out).")] = None,
    vocab: Annotated[Optional[Path], typer.Option(
        "--vocab", "-v", metavar="DIR", help="Vocab artifact, if not where the tables recorded it.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", "-t", metavar="SPEC", help="Tokenizer spec (default: the one the tables were built with; must match it).")] = None,
    table_store: Annotated[Optional[str], typer.Option(
        "--table-store", metavar="memory|mmap|module",
        help="Where the Engram tables live: a row store in RAM (memory, the default), in memory-mapped sparse files "
             "in <out>/tables/ (mmap: tables larger than RAM), or an nn.Embedding (module: runs before the row store). "
             "Same as --set train.table_store=...")] = None,
    log: Annotated[Optional[str], typer.Option(
        "--log", metavar="tensorboard", help="Also log the metrics as TensorBoard event files in <out>/tensorboard/ "
                                             "(needs `pip install tensorboard`).")] = None,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Train an MoE Transformer with Engram memory on a corpus; checkpoint, evaluate, resume.

    Tokenizes the corpus with the tables' tokenizer (cached for the next run), holds out a validation part, trains the model of the config on the corpus's sub-vocabulary with the tables' plan (or, with --allocation, a plan that splits the base model's sparse budget between experts and tables), prints the parameter budget, shows loss and tokens/s, writes metrics.jsonl and atomic checkpoints to --out, and ends with train/val loss beside the corpus's unigram entropy. Data parallel: `torchrun --nproc_per_node N -m engram_cli train ...`.
    """
    from engram_cli.commands.render import RichProgress, print_json
    from engram_cli.train import TrainConfig, load_settings, train

    settings = load_settings(config) if config is not None else None
    overrides = list(set_ or []) + ([f"train.table_store={table_store}"] if table_store is not None else [])
    cfg = TrainConfig(out=out, tables=tables, sources=list(corpus or []), settings=settings, overrides=overrides,
                      allocation=allocation,
                      device=device, resume=resume, force=force, cache_dir=cache_dir, vocab=vocab, tokenizer=tokenizer,
                      log=log)
    show = not quiet and not json_out
    with RichProgress(enabled=show) as progress:
        result = train(cfg, progress=progress, on_start=render_start if show else None)
    if result.rank != 0:
        return
    from engram_cli.commands.render import err

    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    if json_out:
        print_json(result.to_dict())
    else:
        render(result)


def budget_table(budget: dict, title: str):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    t.add_column("parameters")
    t.add_column("total", justify="right")
    t.add_column("activated per token", justify="right")
    t.add_row("[bold]model[/]", f"[bold]{count(budget['total'])}[/]", f"[bold]{count(budget['activated'])}[/]")
    t.add_row("Engram tables", count(budget["engram_tables"]), count(budget["engram_tables_activated"]))
    t.add_row(f"routed experts ({budget['moe_top_k']} of {budget['moe_num_experts']})", count(budget["experts_routed"]),
              count(budget["experts_routed_activated"]))
    t.add_row("dense (attention, shared experts, embeddings, Engram projections)", count(budget["dense"]), count(budget["dense"]))
    return t


def render_start(start) -> None:
    """Before the first step (stderr): the parameter budget and the data."""
    from engram_cli.commands.render import err

    b, d, p = start.budget, start.data, start.plan
    alloc = "" if b["allocation"] is None else (
        f", allocation ρ = {b['allocation']:g} (realized {b['realized_allocation']:.3f})" if b["realized_allocation"] is not None
        else f", allocation ρ = {b['allocation']:g}")
    err.print(budget_table(b, f"Parameter budget (plan: {p['source']}{alloc})"))
    err.print(f"[dim]data:[/] {d['train_tokens']:,} training / {d['val_tokens']:,} held-out tokens, "
              f"model vocabulary {d['model_vocab_size']:,} ids (UNK {d['val_unk_share']:.1%} of held-out), "
              f"unigram entropy {d['unigram_entropy']:.3f} nats  [dim]({'cache hit' if d['cache_hit'] else 'tokenized'}: "
              f"{d['cache']})[/]")
    what = f"resuming at step {start.start_step} of {start.steps}" if start.start_step else f"{start.steps} steps"
    err.print(f"[dim]training:[/] {what} on {start.device}" + (f" × {start.world_size} processes" if start.world_size > 1 else ""))


def render(result) -> None:
    from rich.table import Table

    from engram_cli.commands.render import out

    t = Table(title=f"Run {result.out}", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    t.add_row("steps", f"{result.steps:,}" + (f" (resumed at {result.start_step:,})" if result.start_step else ""))
    t.add_row("train loss (last 20 steps)", f(result.train_loss))
    t.add_row("validation loss", f"[bold green]{f(result.val_loss)}[/]")
    t.add_row("unigram entropy of the training tokens", f(result.unigram_entropy))
    t.add_row("unigram model on the held-out tokens", f(result.val_unigram_cross_entropy))
    t.add_row("held-out tokens outside the model vocabulary", f"{result.val_unk_share:.2%}")
    t.add_row("tokens seen", f"{result.tokens_seen:,}")
    t.add_row("time", f"{result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)")
    t.add_row("device", result.device + (f" × {result.world_size}" if result.world_size > 1 else ""))
    out.print(t)
    out.print(budget_table(result.budget, f"Parameter budget (plan: {result.plan['source']})"))
    out.print("[dim]losses in nats per token; wrote[/] " + f"{result.out}/ [dim](latest checkpoint {result.checkpoint})[/]")
