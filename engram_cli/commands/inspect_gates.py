"""``engram inspect-gates``: the Engram gate of every token, pictured (library: ``engram_cli.gates``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from engram_cli.commands.options import DocMode, Json, MaxTokens, Quiet, TextColumn
from engram_cli.core.errors import ConfigError, InputError

EXAMPLES = [
    ("engram inspect-gates --model out/run \"Alexander the Great founded many cities.\"",
     "gates of a sentence, shaded in the terminal"),
    ("engram inspect-gates -m out/run -f sample_data/sentences.txt --out out/gates",
     "also a heatmap (gates.png, gates.svg) and tokens.parquet"),
    ("engram inspect-gates -m out/run-a --compare out/run-b -f sample_data/sentences.txt -o out/cmp",
     "two runs on the same text, stacked in one picture"),
    ("engram inspect-gates -m out/run --step 200 --compare-step 1000 \"北京大学位于北京市海淀区。\"",
     "one run at two checkpoints"),
    ("cat notes.txt | engram inspect-gates -m out/run - --csv gates.csv",
     "text from stdin; per-token values as CSV"),
    ("engram inspect-gates -m out/run --corpus sample_data/sotu --out out/gates-sotu",
     "corpus mode: n-grams with the highest/lowest mean gate, histograms, gate by frequency"),
    ("engram inspect-gates -m out/run \"By the way\" --json | jq '.runs[0].tokens[].gates'",
     "machine-readable per-token records"),
]


def inspect_gates_command(
    args: Annotated[Optional[list[str]], typer.Argument(
        metavar="TEXT", show_default=False,
        help="The text to inspect, quoted (`-` reads stdin). With --corpus: more corpus sources.")] = None,
    model: Annotated[Path, typer.Option("--model", "-m", metavar="RUN_DIR", help="Run directory from `engram train`.")] = ...,  # type: ignore[assignment]
    file: Annotated[Optional[str], typer.Option("--file", "-f", metavar="F", help="Read the text from a UTF-8 file (`-`: stdin).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Write pictures, Parquet tables and a manifest here.")] = None,
    step: Annotated[Optional[int], typer.Option("--step", min=0, help="Checkpoint step of --model (default: the latest).")] = None,
    compare: Annotated[Optional[Path], typer.Option("--compare", metavar="RUN_DIR2", help="A second run to show beside the first (same tokenizer).")] = None,
    compare_step: Annotated[Optional[int], typer.Option("--compare-step", min=0, help="Checkpoint step of --compare; alone: --model at another step.")] = None,
    corpus: Annotated[Optional[list[str]], typer.Option("--corpus", metavar="SOURCES...", help="Corpus mode: files, directories, globs or hf:NAME (as build-tables).")] = None,
    text_column: TextColumn = "text",
    doc_mode: DocMode = "file",
    max_tokens: MaxTokens = None,
    min_count: Annotated[int, typer.Option("--min-count", min=1, help="Corpus: rank (and save) only n-grams seen this often.")] = 5,
    top: Annotated[int, typer.Option("--top", min=1, help="Corpus: n-grams listed per layer, order and end.")] = 15,
    csv: Annotated[Optional[Path], typer.Option("--csv", metavar="F", help="Write per-token gates as CSV.")] = None,
    parquet: Annotated[Optional[Path], typer.Option("--parquet", metavar="F", help="Write per-token gates as Parquet.")] = None,
    wrap: Annotated[int, typer.Option("--wrap", min=1, help="Tokens per row of the heatmap.")] = 40,
    overlap: Annotated[Optional[int], typer.Option("--overlap", min=0, help="Overlap of the windows a long text is cut into (default: half of block_size).")] = None,
    separator: Annotated[bool, typer.Option("--separator/--no-separator", help="Read the text after the run's document separator (EOS), as in training.")] = True,
    device: Annotated[str, typer.Option("--device", help="Torch device to run the model on.")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out artifact or --csv/--parquet file (never an input).")] = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Show the Engram gate α of every token at every Engram layer, from the model's own forward pass.

    A text (argument, --file or stdin) is tokenized with the run's tokenizer and run through the trained model; the gate each Engram layer computed for each token is shaded in the terminal and, with --out, drawn as a heatmap (PNG + SVG). --compare / --compare-step put a second run or checkpoint beside it. With --corpus it aggregates over a corpus instead: the n-grams with the highest and lowest mean gate, a gate histogram per layer and the mean gate by token frequency.
    """
    from engram_cli.commands.render import run_command
    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.gates import InspectGatesConfig, inspect_gates

    sources = list(corpus or [])
    positional = list(args or [])
    text = None
    if sources:
        sources += positional  # `--corpus a b c`: the extra sources arrive as positionals
    elif len(positional) > 1:
        raise ConfigError(f"expected one TEXT argument, got {len(positional)}", "quote the text: \"like this\"")
    elif positional:
        text = positional[0]
    if text == "-" or file == "-":
        if text not in (None, "-"):
            raise ConfigError("both TEXT and --file were given", "pass one of them")
        text, file = _stdin(), None
    spec = CorpusSpec(sources=sources, text_column=text_column, doc_mode=doc_mode, max_tokens=max_tokens) \
        if sources else None
    config = InspectGatesConfig(
        model=model, text=text, text_file=Path(file) if file else None, step=step, compare=compare,
        compare_step=compare_step, corpus=spec, out=out, force=force, csv=csv, parquet=parquet, wrap=wrap,
        overlap=overlap, min_count=min_count, top=top, separator=separator, device=device)
    run_command(inspect_gates, config, render_corpus if config.mode == "corpus" else render_text,
                json_out=json_out, quiet=quiet, rate_key="tokens")


