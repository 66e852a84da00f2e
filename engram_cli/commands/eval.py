"""``engram eval``: held-out loss of runs, where the memory helps, and the Engram knockout
(library: ``engram_cli.eval``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from engram_cli.commands.options import DocMode, Force, Json, MaxTokens, Quiet, TextColumn

EXAMPLES = [
    ("engram eval out/run", "held-out loss (nats/token, bits/byte, 95% CI) and the loss by bucket"),
    ("engram eval out/run --knockout engram", "also with every Engram module switched off: the delta per bucket"),
    ("engram eval out/run-0.75 out/run-1.0 -o out/eval", "two allocations side by side; Parquet, picture, manifest"),
    ("engram eval out/run sample_data/sentences.txt --doc-mode line", "score a corpus instead of the held-out split"),
    ("engram eval out/run --bucket-n 2 --json | jq '.runs[0].buckets'", "buckets by bigram counts, as JSON"),
]


def eval_command(
    args: Annotated[list[str], typer.Argument(
        metavar="RUN... [CORPUS...]", show_default=False,
        help="Run directories from `engram train` (same tokenizer), then optionally a corpus to score instead of "
             "each run's held-out split (files, directories, globs, hf:NAME).")],
    knockout: Annotated[Optional[str], typer.Option(
        "--knockout", metavar="engram", help="Also score with every Engram module's output switched off.")] = None,
    bucket_n: Annotated[Optional[int], typer.Option(
        "--bucket-n", min=1, help="Order n of the bucket n-gram (n-1 preceding tokens + the target); "
                                  "default: the plan's max_ngram_size.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", metavar="DIR", help="Write buckets.parquet, eval.png/.svg and a manifest here.")] = None,
    max_windows: Annotated[Optional[int], typer.Option(
        "--max-windows", min=1, help="Score at most this many windows per run, evenly spread (default: all).")] = None,
    text_column: TextColumn = "text",
    doc_mode: DocMode = "file",
    max_tokens: MaxTokens = None,
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", metavar="DIR", help="The runs' token cache (default: where each run recorded it).")] = None,
    device: Annotated[str, typer.Option("--device", help="Torch device to run the models on.")] = "cpu",
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Score trained runs on held-out text: loss in nats per token and bits per byte, with a 95% confidence interval over windows of block_size.

    Each run is scored on its own held-out split, rebuilt exactly as training split it (or on a CORPUS given after the runs). The loss is broken down by how often the target's n-gram (its n-1 preceding tokens + itself, canonical ids) occurs in the run's training split (unseen, 1, 2–9, 10–99, ≥100) and by the target token's script. --knockout engram scores again with every Engram module switched off and shows the difference per bucket: where the memory pays.
    """
    from engram_cli.commands.render import run_command
    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.eval import EvalConfig, evaluate
    from engram_cli.eval.config import split_arguments

    runs, sources = split_arguments(list(args))
    spec = CorpusSpec(sources=sources, text_column=text_column, doc_mode=doc_mode, max_tokens=max_tokens) \
        if sources else None
    config = EvalConfig(runs=runs, corpus=spec, bucket_n=bucket_n, knockout=knockout, out=out, force=force,
                        max_windows=max_windows, cache_dir=cache_dir, device=device)
    run_command(evaluate, config, render, json_out=json_out, quiet=quiet, rate_key="tokens")


# ---------------------------------------------------------------------------------------------
# rendering


def _f(v: float | None, digits: int = 3, signed: bool = False) -> str:
    if v is None or math.isnan(v):
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _ci(ci) -> str:
    return "–" if ci is None or math.isnan(ci[0]) else f"[dim]{ci[0]:.3f} – {ci[1]:.3f}[/]"


def render(result) -> None:
    from rich.table import Table

    from engram_cli.commands.render import out

    ko = result.knockout is not None
    runs = result.runs
    tags = [chr(ord("A") + i) for i in range(len(runs))] if len(runs) > 1 else [""]
    what = "its own held-out split" if result.text == "held-out" else "the corpus"
    t = Table(title=f"Loss on {what}: nats/token, 95% CI over windows", title_justify="left",
              caption="Δ = loss without Engram − loss with it (paired over the same windows)" if ko else None,
              caption_justify="left")
    cols = ["run", "tokens", "windows", "loss", "95% CI", "bits/byte"] + (
        ["no Engram", "bits/byte", "Δ", "Δ 95% CI"] if ko else [])
    for c in cols:
        t.add_column(c, justify="left" if c == "run" else "right")
    for tag, r in zip(tags, runs):
        row = [f"{tag} {r.label}".strip(), f"{r.tokens:,}", f"{r.windows:,} × {r.block_size}",
               _f(r.loss), _ci(r.loss_ci95), _f(r.bits_per_byte)]
        if ko:
            row += [_f(r.knockout_loss), _f(r.knockout_bits_per_byte), _f(r.delta, signed=True), _ci(r.delta_ci95)]
        t.add_row(*row)
    out.print(t)
    n = result.bucket_n
    _bucket_table(result, tags, "count", f"Loss by training count of the {n}-gram ({n - 1} preceding tokens + "
                                         "target, canonical ids)")
    _bucket_table(result, tags, "script", "Loss by script of the target token")
    if result.out:
        out.print(f"[dim]wrote[/] {result.out}/ ({', '.join(Path(p).name for p in result.files)})")


def _bucket_table(result, tags: list[str], kind: str, title: str) -> None:
    from rich.table import Table

    from engram_cli.commands.render import out

    ko = result.knockout is not None
    t = Table(title=title + ": nats/token", title_justify="left")
    t.add_column("bucket")
    for tag in tags:
        for c in ("tokens", "share", "loss") + (("no Engram", "Δ", "Δ 95% CI") if ko else ()):
            t.add_column(f"{tag} {c}".strip(), justify="right")
    names = [b.bucket for b in result.runs[0].buckets if b.kind == kind]
    for name in names:
        row = [name]
        for r in result.runs:
            b = r.bucket(kind, name)
            row += [f"{b.tokens:,}", f"{b.tokens / max(r.tokens, 1):.1%}", _f(b.loss)]
            if ko:
                row += [_f(b.knockout_loss), _f(b.delta, signed=True), _ci(b.delta_ci95)]
        t.add_row(*row)
    out.print(t)
