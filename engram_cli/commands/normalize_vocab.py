"""``engram normalize-vocab``: canonicalize a tokenizer's vocabulary (library: ``engram_cli.vocab``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engram_cli.commands.options import Force, Json, Quiet, Tokenizer

EXAMPLES = [
    ("engram normalize-vocab --out out/vocab", "the bundled DeepSeek 128k tokenizer"),
    ("engram normalize-vocab -t path/to/tokenizer.json -o out/vocab --force", "any tokenizer.json"),
    ("engram normalize-vocab -o out/vocab-cased --no-lowercase", "keep case distinctions"),
    ("engram normalize-vocab -o out/vocab --json | jq .reduction_pct", "machine-readable summary"),
]


def normalize_vocab_command(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Output vocab artifact directory.")],
    tokenizer: Tokenizer = "deepseek",
    nfkc: Annotated[bool, typer.Option("--nfkc/--no-nfkc", help="Unicode NFKC compatibility composition.")] = True,
    strip_accents: Annotated[bool, typer.Option("--strip-accents/--no-strip-accents",
                                                help="NFD + drop combining marks (é → e).")] = True,
    lowercase: Annotated[bool, typer.Option("--lowercase/--no-lowercase", help="Unicode lowercasing.")] = True,
    whitespace: Annotated[bool, typer.Option("--whitespace/--no-whitespace",
                                             help="Fold whitespace runs to one space and strip the ends.")] = True,
    top: Annotated[int, typer.Option("--top", min=0, help="Largest merge groups to list.")] = 10,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Canonicalize a tokenizer's vocabulary into an Engram vocab map.

    Case, accent and whitespace variants of a token (Apple/apple, é/e, " the"/"the") get one canonical id, exactly as the reference Engram implementation does. Writes vocab_map.npy, canonical_vocab.parquet and manifest.json to --out, and reports how much each step saves.
    """
    from engram_cli.commands.render import run_command
    from engram_cli.vocab.normalize import NormalizeSteps, NormalizeVocabConfig, normalize_vocab

    config = NormalizeVocabConfig(
        out=out, tokenizer=tokenizer, force=force, top_groups=top,
        steps=NormalizeSteps(nfkc=nfkc, strip_accents=strip_accents, lowercase=lowercase, whitespace=whitespace))
    run_command(normalize_vocab, config, render, json_out=json_out, quiet=quiet)




def render(result) -> None:
    from rich.table import Table

    from engram_cli.commands.render import out, show_token

    out.print(f"[bold]Vocabulary[/] {result.tokenizer['source']}  [dim](steps: {result.steps})[/]")
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_row("original ids", f"{result.original_vocab_size:,}")
    t.add_row("canonical ids", f"{result.canonical_vocab_size:,}")
    t.add_row("reduction", f"[bold green]{result.reduction_pct:.2f}%[/]")
    t.add_row("byte-fragment tokens kept raw", f"{result.byte_fragment_tokens:,}")
    out.print(t)
    if result.ablation:
        a = Table(title="Contribution of each step (cumulative)", title_justify="left")
        a.add_column("steps on")
        a.add_column("canonical ids", justify="right")
        a.add_column("reduction", justify="right")
        a.add_column("step adds", justify="right")
        prev = 0.0
        for row in result.ablation:
            a.add_row(row.steps, f"{row.canonical_vocab_size:,}", f"{row.reduction_pct:.2f}%",
                      f"+{row.reduction_pct - prev:.2f} pts")
            prev = row.reduction_pct
        out.print(a)
    if result.largest_groups:
        g = Table(title="Largest merge groups", title_justify="left")
        g.add_column("canonical id", justify="right")
        g.add_column("key")
        g.add_column("members", justify="right")
        g.add_column("examples")
        for grp in result.largest_groups:
            g.add_row(str(grp.canonical_id), show_token(grp.key), str(grp.member_count),
                      "  ".join(show_token(m, 16) for m in grp.members), end_section=False)
        out.print(g)
    out.print(f"[dim]wrote[/] {result.out}/ (vocab_map.npy, canonical_vocab.parquet, manifest.json)")