def _stdin() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise InputError("`-` reads the text from stdin, but stdin is a terminal", "pipe the text in: cat F | engram ...")
    return sys.stdin.read()


# ---------------------------------------------------------------------------------------------
# text and compare mode


def _shown(token: str) -> str:
    """A token as printed in the shaded text: natural spacing, line breaks and invisibles marked."""
    if token == "":
        return "·"
    out = []
    for ch in token:
        if ch in "\n\t\r":
            out.append({"\n": "⏎", "\t": "⇥", "\r": "␍"}[ch])
        elif ch != " " and not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _styled(value: float):
    from rich.color import Color
    from rich.style import Style

    from engram_cli.gates.text import gate_rgb, readable_on

    rgb = gate_rgb(value)
    return Style(bgcolor=Color.from_rgb(*rgb), color=readable_on(rgb))


def legend():
    """``gate α 0.0 ▏shades▕ 1.0`` as a Rich Text."""
    from rich.text import Text

    t = Text()
    t.append("gate α  0.0 ", style="dim")
    for i in range(11):
        t.append("  ", style=_styled(i / 10))
    t.append(" 1.0", style="dim")
    return t


def render_text(report) -> None:
    from rich.table import Table
    from rich.text import Text

    from engram_cli.commands.render import out

    traces = report.traces
    many = len(traces) > 1
    tags = [chr(ord("A") + i) for i in range(len(traces))] if many else [""]
    for tag, t in zip(tags, traces):
        prefix = f"[bold]{tag}[/] = " if many else ""
        out.print(f"{prefix}[bold]{t.label}[/]  [dim]{len(t.tokens)} tokens, Engram layers "
                  f"{', '.join(map(str, t.layer_ids))}{f', {t.hc_mult} branches' if t.hc_mult > 1 else ''}"
                  f"{f', {t.windows} windows' if t.windows > 1 else ''}[/]")
    out.print(legend())
    labels = [f"{tag} {lab}".strip() for tag, t in zip(tags, traces) for lab in t.row_labels]
    label_w = max(len(lab) for lab in labels) + 2
    shown = [_shown(tok) for tok in traces[0].tokens]
    width = max(20, out.width - label_w)
    start = 0
    while start < len(shown):  # wrap the tokens into lines that fit the console
        end, used = start, 0
        while end < len(shown) and (used + Text(shown[end]).cell_len <= width or end == start):
            used += Text(shown[end]).cell_len
            end += 1
        out.print()
        for tag, t in zip(tags, traces):
            for r, lab in enumerate(t.row_labels):
                line = Text(f"{tag} {lab}".strip().ljust(label_w), style="bold" if r == 0 else "")
                for i in range(start, end):
                    line.append(shown[i], style=_styled(float(t.gates[r, i])))
                out.print(line, no_wrap=True, crop=False, overflow="ignore")
        start = end
    out.print()
    s = Table(title="Gate α per row", title_justify="left")
    for col in ("row", "mean", "min", "max"):
        s.add_column(col, justify="right" if col != "row" else "left")
    for tag, t in zip(tags, traces):
        for lab, g in t.summary().items():
            s.add_row(f"{tag} {lab}".strip(), f"{g['mean']:.3f}", f"{g['min']:.3f}", f"{g['max']:.3f}")
    out.print(s)
    for f in report.files:
        out.print(f"[dim]wrote[/] {f}")


