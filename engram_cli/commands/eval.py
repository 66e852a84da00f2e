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
    ("engram eval out/run --table-dtype fp8-e4m3", "the tables served in fp8 (ue8m0 scales): Δ loss against fp32"),
]


def eval_command(
    args: Annotated[list[str], typer.Argument(
        metavar="RUN... [CORPUS...]", show_default=False,
        help="Run directories from `engram train` (same tokenizer), then optionally a corpus to score instead of "
             "each run's held-out split (files, directories, globs, hf:NAME).")],
    knockout: Annotated[Optional[str], typer.Option(
        "--knockout", metavar="engram", help="Also score with every Engram module's output switched off.")] = None,
    table_dtype: Annotated[str, typer.Option(
        "--table-dtype", metavar="fp32|bf16|fp8-e4m3",
        help="Also score with the Engram tables stored at this dtype (fp8-e4m3: one power-of-two ue8m0 scale per "
             "32 values, as DeepSeek V4.1-Flash stores them) and show the Δ loss against the trained fp32 tables.")
    ] = "fp32",
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

    Each run is scored on its own held-out split, rebuilt exactly as training split it (or on a CORPUS given after the runs). The loss is broken down by how often the target's n-gram (its n-1 preceding tokens + itself, canonical ids) occurs in the run's training split (unseen, 1, 2–9, 10–99, ≥100), by the target token's script, and by collision exposure: in how many heads of the first Engram layer (all orders) the row read is shared with a more frequent training n-gram. --knockout engram scores again with every Engram module switched off and shows the difference per bucket: where the memory pays. --table-dtype scores again with the tables stored at bf16 or fp8.
    """
    from engram_cli.commands.render import run_command
    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.eval import EvalConfig, evaluate
    from engram_cli.eval.config import split_arguments

    runs, sources = split_arguments(list(args))
    spec = CorpusSpec(sources=sources, text_column=text_column, doc_mode=doc_mode, max_tokens=max_tokens) \
        if sources else None
    config = EvalConfig(runs=runs, corpus=spec, bucket_n=bucket_n, knockout=knockout, table_dtype=table_dtype,
                        out=out, force=force, max_windows=max_windows, cache_dir=cache_dir, device=device)
    run_command(evaluate, config, render, json_out=json_out, quiet=quiet, rate_key="tokens")


# ---------------------------------------------------------------------------------------------
# rendering


def _f(v: float | None, digits: int = 3, signed: bool = False) -> str:
    if v is None or math.isnan(v):
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _ci(ci, digits: int = 3) -> str:
    return "–" if ci is None or ci[0] is None or math.isnan(ci[0]) else f"[dim]{ci[0]:.{digits}f} – {ci[1]:.{digits}f}[/]"


def render(result) -> None:
    from rich.table import Table

    from engram_cli.commands.render import out

    ko = result.knockout is not None
    dt = result.table_dtype if result.table_dtype != "fp32" else None
    runs = result.runs
    tags = [chr(ord("A") + i) for i in range(len(runs))] if len(runs) > 1 else [""]
    what = "its own held-out split" if result.text == "held-out" else "the corpus"
    notes = (["Δ = loss without Engram − loss with it (paired over the same windows)"] if ko else []) + (
        [f"{dt} Δ = loss with the tables stored at {dt} − loss with the trained fp32 tables (paired)"] if dt else [])
    t = Table(title=f"Loss on {what}: nats/token, 95% CI over windows", title_justify="left",
              caption="\n".join(notes) or None, caption_justify="left")
    cols = ["run", "tokens", "windows", "loss", "95% CI", "bits/byte"] + (
        ["no Engram", "bits/byte", "Δ", "Δ 95% CI"] if ko else []) + ([dt, f"{dt} Δ", "Δ 95% CI"] if dt else [])
    for c in cols:
        t.add_column(c, justify="left" if c == "run" else "right")
    for tag, r in zip(tags, runs):
        row = [f"{tag} {r.label}".strip(), f"{r.tokens:,}", f"{r.windows:,} × {r.block_size}",
               _f(r.loss), _ci(r.loss_ci95), _f(r.bits_per_byte)]
        if ko:
            row += [_f(r.knockout_loss), _f(r.knockout_bits_per_byte), _f(r.delta, signed=True), _ci(r.delta_ci95)]
        if dt:
            row += [_f(r.quant_loss), _f(r.quant_delta, signed=True, digits=4), _ci(r.quant_delta_ci95, 4)]
        t.add_row(*row)
    out.print(t)
    n = result.bucket_n
    _bucket_table(result, tags, "count", f"Loss by training count of the {n}-gram ({n - 1} preceding tokens + "
                                         "target, canonical ids)")
    _bucket_table(result, tags, "script", "Loss by script of the target token")
    layers = sorted({r.exposure_layer for r in runs if r.exposure_layer is not None})
    if layers:
        _bucket_table(result, tags, "exposure", f"Loss by collision exposure: heads of layer "
                                                f"{'/'.join(map(str, layers))} (all orders) whose row read for the "
                                                "target holds a more frequent training n-gram")
    if dt:
        for tag, r in zip(tags, runs):
            if r.quant_errors:
                rel = [e["rel_l2"] for e in r.quant_errors]
                out.print(f"[dim]{f'{tag} ' if tag else ''}tables at {dt}: relative L2 error {min(rel):.2e} – "
                          f"{max(rel):.2e} over {len(rel)} heads, largest absolute error "
                          f"{max(e['max_abs'] for e in r.quant_errors):.2e}[/]")
    if result.out:
        out.print(f"[dim]wrote[/] {result.out}/ ({', '.join(Path(p).name for p in result.files)})")


def _bucket_table(result, tags: list[str], kind: str, title: str) -> None:
    from rich.table import Table

    from engram_cli.commands.render import out

    ko = result.knockout is not None
    dt = result.table_dtype if result.table_dtype != "fp32" else None
    t = Table(title=title + ": nats/token", title_justify="left")
    t.add_column("bucket")
    for tag in tags:
        for c in ("tokens", "share", "loss") + (("no Engram", "Δ", "Δ 95% CI") if ko else ()) + (
                (dt, f"{dt} Δ", "Δ 95% CI") if dt else ()):
            t.add_column(f"{tag} {c}".strip(), justify="right")
    names = list(dict.fromkeys(b.bucket for r in result.runs for b in r.buckets if b.kind == kind))
    if kind == "exposure":
        names.sort(key=int)
    for name in names:
        row = [name]
        for r in result.runs:
            b = r.find_bucket(kind, name)
            if b is None:  # this run has no such bucket (a pure-MoE run, or fewer heads)
                row += ["–"] * (3 + 3 * ko + 3 * bool(dt))
                continue
            row += [f"{b.tokens:,}", f"{b.tokens / max(r.tokens, 1):.1%}", _f(b.loss)]
            if ko:
                row += [_f(b.knockout_loss), _f(b.delta, signed=True), _ci(b.delta_ci95)]
            if dt:
                row += [_f(b.quant_loss), _f(b.quant_delta, signed=True, digits=4), _ci(b.quant_delta_ci95, 4)]
        t.add_row(*row)
    out.print(t)
