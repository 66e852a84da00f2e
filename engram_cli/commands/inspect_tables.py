"""``engram inspect-tables``: what a trained memory stored, where, and what collisions cost
(library: ``engram_cli.inspect_tables``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from engram_cli.commands.options import Force, Json, Quiet

EXAMPLES = [
    ("engram inspect-tables out/run", "the whole-table report: use, movement, spectrum, collision load, top rows"),
    ("engram inspect-tables out/run --out out/tables-report",
     "also Parquet tables, norm_vs_count.png, spectrum.png and a manifest"),
    ("engram inspect-tables out/run --ngram \"united states\"",
     "its slot in every head, the n-grams sharing it, the memory's logit lens"),
    ("engram inspect-tables out/run --row 1:0:4812 --step 200", "one row at an earlier checkpoint"),
    ("engram inspect-tables out/run --ngram \"new york\" --json | jq '.queries[0].layers[0].lens'",
     "the logit lens as JSON"),
]


def inspect_tables_command(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory from `engram train`.")],
    tables: Annotated[Optional[Path], typer.Option(
        "--tables", "-T", metavar="DIR", help="The tables artifact the run's plan comes from (default: the one the run recorded).")] = None,
    ngram: Annotated[Optional[list[str]], typer.Option(
        "--ngram", metavar="TEXT", help="Ask about one n-gram (2..max order tokens); repeatable.")] = None,
    row: Annotated[Optional[list[str]], typer.Option(
        "--row", metavar="LAYER:HEAD:SLOT", help="Ask about one table row; repeatable.")] = None,
    step: Annotated[Optional[int], typer.Option("--step", min=0, help="Checkpoint step (default: the latest).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", metavar="DIR", help="Write Parquet tables, pictures and a manifest here.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Rows listed per head; tokens per logit lens.")] = 10,
    sharing: Annotated[int, typer.Option("--sharing", min=1, help="N-grams listed per row.")] = 8,
    block_rows: Annotated[int, typer.Option("--block-rows", min=1, help="Table rows read per block.")] = 1 << 16,
    vocab: Annotated[Optional[Path], typer.Option(
        "--vocab", metavar="DIR", help="The vocab artifact, if not where the run recorded it.")] = None,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Open a trained Engram memory: what its rows stored, which rows training reached, and what collisions cost.

    Without --ngram/--row: the whole-table report per layer, order and head — rows addressed by the corpus's n-grams, updated in training and never touched; how far rows moved from their initial values; norm and movement against the summed count of the n-grams in each row; the spectrum of the updated rows against the same rows at initialization; the collision load (rows holding 1, 2, 3+ n-grams); the rows that moved most, with their n-grams. --ngram TEXT shows the n-gram's slot in every head, the corpus n-grams sharing it and the memory's logit lens (W_V of the retrieved rows through the final norm and the LM head; the gate and the conv are left out). --row LAYER:HEAD:SLOT shows one row.
    """
    from engram_cli.commands.render import run_command
    from engram_cli.inspect_tables import InspectTablesConfig, inspect_tables

    config = InspectTablesConfig(run=run, tables=tables, step=step, ngrams=list(ngram or []), rows=list(row or []),
                                 out=out, force=force, top=top, sharing=sharing, block_rows=block_rows, vocab=vocab)
    run_command(inspect_tables, config, render, json_out=json_out, quiet=quiet)


# ---------------------------------------------------------------------------------------------
# rendering


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def render(result) -> None:
    from engram_cli.commands.render import out

    out.print(f"[bold]{result.run}[/]  [dim]tables {result.tables}[/]")
    if result.mode == "query":
        for q in result.queries:
            _render_ngram(q) if q["kind"] == "ngram" else _render_row(q)
        out.print("[dim]lens: W_V of the retrieved rows → final norm → LM head; gate and conv left out[/]")
    else:
        _render_report(result)
    if result.out:
        out.print(f"[dim]wrote[/] {result.out}/ ({', '.join(Path(p).name for p in result.files)})")


