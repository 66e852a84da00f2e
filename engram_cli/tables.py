"""``engram build-tables``: N-gram statistics, the table plan, and measured collisions.

One run reads a corpus through the tokenizer and vocab map of a vocab artifact, counts every
n-gram of canonical ids (n = 1..max_n, never across documents), makes the table plan (prime
sizes per layer, order and head, and the hash multipliers; ``engram_cli.hashing``) and measures
how often the plan's hashing collides on the corpus's distinct n-grams, beside what uniform
hashing predicts (``engram_cli.collisions``).

Sharded counting: ``shard=(I, N)`` counts only documents whose index % N == I and writes an
``engram.ngram_shard`` artifact (counts only). ``from_shards=[...]`` merges shard artifacts into
exactly the statistics of one run over the whole corpus, then plans and measures as usual.

Artifact (``engram.tables``)::

    table_plan.json         the plan `engram train` builds its model from
    ngrams/                 exact counts per order (Parquet) + ngram_stats.json
    top_ngrams.parquet      the most frequent n-grams per order with decoded text
    collisions.parquet      per layer/order/head: measured figures and uniform-hashing predictions
    slot_load.png           slot-load histogram (measured vs predicted)
    collision_sweep.png     collision rate vs table size (with --sweep; + collision_sweep.parquet)
    manifest.json
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engram_cli.artifacts import artifact_dir, check_output_dir, read_manifest, sha256_file
from engram_cli.errors import ArtifactError, ConfigError, InputError
from engram_cli.progress import ProgressFn, report
from engram_cli.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
from engram_cli.vocab import VOCAB_MAP_FILE, VocabMap, load_vocab

PLAN_FILE = "table_plan.json"
NGRAMS_DIR = "ngrams"
TOP_FILE = "top_ngrams.parquet"
COLLISIONS_FILE = "collisions.parquet"
SLOT_LOAD_PNG = "slot_load.png"
SWEEP_PNG = "collision_sweep.png"
SWEEP_FILE = "collision_sweep.parquet"


@dataclass
class BuildTablesConfig:
    """Options of ``engram build-tables`` (defaults follow the reference Engram configuration)."""

    vocab: Path                                  # engram.vocab artifact (normalize-vocab)
    out: Path                                    # artifact directory to write
    sources: list[str] = field(default_factory=list)  # corpus files/globs/dirs/hf:NAME
    tokenizer: str = DEFAULT_TOKENIZER           # must be the tokenizer the vocab was built from
    text_column: str = "text"                    # field of JSONL/Parquet/datasets inputs
    doc_mode: str = "file"                       # .txt/.md: "file" (one document) or "line"
    max_tokens: int | None = None                # stop after this many tokens
    hf_split: str = "train"                      # split of a datasets directory / hub dataset
    skip_bad_files: bool = True                  # skip (and count) unreadable / non-UTF-8 files
    shard: tuple[int, int] | None = None         # (I, N): count 1/N of the documents, write counts only
    from_shards: list[Path] = field(default_factory=list)  # merge these shard artifacts instead of reading
    max_n: int = 3                               # largest n-gram order (reference: 3)
    layer_ids: tuple[int, ...] = (1, 15)         # Engram layers (reference: [1, 15])
    n_head_per_ngram: int = 8                    # hash heads per order (reference: 8)
    seed: int = 0                                # multiplier seed (reference: 0)
    pad_id: int = 2                              # ORIGINAL id read before a sequence (reference: 2)
    embed_dim_per_head: int = 32                 # row width of each head's table
    target_size: int | None = None               # slots per head, every order (default 5 x vocab)
    target_collision_rate: float | None = None   # size each order so uniform hashing collides this often
    memory_budget: int | None = None             # bytes for all tables, at `dtype`
    dtype: str = "bf16"                          # element type for memory figures/budget
    top_k: int = 20                              # n-grams per order in the report
    sweep: bool = False                          # measure collision rate vs table size and plot it
    spill_dir: Path | None = None                # where partial counts spill (default: a temp dir)
    batch_size: int = 1024                       # documents per tokenizer batch (see docs/corpus.md)
    force: bool = False

    def resolved(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("vocab", "out", "spill_dir"):
            d[k] = str(d[k]) if d[k] is not None else None
        d["from_shards"] = [str(p) for p in self.from_shards]
        d["layer_ids"] = list(self.layer_ids)
        return d


@dataclass
class BuildTablesResult:
    out: Path
    kind: str                          # "tables" or "shard"
    documents: int
    tokens: int
    skipped_files: list[tuple[str, str]]
    seconds: float
    tokens_per_second: float
    orders: list[dict]                 # per n: total, distinct, singletons share, coverage
    top: dict[int, list[dict]]         # per n: [{rank, count, share, text, ids}]
    plan: dict | None                  # plan.to_dict() plus memory per dtype
    memory: dict[str, int] | None      # bytes per dtype
    collisions: list[dict] | None      # per layer/order: measured vs predicted
    sweep: list[dict] | None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["top"] = {str(k): v for k, v in self.top.items()}
        return d


# ---------------------------------------------------------------------------------------------
# loading a tables artifact (what `engram train` and `engram inspect-gates` read)


@dataclass
class TablesArtifact:
    path: Path
    manifest: dict
    plan: "TablePlan"  # noqa: F821
    vocab: VocabMap
    tokenizer_fingerprint: str
    tokenizer_spec: str

    @property
    def corpus_config(self) -> dict:
        c = self.manifest["config"]
        return {k: c[k] for k in ("sources", "text_column", "doc_mode")}


def load_tables(directory: str | os.PathLike, vocab_dir: str | os.PathLike | None = None) -> TablesArtifact:
    """Load and validate an ``engram.tables`` artifact and the vocab map it was built with.

    The vocab artifact is found at the path recorded in the manifest unless ``vocab_dir`` is
    given; either way its ``vocab_map.npy`` must have the recorded sha256.
    """
    from engram_cli.hashing import TablePlan

    directory = Path(directory)
    manifest = read_manifest(directory, "engram.tables")
    plan = TablePlan.load(directory / PLAN_FILE)
    rec = manifest["inputs"]["vocab"]
    vdir = Path(vocab_dir) if vocab_dir is not None else Path(rec["path"])  # recorded resolved
    vocab = load_vocab(vdir)
    if vocab.fingerprint != rec["sha256"]:
        raise ArtifactError(
            f"tables {directory} were built with another vocab map than {vdir} "
            f"(sha256 {rec['sha256'][:12]}…, found {vocab.fingerprint[:12]}…)",
            "pass the vocab directory the tables were built from (--vocab), or rebuild with `engram build-tables`")
    if plan.canonical_vocab_size != vocab.canonical_vocab_size:
        raise ArtifactError(f"table plan in {directory} is for {plan.canonical_vocab_size} canonical ids, "
                            f"the vocab map has {vocab.canonical_vocab_size}",
                            "rebuild the tables with `engram build-tables --force`")
    return TablesArtifact(path=directory, manifest=manifest, plan=plan, vocab=vocab,
                          tokenizer_fingerprint=manifest["inputs"]["tokenizer"]["sha256"],
                          tokenizer_spec=manifest["config"]["tokenizer"])


# ---------------------------------------------------------------------------------------------
# building


def _check_config(c: BuildTablesConfig) -> None:
    def need(ok: bool, msg: str, hint: str) -> None:
        if not ok:
            raise ConfigError(msg, hint)

    need(2 <= c.max_n <= 6, f"--max-n must be between 2 and 6, got {c.max_n}", "use --max-n 3 (the reference)")
    sizing = [x is not None for x in (c.target_size, c.target_collision_rate, c.memory_budget)]
    need(sum(sizing) <= 1, "give at most one of --target-size, --target-collision-rate, --memory-budget",
         "pick one way to size the tables")
    need(c.target_size is None or c.target_size > 0, f"--target-size must be positive, got {c.target_size}",
         "pass the slots per head, e.g. --target-size 646400")
    need(c.target_collision_rate is None or 0 < c.target_collision_rate < 1,
         f"--target-collision-rate must be in (0, 1), got {c.target_collision_rate}", "e.g. --target-collision-rate 0.05")
    need(c.memory_budget is None or c.memory_budget > 0, f"--memory-budget must be positive, got {c.memory_budget}",
         "e.g. --memory-budget 2GB")
    need(c.dtype in ("fp32", "bf16", "fp8"), f"--dtype must be fp32, bf16 or fp8, got {c.dtype!r}", "e.g. --dtype bf16")
    if c.shard is not None:
        i, n = c.shard
        need(n >= 1 and 0 <= i < n, f"--shard {i}/{n} is not a shard of {n}", "use I/N with 0 <= I < N, e.g. --shard 0/4")
        need(not c.from_shards, "--shard and --from-shards cannot be combined", "count shards first, then merge them")
    need(bool(c.sources) != bool(c.from_shards),
         "give a corpus or --from-shards" if not c.sources else "give either a corpus or --from-shards, not both",
         "e.g. `engram build-tables corpus/*.txt --vocab out/vocab --out out/tables`")


def prefetch(iterator, depth: int = 2):
    """Run ``iterator`` in a background thread, ``depth`` items ahead of the consumer.

    Tokenization (Rust, releases the GIL) then overlaps with counting in the calling thread.
    An exception in the producer is re-raised in the consumer; closing the consumer early stops
    the producer at its next item.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put((True, item))
            q.put((True, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((False, e))

    thread = threading.Thread(target=produce, name="engram-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _count_corpus(config, tok, vocab, progress):
    from engram_cli.corpus import CorpusSpec, CorpusStats, corpus_fingerprint, iter_tokenized
    from engram_cli.ngrams import NgramCounter

    spec = CorpusSpec(sources=list(config.sources), text_column=config.text_column, doc_mode=config.doc_mode,
                      shard=config.shard, max_tokens=config.max_tokens, hf_split=config.hf_split,
                      skip_bad_files=config.skip_bad_files)
    fingerprint = corpus_fingerprint(spec)
    stats = CorpusStats()
    counter = NgramCounter(config.max_n, vocab_size=vocab.canonical_vocab_size, spill_dir=config.spill_dir)
    batches = iter_tokenized(spec, tok.tokenizer, stats=stats, batch_size=config.batch_size, progress=progress)
    for batch in prefetch(batches):
        # tokenizer ids are always < vocab size, so the table is indexed without a range check
        counter.add_many(vocab.table[ids] for ids in batch)
    if stats.tokens == 0:
        raise InputError("the corpus yielded no tokens" + (f" (skipped {len(stats.skipped_files)} unreadable files)"
                                                           if stats.skipped_files else ""),
                         "check the paths, --text-column and --doc-mode")
    ngrams = counter.finish(progress=progress)
    return ngrams, stats, fingerprint


def _merge_shards(config, vocab, progress):
    from engram_cli.ngrams import NgramStats, merge_stats

    seen, parts, inputs, corpus_ids = {}, [], [], set()
    for d in config.from_shards:
        m = read_manifest(d, "engram.ngram_shard")
        if m["inputs"]["vocab"]["sha256"] != vocab.fingerprint:
            raise ArtifactError(f"shard {d} was counted with another vocab map",
                                f"recount it with --vocab {config.vocab}, or pass the matching --vocab")
        i, n = m["config"]["shard"]
        corpus_ids.add(m["inputs"]["corpus"].get("corpus_sha256"))
        if len(corpus_ids) > 1:
            raise InputError(f"shard {d} was counted over a different corpus than the others",
                             "count every shard over the same inputs and options")
        if i in seen:
            raise InputError(f"shards {seen[i]} and {d} are both shard {i}/{n}", "pass each shard once")
        seen[i] = d
        if m["config"]["max_n"] != config.max_n:
            raise InputError(f"shard {d} counted up to n={m['config']['max_n']}, this run wants --max-n {config.max_n}",
                             f"pass --max-n {m['config']['max_n']}")
        parts.append(NgramStats.load(Path(d) / NGRAMS_DIR))
        inputs.append({"path": str(d), "shard": [i, n], "manifest_sha256": sha256_file(Path(d) / "manifest.json"),
                       "corpus": m["inputs"]["corpus"]})
        total = n
    missing = sorted(set(range(total)) - set(seen))
    if missing:
        raise InputError(f"shards {', '.join(f'{i}/{total}' for i in missing)} are missing",
                         "count them with `engram build-tables ... --shard I/N` and pass all N")
    progress("merge", 0, 1)
    merged = merge_stats(parts)
    progress("merge", 1, 1)
    return merged, inputs


def _target_sizes(config, ngrams, n_orders: int) -> tuple[int, ...] | None:
    from engram_cli.hashing import target_size_for_collision_rate, target_size_for_memory_budget

    if config.target_size is not None:
        return (config.target_size,) * n_orders
    if config.target_collision_rate is not None:
        return tuple(target_size_for_collision_rate(ngrams.distinct(n), config.target_collision_rate)
                     for n in range(2, config.max_n + 1))
    if config.memory_budget is not None:
        m = target_size_for_memory_budget(config.memory_budget, n_layers=len(config.layer_ids), n_orders=n_orders,
                                          n_heads=config.n_head_per_ngram,
                                          embed_dim_per_head=config.embed_dim_per_head, dtype=config.dtype)
        return (m,) * n_orders
    return None  # the reference default: 5 x the original vocabulary size


def ngram_texts(rows: np.ndarray, vocab: VocabMap, tok) -> list[str]:
    """Readable text of canonical n-grams (one per row of canonical ids).

    Each canonical id is shown by one of its original members: the smallest original id, except
    that a word after the first position is shown by its space-prefixed member when there is one
    (so "of" + "the" reads " of the", not "ofthe").
    """
    if len(rows) == 0:
        return []
    t = tok.tokenizer
    members: dict[int, np.ndarray] = {}
    chosen: dict[tuple[int, bool], int] = {}

    def pick(cid: int, later: bool) -> int:
        key = (cid, later)
        if key not in chosen:
            if cid not in members:
                members[cid] = np.flatnonzero(vocab.table == cid)
            ms = members[cid]
            best = int(ms[0])
            if later:
                first = t.decode([best], skip_special_tokens=False).strip()
                if first[:1].isascii() and first[:1].isalpha():
                    for m in ms:
                        s = t.decode([int(m)], skip_special_tokens=False)
                        if s.startswith(" ") and not s.startswith("  "):
                            best = int(m)
                            break
            chosen[key] = best
        return chosen[key]

    return t.decode_batch([[pick(int(c), i > 0) for i, c in enumerate(r)] for r in rows],
                          skip_special_tokens=False)


def _order_rows(ngrams, max_n: int) -> list[dict]:
    rows = []
    for n in range(1, max_n + 1):
        total, distinct = ngrams.total(n), ngrams.distinct(n)
        cov = ngrams.coverage(n, [100, 1000, 10000])
        coc = ngrams.count_of_counts(n, max_c=10)  # [c] = n-grams seen exactly c times; [-1] = more
        singletons = int(coc[1])
        rows.append({"n": n, "total": int(total), "distinct": int(distinct),
                     "singletons": singletons,
                     "singleton_share": singletons / distinct if distinct else 0.0,
                     "coverage_top100": float(cov[0]), "coverage_top1000": float(cov[1]),
                     "coverage_top10000": float(cov[2]),
                     "count_of_counts": {**{str(c): int(coc[c]) for c in range(1, 11)}, ">10": int(coc[-1])}})
    return rows


def build_tables(config: BuildTablesConfig, progress: ProgressFn | None = None) -> BuildTablesResult:
    """Count n-grams, plan the tables, measure collisions; write an ``engram.tables`` artifact
    (or an ``engram.ngram_shard`` artifact with ``config.shard``)."""
    progress = report(progress)
    _check_config(config)
    check_output_dir(config.out, config.force)
    t0 = time.perf_counter()
    vocab = load_vocab(config.vocab)
    tok = load_tokenizer(config.tokenizer)
    vocab.check_tokenizer(tok)
    if not 0 <= config.pad_id < vocab.original_vocab_size:
        raise ConfigError(f"--pad-id {config.pad_id} is outside the vocabulary (0..{vocab.original_vocab_size - 1})",
                          "pass an original token id, e.g. --pad-id 2 (DeepSeek's pad token)")
    if config.memory_budget is not None and config.shard is None:
        _target_sizes(config, None, config.max_n - 1)  # an impossible budget fails before counting
    vocab_input = {"path": str(Path(config.vocab).resolve()), "sha256": vocab.fingerprint,
                   "canonical_vocab_size": vocab.canonical_vocab_size}

    stats = None
    if config.from_shards:
        ngrams, shard_inputs = _merge_shards(config, vocab, progress)
        corpus_input = {"shards": shard_inputs}
        skipped: list = []
    else:
        ngrams, stats, corpus_input = _count_corpus(config, tok, vocab, progress)
        skipped = [tuple(x) for x in stats.skipped_files]
    seconds = time.perf_counter() - t0
    tokens = int(ngrams.tokens)
    orders = _order_rows(ngrams, config.max_n)
    inputs = {"tokenizer": tok.describe(), "vocab": vocab_input, "corpus": corpus_input}
    common = dict(documents=int(ngrams.documents), tokens=tokens, skipped_files=skipped,
                  seconds=seconds, tokens_per_second=tokens / seconds if seconds else 0.0, orders=orders)

    if config.shard is not None:
        with artifact_dir(config.out, "engram.ngram_shard", force=config.force) as w:
            ngrams.save(w.path(NGRAMS_DIR))
            w.config, w.inputs = config.resolved(), inputs
            w.summary = {"documents": common["documents"], "tokens": tokens,
                         "distinct": {str(r["n"]): r["distinct"] for r in orders}}
        return BuildTablesResult(out=Path(config.out), kind="shard", top={}, plan=None, memory=None,
                                 collisions=None, sweep=None, **common)

    from engram_cli.collisions import measure_collisions, plot_slot_load_histogram, plot_sweep, sweep_collisions
    from engram_cli.hashing import make_plan

    n_orders = config.max_n - 1
    plan = make_plan(canonical_vocab_size=vocab.canonical_vocab_size,
                     canonical_pad_id=int(vocab.table[config.pad_id]),
                     original_vocab_size=vocab.original_vocab_size, pad_id=config.pad_id,
                     layer_ids=config.layer_ids, max_ngram_size=config.max_n,
                     n_head_per_ngram=config.n_head_per_ngram, target_sizes=_target_sizes(config, ngrams, n_orders),
                     seed=config.seed, embed_dim_per_head=config.embed_dim_per_head)
    memory = {d: plan.memory_bytes(d) for d in ("fp32", "bf16", "fp8")}

    by_order = {n: ngrams.ngrams[n] for n in range(2, config.max_n + 1)}
    counts = {n: ngrams.counts[n] for n in range(2, config.max_n + 1)}
    report_ = measure_collisions(by_order, counts, plan, progress=progress)
    collision_rows = report_.to_rows()

    top: dict[int, list[dict]] = {}
    for n in range(1, config.max_n + 1):
        ids, cnt = ngrams.top(n, config.top_k)
        texts = ngram_texts(ids, vocab, tok)
        total = max(ngrams.total(n), 1)
        top[n] = [{"rank": r + 1, "count": int(c), "share": int(c) / total, "text": t, "ids": row.tolist()}
                  for r, (row, c, t) in enumerate(zip(ids, cnt, texts))]

    sweep_rows = None
    import pyarrow as pa
    import pyarrow.parquet as pq

    with artifact_dir(config.out, "engram.tables", force=config.force) as w:
        plan.save(w.path(PLAN_FILE))
        ngrams.save(w.path(NGRAMS_DIR))
        pq.write_table(pa.Table.from_pylist([{"n": n, **row} for n, rows in top.items() for row in rows]),
                       w.path(TOP_FILE))
        pq.write_table(pa.Table.from_pylist(collision_rows), w.path(COLLISIONS_FILE))
        progress("plots", 0, 2 if config.sweep else 1)
        plot_slot_load_histogram(by_order, plan, w.path(SLOT_LOAD_PNG))
        if config.sweep:
            sweep_rows = sweep_collisions(by_order, counts, plan, _sweep_sizes(plan))
            pq.write_table(pa.Table.from_pylist(sweep_rows), w.path(SWEEP_FILE))
            plot_sweep(sweep_rows, w.path(SWEEP_PNG))
        progress("plots", 2 if config.sweep else 1, 2 if config.sweep else 1)
        w.config, w.inputs = config.resolved(), inputs
        w.summary = {
            "documents": common["documents"], "tokens": tokens,
            "orders": orders,
            "plan": {"layer_ids": list(plan.layer_ids), "target_sizes": list(plan.target_sizes),
                     "total_slots": plan.total_slots_all, "memory_bytes": memory},
            "collisions": report_.summary() if hasattr(report_, "summary") else None,
        }
    plan_dict = plan.to_dict()
    return BuildTablesResult(out=Path(config.out), kind="tables", top=top, plan=plan_dict, memory=memory,
                             collisions=collision_rows, sweep=sweep_rows, **common)


def _sweep_sizes(plan) -> list[int]:
    """Table sizes for the sweep: log-spaced from 1/16 to 4x the plan's first target."""
    t = plan.target_sizes[0]
    return sorted({max(2, int(t * f)) for f in np.geomspace(1 / 16, 4, 13)})
