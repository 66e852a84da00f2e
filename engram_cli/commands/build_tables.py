"""``engram build-tables``: n-gram statistics, the table plan, collisions (library: ``engram_cli.tables``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from engram_cli.commands.options import (
    DocMode,
    Engine,
    Force,
    HfSplit,
    Json,
    MaxTokens,
    Quiet,
    RayAddress,
    TextColumn,
    Tokenizer,
)
from engram_cli.core.errors import ConfigError

EXAMPLES = [
    ("engram build-tables sample_data/sotu/*.txt sample_data/zh_classics.jsonl --vocab out/vocab --out out/tables",
     "the reference plan: layers 1 and 15, 8 heads, 5x vocab slots"),
    ("engram build-tables corpus/ --vocab out/vocab --out out/tables --target-collision-rate 0.05 --sweep",
     "size each order for 5% colliding n-grams; plot rate vs size"),
    ("engram build-tables data.parquet --text-column body --vocab out/vocab --out out/t --memory-budget 2GB --dtype bf16",
     "fit all tables in 2 GB of bf16"),
    ("engram build-tables corpus/*.jsonl --vocab out/vocab --out shard_0 --shard 0/4",
     "count one quarter of the documents (run I = 0..3 anywhere)"),
    ("engram build-tables corpus/ --vocab out/vocab --out out/tables --engine ray --ray-address 10.0.0.1:6379",
     "count on a Ray cluster: the same tables, one task per group of files (docs/scale-out.md)"),
    ("engram build-tables --from-shards shard_0 shard_1 shard_2 shard_3 --vocab out/vocab --out out/tables",
     "merge shard counts into exactly one run's result"),
]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str, option: str = "--memory-budget") -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"{option} {text!r} is not a size", "write e.g. 2GB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--layers {text!r} is not a list of layer ids", "write e.g. --layers 1,15") from None
    if not ids:
        raise ConfigError("--layers is empty", "write e.g. --layers 1,15")
    return ids


def build_tables_command(
    corpus: Annotated[Optional[list[str]], typer.Argument(
        metavar="CORPUS...", show_default=False,
        help="Text files (.txt/.md), JSONL, Parquet, directories, globs, a `datasets` save_to_disk directory, or hf:NAME.")] = None,
    vocab: Annotated[Path, typer.Option("--vocab", "-v", metavar="DIR", help="Vocab artifact from `engram normalize-vocab`.")] = ...,  # type: ignore[assignment]
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Output tables artifact directory.")] = ...,  # type: ignore[assignment]
    tokenizer: Tokenizer = "deepseek",
    text_column: TextColumn = "text",
    doc_mode: DocMode = "file",
    max_tokens: MaxTokens = None,
    hf_split: HfSplit = "train",
    skip_bad_files: Annotated[bool, typer.Option("--skip-bad-files/--no-skip-bad-files", help="Skip unreadable or non-UTF-8 files with a counted warning, or refuse them.")] = True,
    preset: Annotated[Optional[str], typer.Option("--preset", metavar="NAME", help="A configuration DeepSeek publishes: deepseek-v3-demo (the defaults) or deepseek-v4.1-flash; options given with it must agree.")] = None,
    plan_only: Annotated[bool, typer.Option("--plan-only", help="Write the plan and its memory figures only: no corpus, nothing counted.")] = False,
    max_ngram_size: Annotated[Optional[int], typer.Option("--max-ngram-size", help="Largest n-gram order (reference: 3).")] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", metavar="IDS", help="Engram layer ids, comma-separated (reference: 1,15).")] = None,
    n_head_per_ngram: Annotated[Optional[int], typer.Option("--heads-per-ngram", min=1, help="Hash heads per n-gram order (reference: 8).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Multiplier seed (reference: 0).")] = None,
    pad_id: Annotated[Optional[int], typer.Option("--pad-id", min=0, help="Original token id read before a sequence starts (reference: 2).")] = None,
    boundary: Annotated[str, typer.Option("--boundary", metavar="RULE", help="What n-grams at a document's start read: pad-start (the reference: straight across the separator after the previous document) or document (restart after it, as at a sequence start). Recorded in the plan; training, eval and inspect-gates hash by it.")] = "pad-start",
    eos_token: Annotated[str, typer.Option("--eos-token", metavar="TOKEN", help="The separator after every document (auto: the tokenizer's end-of-sequence token); training must use the same one.")] = "auto",
    embed_dim_per_head: Annotated[Optional[int], typer.Option("--embed-dim-per-head", min=1, help="Row width of each head's table (reference: 512 / 8 = 64).")] = None,
    target_size: Annotated[Optional[int], typer.Option("--target-size", help="Slots per head for every order (default: 5 x vocabulary size).")] = None,
    target_collision_rate: Annotated[Optional[float], typer.Option("--target-collision-rate", metavar="RATE", help="Size each order so uniform hashing leaves this share of distinct n-grams colliding.")] = None,
    memory_budget: Annotated[Optional[str], typer.Option("--memory-budget", metavar="SIZE", help="Total bytes for all tables at --dtype, e.g. 2GB.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Row storage for --memory-budget: fp32, bf16 (default), fp8 or fp8-e4m3-ue8m0 (fp8 + one scale per 32 values).")] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Also measure collision rate against table size and plot it.")] = False,
    top_ngrams: Annotated[int, typer.Option("--top-ngrams", min=1, help="Most frequent n-grams listed per order.")] = 20,
    shard: Annotated[Optional[str], typer.Option("--shard", metavar="I/N", help="Count only documents with index % N == I; writes counts only.")] = None,
    from_shards: Annotated[Optional[list[Path]], typer.Option("--from-shards", metavar="DIR", help="Merge shard outputs instead of reading a corpus (repeat, or list them after it).")] = None,
    spill_dir: Annotated[Optional[Path], typer.Option("--spill-dir", metavar="DIR", help="Where partial counts spill to disk (default: a temp dir).")] = None,
    memory_limit: Annotated[Optional[str], typer.Option("--memory-limit", metavar="SIZE", help="Memory for counting: key buffers and the sorted runs kept before they spill to --spill-dir, e.g. 2GB (default: 8M-token buffers, 1 GiB of runs). The counts themselves come on top.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Threads for the tokenizer and for measuring collisions (default: all CPUs).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", metavar="DIR", help="Token cache the counting pass fills for `engram train` (default: .engram-cache next to --out, as train's).")] = None,
    cache_tokens: Annotated[bool, typer.Option("--cache-tokens/--no-cache-tokens", help="Write the tokenized corpus (4 bytes a token) to the token cache so `engram train` on it skips the tokenizer; count from it when it is there already. Shards never do.")] = True,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    tasks: Annotated[Optional[int], typer.Option("--tasks", min=1, help="--engine ray: map tasks, each a contiguous group of files (default 64; at most one per file).")] = None,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Count a corpus's n-grams, plan prime-sized multi-head hash tables, and measure collisions.

    Tokenizes the corpus with the vocab's tokenizer, maps ids to canonical ids, counts every 1..N-gram of the documents joined by their separator exactly, as the model will hash them (--boundary), makes the table plan `engram train` reads (prime sizes per layer, order and head; hash multipliers — the reference Engram scheme), and measures how often the hashing collides at those sizes beside what uniform hashing predicts.
    """
    from engram_cli.commands.render import run_command
    from engram_cli.corpus.spec import CorpusSpec, parse_shard
    from engram_cli.tables.build import BuildTablesConfig, build_tables

    if threads is not None:  # the tokenizer's thread pool reads this when it starts (first batch)
        os.environ["RAYON_NUM_THREADS"] = str(threads)

    sources = list(corpus or [])
    shards = list(from_shards or [])
    if shards and sources:  # `--from-shards a b c`: the extra directories arrive as positionals
        shards, sources = shards + [Path(s) for s in sources], []
    if shards and shard:
        raise ConfigError("--shard and --from-shards cannot be combined", "count shards first, then merge them")
    if shard and plan_only and not sources:
        raise ConfigError("--shard does not apply to --plan-only: it reads no corpus to split",
                          "drop --shard (or drop --plan-only and give the corpus to count a shard of)")
    spec = CorpusSpec(sources=sources, text_column=text_column, doc_mode=doc_mode, max_tokens=max_tokens,
                      hf_split=hf_split, skip_bad_files=skip_bad_files,
                      shard=parse_shard(shard) if shard else None) if sources else None
    config = BuildTablesConfig(
        vocab=vocab, out=out, corpus=spec, from_shards=shards, tokenizer=tokenizer, preset=preset,
        plan_only=plan_only, max_ngram_size=max_ngram_size,
        layer_ids=parse_layers(layers) if layers is not None else None, n_head_per_ngram=n_head_per_ngram, seed=seed, pad_id=pad_id,
        embed_dim_per_head=embed_dim_per_head, target_size=target_size, target_collision_rate=target_collision_rate,
        memory_budget=parse_bytes(memory_budget) if memory_budget else None,
        dtype=dtype, boundary=boundary, eos_token=eos_token, top_ngrams=top_ngrams, sweep=sweep, spill_dir=spill_dir,
        memory_limit=parse_bytes(memory_limit, "--memory-limit") if memory_limit else None, threads=threads,
        cache_dir=cache_dir, cache_tokens=cache_tokens, force=force, engine=engine, ray_address=ray_address,
        tasks=tasks)
    run_command(build_tables, config, render, json_out=json_out, quiet=quiet, rate_key="tokens")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def render(result) -> None:
    from engram_cli.commands.render import out

    if result.kind != "plan":
        render_corpus(result)
    if result.kind == "shard":
        out.print(f"[dim]wrote shard counts to[/] {result.out}/ [dim](merge with --from-shards)[/]")
        return
    render_top(result.top)
    render_plan(result)
    if result.collisions is not None:
        render_collisions(result.collisions)
    for line in result.hot_row_lines:
        out.print(f"[bold]hot rows[/] {line}")
    out.print(f"[dim]wrote[/] {result.out}/")