# ---------------------------------------------------------------------------------------------
# corpus mode


def render_corpus(result) -> None:
    from rich.table import Table

    from engram_cli.commands.render import out, show_token

    c = result.corpus
    out.print(f"[bold]{result.label}[/] over {result.documents:,} documents, {result.tokens:,} tokens "
              f"[dim]({result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s; "
              f"{len(c.get('skipped_files', []))} files skipped)[/]")
    s = Table(title="Gate α over all tokens", title_justify="left")
    for col in ("row", "mean", "std"):
        s.add_column(col, justify="right" if col != "row" else "left")
    for lab in result.rows:
        s.add_row(lab, f"{result.mean[lab]:.3f}", f"{result.std[lab]:.3f}")
    out.print(s)
    shown = 8
    for layer in result.layer_ids:
        t = Table(title=f"Layer {layer}: n-grams by mean gate (seen ≥ {result.min_count} times)", title_justify="left")
        t.add_column("n", justify="right")
        t.add_column("highest", style="green")
        t.add_column("α", justify="right")
        t.add_column("count", justify="right", style="dim")
        t.add_column("lowest", style="red")
        t.add_column("α", justify="right")
        t.add_column("count", justify="right", style="dim")
        for n in sorted(result.distinct_ngrams):
            hi = [e for e in result.extremes if e["layer"] == layer and e["n"] == n and e["kind"] == "highest"]
            lo = [e for e in result.extremes if e["layer"] == layer and e["n"] == n and e["kind"] == "lowest"]
            for i in range(min(shown, max(len(hi), len(lo)))):
                row = [str(n) if i == 0 else ""]
                for side in (hi, lo):
                    if i < len(side):
                        row += [show_token(side[i]["text"], 32), f"{side[i]['gate']:.3f}", f"{side[i]['count']:,}"]
                    else:
                        row += ["", "", ""]
                t.add_row(*row, end_section=i == min(shown, max(len(hi), len(lo))) - 1)
        out.print(t)
    f = Table(title="Mean gate α by token frequency in the corpus", title_justify="left")
    f.add_column("frequency", justify="right")
    f.add_column("tokens", justify="right")
    f.add_column("distinct", justify="right")
    for lab in result.rows:
        f.add_column(lab, justify="right")
    buckets: dict[tuple[int, int], dict] = {}
    for r in result.frequency:
        b = buckets.setdefault((r["freq_lo"], r["freq_hi"]), {"tokens": r["tokens"], "distinct": r["distinct_tokens"]})
        b[r["row"]] = r["mean_gate"]
    for (lo, hi), b in buckets.items():
        f.add_row(f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}", f"{b['tokens']:,}", f"{b['distinct']:,}",
                  *(f"{b[lab]:.3f}" for lab in result.rows))
    out.print(f)
    if result.out:
        out.print(f"[dim]wrote[/] {result.out}/ ({', '.join(Path(p).name for p in result.files)})")