def _render_report(result) -> None:
    from rich.table import Table

    from engram_cli.commands.render import count, out

    t = Table(title="Use and movement per head (movement: L2 distance from the initial row, updated rows)",
              title_justify="left")
    for c in ("layer", "head", "n", "rows", "addressed", "updated", "never touched", "addr. not upd.",
              "movement mean", "max", "eff. rank", "init", "near-dup"):
        t.add_column(c, justify="right")
    for s in result.layers:
        for h in s.heads:
            t.add_row(str(h.layer), str(h.head), str(h.n), count(h.rows), count(h.addressed), count(h.updated),
                      count(h.never_touched), count(h.addressed_not_updated), _f(h.movement_mean, 4),
                      _f(h.movement_max, 4), _f(h.effective_rank, 1), _f(h.effective_rank_init, 1),
                      f"{h.duplicate_rows}/{h.duplicate_pool}")
    out.print(t)
    t = Table(title="Collision load: rows holding 1, 2, 3+ distinct n-grams (and the share of the order's "
                    "occurrences in them)", title_justify="left")
    for c in ("layer", "head", "n", "load 1", "load 2", "load 3+", "tokens 1", "tokens 2", "tokens 3+"):
        t.add_column(c, justify="right")
    for s in result.layers:
        for h in s.heads:
            t.add_row(str(h.layer), str(h.head), str(h.n), count(h.load_1), count(h.load_2), count(h.load_3plus),
                      f"{h.count_share_1:.1%}", f"{h.count_share_2:.1%}", f"{h.count_share_3plus:.1%}")
    out.print(t)
    if result.collision_check:
        out.print(f"[dim]collision load {result.collision_check}[/]")
    t = Table(title="Norm and movement by the summed count of the row's n-grams", title_justify="left")
    for c in ("layer", "n", "count", "rows", "updated", "norm mean", "movement mean", "median"):
        t.add_column(c, justify="right")
    for s in result.layers:
        for r in s.frequency:
            t.add_row(str(r["layer"]), str(r["n"]), r["count_range"], count(r["rows"]), f"{r['updated_share']:.0%}",
                      _f(r["norm_mean"], 4), _f(r["movement_mean"], 4), _f(r["movement_median"], 4))
    out.print(t)
    t = Table(title="Rows that moved most (first 3 per head) and the n-grams hashed there", title_justify="left")
    for c in ("layer", "head", "slot", "movement", "load", "n-grams (count)"):
        t.add_column(c, justify="left" if c.startswith("n-grams") else "right")
    for s in result.layers:
        for r in s.top_rows:
            if r["rank"] <= 3:
                t.add_row(str(r["layer"]), str(r["head"]), f"{r['slot']:,}", _f(r["movement"], 4), str(r["load"]),
                          _ngrams(r["ngrams"]))
    out.print(t)


def _ngrams(recs: list[dict], k: int = 4) -> str:
    from rich.markup import escape

    return ", ".join(f"{escape(g['ngram'])} ({g['count']:,})" for g in recs[:k]) or "[dim]none[/]"


def _lens(tokens: list[dict], k: int = 8) -> str:
    from rich.markup import escape

    from engram_cli.commands.render import show_token

    return "  ".join(f"{escape(show_token(t['token']))} {t['prob']:.2%}" for t in tokens[:k])


def _row_table(title: str, heads: list[dict]):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in ("layer", "head", "n", "slot", "norm", "movement", "updated", "load", "n-grams there (count)"):
        t.add_column(c, justify="left" if c.startswith("n-grams") else "right")
    for h in heads:
        t.add_row(str(h["layer"]), str(h["head"]), str(h["n"]), f"{h['slot']:,}", _f(h["norm"], 4),
                  _f(h["movement"], 4), "yes" if h["updated"] else "no", str(h["load"]), _ngrams(h["ngrams"]))
    return t


def _render_ngram(q: dict) -> None:
    from rich.markup import escape

    from engram_cli.commands.render import out

    keys = " · ".join(escape(k) for k in q["canonical_keys"])
    out.print(f"\n[bold]--ngram {escape(q['ngram'])!s}[/]  canonical keys: {keys}")
    for layer in q["layers"]:
        out.print(_row_table(f"Layer {layer['layer']}: its row in every head", layer["heads"]))
        out.print(f"[bold]memory lens[/] (all orders): {_lens(layer['lens'])}")
        for n, o in layer["lens_by_order"].items():
            out.print(f"  order {n} ({escape(o['ngram'])}): {_lens(o['lens'])}")


def _render_row(q: dict) -> None:
    from engram_cli.commands.render import out

    out.print(_row_table(f"\n--row {q['address']} (row {q['row']:,} of layer {q['layer']})", [q]))
    out.print(f"[bold]lens[/] (this row alone): {_lens(q['lens'])}")