def render_corpus(result) -> None:
    from rich.table import Table

    from engram_cli.commands.render import err, out

    for path, why in result.skipped_files:
        err.print(f"[yellow]skipped[/] {path}: {why}")
    out.print(f"[bold]Corpus[/] {result.documents:,} documents, {result.tokens:,} tokens "
              f"[dim]({result.tokens_per_second:,.0f} tokens/s; {len(result.skipped_files)} files skipped; "
              f"{result.bad_records:,} bad records skipped)[/]")
    if result.token_cache is not None:
        c = result.token_cache
        out.print(f"[dim]token cache[/] {c['dir']}/{c['entry']} "
                  f"[dim]({'counted from it, no tokenizer pass' if c['hit'] else '`engram train` reads it'})[/]")
    t = Table(title="Distinct n-grams per order", title_justify="left")
    for col in ("n", "occurrences", "distinct", "seen once", "twice", "3-10×", ">10×", "top-100 cover", "top-10k cover"):
        t.add_column(col, justify="right")
    for r in result.orders:
        coc = r["count_of_counts"]
        mid = sum(coc[str(c)] for c in range(3, 11))
        t.add_row(str(r["n"]), f"{r['total']:,}", f"{r['distinct']:,}", f"{coc['1']:,}", f"{coc['2']:,}", f"{mid:,}",
                  f"{coc['>10']:,}", f"{r['coverage_top100']:.1%}", f"{r['coverage_top10000']:.1%}")
    out.print(t)


def render_top(top) -> None:
    from rich.markup import escape
    from rich.table import Table

    from engram_cli.commands.render import out, show_token

    for n, rows in top.items():
        if n < 2 or not rows:
            continue
        tt = Table(title=f"Top {len(rows)} {n}-grams", title_justify="left")
        tt.add_column("#", justify="right")
        tt.add_column("count", justify="right")
        tt.add_column("share", justify="right")
        tt.add_column("canonical keys")
        for row in rows[:10]:
            keys = " [dim]·[/] ".join(escape(show_token(k, 16)) for k in row.keys)
            tt.add_row(str(row.rank), f"{row.count:,}", f"{row.share:.2%}", keys)
        out.print(tt)


def render_plan(result) -> None:
    from rich.table import Table

    from engram_cli.commands.render import out

    plan = result.plan
    title = "Table plan" + (f" (preset {plan.preset})" if plan.preset else "")
    p = Table(title=title, title_justify="left")
    for col in ("layer", "n", "target", "head sizes (primes)", "multiplier m_0", "rows"):
        p.add_column(col, justify="left" if col.startswith("head") else "right")
    for layer in plan.layer_ids:
        for i, sizes in enumerate(plan.primes[layer]):
            shown = ", ".join(f"{s:,}" for s in sizes[:3]) + (f", … ({len(sizes)} heads)" if len(sizes) > 3 else "")
            p.add_row(str(layer), str(i + 2), f"{plan.target_sizes[i]:,}", shown,
                      str(plan.multipliers[layer][0]) if i == 0 else "", f"{sum(sizes):,}")
        p.add_row(str(layer), "all", "", "", "", f"[bold]{plan.total_slots(layer):,}[/]")
    out.print(p)
    for layer, rows in result.published_rows.items():
        same = rows["plan"] == rows["published"]
        out.print(f"layer {layer}: {rows['plan']:,} rows, published {rows['published']:,} "
                  + ("[green]✓ exact[/]" if same else "[red]✗ differs[/]"))
    out.print("memory: " + "   ".join(f"{d} [bold]{_bytes(b)}[/]" for d, b in result.memory.items())
              + f"   [dim]({plan.total_slots_all:,} rows of {plan.embed_dim_per_head} dims)[/]")
    tm = result.train_memory
    if tm is not None:
        ram = "RAM available unknown" if tm["ram_available"] is None else f"{_bytes(tm['ram_available'])} RAM available"
        out.print("training (float32 + optimizer state): " + "   ".join(f"{o} [bold]{_bytes(b)}[/]"
                                                                      for o, b in tm["train_bytes"].items())
                  + f"   [dim]({ram})[/]")
        if tm["mmap_advised"]:
            out.print("[yellow]more than half the RAM available:[/] train with [bold]--table-store mmap[/] "
                      "(the tables in sparse files on disk, only each step's rows in memory)")
    if plan.separator_id is not None:
        out.print(f"boundary: [bold]{plan.boundary}[/] [dim](separator id {plan.separator_id}, canonical "
                  f"{plan.canonical_separator_id}; "
                  + ("n-grams read across it" if plan.boundary == "pad-start" else "hashing restarts after it") + ")[/]")


def render_collisions(report) -> None:
    """The collision report's per-(layer, order) summary: means over heads, predictions in brackets."""
    from rich.table import Table

    from engram_cli.commands.render import out

    c = Table(title="Collisions: measured (predicted by uniform hashing)", title_justify="left")
    for col in ("layer", "n", "keys", "slots/head", "occupied", "colliding", "colliding (weighted)", "max load", "indistinguishable"):
        c.add_column(col, justify="right")
    for s in report.summary():
        c.add_row(str(s["layer"]), str(s["n"]), f"{s['keys']:,}", f"{s['slots_mean']:,.0f}",
                  f"{s['occupied_share_mean']:.1%} ({s['occupied_share_pred_mean']:.1%})",
                  f"{s['colliding_share_mean']:.2%} ({s['colliding_share_pred_mean']:.2%})",
                  f"{s['colliding_share_weighted_mean']:.2%}",
                  f"{s['max_load']} ({s['max_load_pred_mean']:.1f})",
                  f"{s['indistinguishable_share']:.2%} ({s['indistinguishable_share_pred']:.2%})")
    out.print(c)
    out.print("[dim]per-head figures are means over the order's heads, max load the largest of any head; "
              "indistinguishable = collides with the same n-gram in every head[/]")
