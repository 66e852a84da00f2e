"""``engram build-tables``: N-gram statistics, the table plan, and measured collisions.

One run reads a corpus through the tokenizer and vocab map of a vocab artifact, counts every
n-gram of canonical ids (n = 1..max_ngram_size) of the documents joined by their separator under
the plan's boundary rule (``engram_cli.tables.boundary``), makes the table plan (prime
sizes per layer, order and head, and the hash multipliers; ``engram_cli.tables.hashing``) and measures
how often the plan's hashing collides on the corpus's distinct n-grams, beside what uniform
hashing predicts (``engram_cli.tables.collisions``).

Sharded counting: ``shard=(I, N)`` counts only documents whose index % N == I and writes an
``engram.ngram_shard`` artifact (counts only, and under pad-start its documents' edges).
``from_shards=[...]`` merges shard artifacts into exactly the statistics of one run over the
whole corpus, then plans and measures as usual.

Token cache: the tokenizer pass that counts also writes the corpus's token stream to the token
cache (``engram_cli.corpus.cache``), keyed as ``engram train`` keys it, so train on the same
inputs does not tokenize again; an existing entry is counted from instead of the tokenizer.
Shards neither write nor read it (a shard's stream is not the corpus's).

Artifact (``engram.tables``)::

    table_plan.json         the plan `engram train` builds its model from
    ngrams/                 exact counts per order (Parquet) + ngram_stats.json
    top_ngrams.parquet      the most frequent n-grams per order with their canonical keys' text
    collisions.parquet      per layer/order/head: measured figures and uniform-hashing predictions
    slot_load.png           slot-load histogram (measured vs predicted)
    collision_sweep.png     collision rate vs table size (with --sweep; + collision_sweep.parquet)
    hot_rows.parquet        per layer: share of lookups the K hottest rows serve (engram_cli.tables.hotrows)
    hot_rows.png            the same as a curve, with the cache sizes for 50/90/99%
    manifest.json
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engram_cli.core.artifacts import (
    MANIFEST,
    artifact_dir,
    check_output_dir,
    holds_output_lock,
    read_manifest,
    sha256_file,
)
from engram_cli.core.cluster import check_engine
from engram_cli.core.errors import ArtifactError, ConfigError, InputError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.corpus.cache import (
    TokenCache,
    TokenCacheWriter,
    cache_key,
    default_cache_dir,
    find_token_cache,
    iter_cached_documents,
    splits_into_documents,
)
from engram_cli.corpus.spec import CorpusSpec, CorpusStats
from engram_cli.corpus.stream import corpus_fingerprint, empty_corpus_error, iter_tokenized, prefetch
from engram_cli.tables.boundary import Boundary, check_rule
from engram_cli.tables.collision_plots import plot_slot_load_histogram, plot_sweep
from engram_cli.tables.collisions import CollisionReport, measure_tables, sweep_collisions
from engram_cli.tables.counting import NgramCounter, counter_sizes, merge_stats
from engram_cli.tables.hotrows import HotRowCurve, cache_lines, hot_row_curves, plot_hot_rows
from engram_cli.tables.plan import MAX_EMBED_DIM_PER_HEAD, PLAN_FILE, TABLE_DTYPES, TablePlan, make_plan, row_bytes
from engram_cli.tables.presets import PLAN_OPTIONS, check_published_rows, resolve_plan_options
from engram_cli.tables.ray_count import DEFAULT_TASKS, CountJob, count_on_ray, default_partitions
from engram_cli.tables.shards import check_shards, read_shard
from engram_cli.tables.sizing import (
    ram_available,
    table_store_advice,
    target_size_for_collision_rate,
    target_size_for_memory_budget,
)
from engram_cli.tables.stats import NgramStats
from engram_cli.vocab.normalize import VocabMap, load_vocab
from engram_cli.vocab.tokenizer import DEFAULT_TOKENIZER, find_eos_id, load_tokenizer

NGRAMS_DIR = "ngrams"
TOP_FILE = "top_ngrams.parquet"
COLLISIONS_FILE = "collisions.parquet"
SLOT_LOAD_PNG = "slot_load.png"
SWEEP_PNG = "collision_sweep.png"
SWEEP_FILE = "collision_sweep.parquet"
HOT_ROWS_FILE = "hot_rows.parquet"
HOT_ROWS_PNG = "hot_rows.png"


@dataclass
class BuildTablesConfig:
    """Options of ``engram build-tables`` (defaults follow the reference Engram configuration)."""

    vocab: Path                                  # engram.vocab artifact (normalize-vocab)
    out: Path                                    # artifact directory to write
    corpus: CorpusSpec | None = None             # what to read (its shard: count 1/N, write counts only)
    from_shards: list[Path] = field(default_factory=list)  # merge these shard artifacts instead of reading
    tokenizer: str = DEFAULT_TOKENIZER           # must be the tokenizer the vocab was built from
    preset: str | None = None                    # a published configuration (engram_cli.tables.presets)
    plan_only: bool = False                      # plan and memory figures only: no corpus, no counting
    # The plan options: None takes the preset's value (without a preset, the reference demo's, in
    # brackets); a value given with a preset must agree with it (engram_cli.tables.presets).
    max_ngram_size: int | None = None            # largest n-gram order (3)
    layer_ids: tuple[int, ...] | None = None     # Engram layers ((1, 15))
    n_head_per_ngram: int | None = None          # hash heads per order (8)
    seed: int | None = None                      # multiplier seed (0)
    pad_id: int | None = None                    # ORIGINAL id read before a sequence (2)
    embed_dim_per_head: int | None = None        # row width of each head's table (512 / 8 = 64)
    target_size: int | None = None               # slots per head, every order (5 x the vocabulary)
    dtype: str | None = None                     # row storage for memory figures/budget (bf16; hashing.TABLE_DTYPES)
    target_collision_rate: float | None = None   # size each order so uniform hashing collides this often
    memory_budget: int | None = None             # bytes for all tables, at `dtype`
    boundary: str = "pad-start"                  # document-boundary rule (engram_cli.tables.boundary; the reference's)
    eos_token: str = "auto"                      # the separator after every document (train's data.eos_token)
    top_ngrams: int = 20                         # most frequent n-grams listed per order in the report
    sweep: bool = False                          # measure collision rate vs table size and plot it
    spill_dir: Path | None = None                # where partial counts spill (default: a temp dir)
    memory_limit: int | None = None              # bytes for counting buffers + in-memory runs (None: 8M-token
                                                 # buffers, 1 GiB of runs; counting.counter_sizes)
    threads: int | None = None                   # threads measuring collisions (None: the available CPUs)
    batch_size: int = 1024                       # documents per tokenizer batch (see docs/corpus.md)
    cache_dir: Path | None = None                # token cache (default <out>/../.engram-cache, as train's)
    cache_tokens: bool = True                    # write the token stream there for train (4 bytes a token)
    force: bool = False
    # scale-out (engram_cli.tables.ray_count, docs/scale-out.md): where the counting runs
    engine: str = "local"                        # local: this process; ray: tasks on a Ray cluster
    ray_address: str | None = None               # the cluster (None: RAY_ADDRESS, one on this machine, or a new one)
    tasks: int | None = None                     # ray: map tasks (None: ray_count.DEFAULT_TASKS; at most one per file)

    def __post_init__(self) -> None:

        check_rule(self.boundary)

        given = {k: getattr(self, k) for k in PLAN_OPTIONS}
        for key, value in resolve_plan_options(self.preset, given).items():
            setattr(self, key, value)

    @property
    def shard(self) -> tuple[int, int] | None:
        return self.corpus.shard if self.corpus is not None else None

    def resolved(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("vocab", "out", "spill_dir", "cache_dir"):
            d[k] = str(d[k]) if d[k] is not None else None
        d["from_shards"] = [str(p) for p in self.from_shards]
        d["layer_ids"] = list(self.layer_ids)
        if self.corpus is not None:
            d["corpus"]["shard"] = list(self.corpus.shard) if self.corpus.shard else None
        return d


@dataclass
class TopNgram:
    """One of the most frequent n-grams of an order."""

    rank: int
    count: int
    share: float            # of all n-gram occurrences of its order
    keys: list[str]         # the canonical key of each id: what the tables key on ("the" for " The")
    ids: list[int]          # canonical ids


@dataclass
class BuildTablesResult:
    out: Path
    kind: str                               # "tables", "shard" or "plan" (--plan-only)
    documents: int
    tokens: int
    skipped_files: list[tuple[str, str]]
    bad_records: int                        # JSON lines / records skipped as malformed
    seconds: float
    tokens_per_second: float
    orders: list[dict]                      # per n: total, distinct, singletons share, coverage
    top: dict[int, list[TopNgram]]          # per n, most frequent first
    plan: TablePlan | None
    memory: dict[str, int] | None           # bytes of all tables per element type
    collisions: CollisionReport | None      # measured vs predicted, per layer/order/head
    sweep: list[dict] | None                # collision rate vs table size (--sweep)
    published_rows: dict[int, dict[str, int]] = field(default_factory=dict)  # preset: plan vs published rows
    hot_rows: list[HotRowCurve] = field(default_factory=list)  # per layer: lookups served by the K hottest rows
    hot_row_lines: list[str] = field(default_factory=list)     # the curves in words, at the config's dtype
    token_cache: dict[str, Any] | None = None  # the token cache entry written or read: key, dir, entry, hit
    # the tables in training on this machine (sizing.table_store_advice): float32 bytes by table
    # optimizer, MemAvailable, whether `engram train --table-store mmap` is advised
    train_memory: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("kind", "documents", "tokens", "bad_records", "seconds",
                                           "tokens_per_second", "orders", "memory", "sweep")}
        d["published_rows"] = {str(k): v for k, v in self.published_rows.items()}
        d["hot_rows"] = [{"layer": c.layer, "rows": c.rows, "lookups": c.lookups, "used_rows": c.used_rows,
                          "rows_for": {str(s): n for s, n in c.rows_for.items()}} for c in self.hot_rows]
        d["hot_row_lines"] = self.hot_row_lines
        d["token_cache"] = self.token_cache
        d["train_memory"] = self.train_memory
        d["out"] = str(self.out)
        d["skipped_files"] = [list(x) for x in self.skipped_files]
        d["top"] = {str(n): [asdict(t) for t in rows] for n, rows in self.top.items()}
        d["plan"] = self.plan.to_dict() if self.plan is not None else None
        d["collisions"] = ({"summary": self.collisions.summary(), "rows": self.collisions.to_rows()}
                           if self.collisions is not None else None)
        return d


# ---------------------------------------------------------------------------------------------
# loading a tables artifact (what `engram train` and `engram inspect-gates` read)


@dataclass
class TablesArtifact:
    path: Path
    manifest: dict
    plan: TablePlan
    vocab: VocabMap
    tokenizer_fingerprint: str
    tokenizer_spec: str

    @property
    def token_cache_dir(self) -> Path | None:
        """The token cache directory build-tables filled while counting (None: shards, or none written)."""
        recorded = self.manifest.get("summary", {}).get("token_cache")
        return Path(recorded["dir"]) if isinstance(recorded, dict) and recorded.get("dir") else None


def load_tables(directory: str | os.PathLike, vocab_dir: str | os.PathLike | None = None) -> TablesArtifact:
    """Load and validate an ``engram.tables`` artifact and the vocab map it was built with.

    The vocab artifact is found at the path recorded in the manifest unless ``vocab_dir`` is
    given; either way its ``vocab_map.npy`` must have the recorded sha256.
    """

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


def _output_format(c: BuildTablesConfig) -> str:
    return "engram.plan" if c.plan_only else "engram.ngram_shard" if c.shard is not None else "engram.tables"


def _check_config(c: BuildTablesConfig) -> None:
    def need(ok: bool, msg: str, hint: str) -> None:
        if not ok:
            raise ConfigError(msg, hint)

    need(2 <= c.max_ngram_size <= 6, f"--max-ngram-size must be between 2 and 6, got {c.max_ngram_size}",
         "use --max-ngram-size 3 (the reference)")
    if c.preset is not None and c.target_size is not None:
        need(c.target_collision_rate is None and c.memory_budget is None,
             f"--preset {c.preset} fixes the table size ({c.target_size:,} slots per head)",
             "drop --target-collision-rate / --memory-budget, or drop --preset")
    sizing = [x is not None for x in (c.target_size, c.target_collision_rate, c.memory_budget)]
    need(sum(sizing) <= 1, "give at most one of --target-size, --target-collision-rate, --memory-budget",
         "pick one way to size the tables")
    need(c.target_size is None or c.target_size > 0, f"--target-size must be positive, got {c.target_size}",
         "pass the slots per head, e.g. --target-size 646400")
    need(c.target_collision_rate is None or 0 < c.target_collision_rate < 1,
         f"--target-collision-rate must be in (0, 1), got {c.target_collision_rate}", "e.g. --target-collision-rate 0.05")
    need(c.memory_budget is None or c.memory_budget > 0, f"--memory-budget must be positive, got {c.memory_budget}",
         "e.g. --memory-budget 2GB")
    need(c.memory_limit is None or c.memory_limit >= 1 << 20,
         f"a memory limit of {c.memory_limit} bytes is too small to count in", "give at least 1 MiB, e.g. --memory-limit 2GB")
    need(c.threads is None or c.threads >= 1, f"--threads must be at least 1, got {c.threads}", "e.g. --threads 8")
    need(c.embed_dim_per_head is None or 1 <= c.embed_dim_per_head <= MAX_EMBED_DIM_PER_HEAD,
         f"--embed-dim-per-head must be in [1, {MAX_EMBED_DIM_PER_HEAD:,}], got {c.embed_dim_per_head}",
         "e.g. --embed-dim-per-head 64 (the reference's 512 / 8 heads)")
    row_bytes(c.dtype, c.embed_dim_per_head)
    # scale-out: --engine ray counts a corpus (the spec-level refusals are in ray_count.count_on_ray)
    check_engine(c.engine, c.ray_address)
    need(c.engine == "ray" or c.tasks is None, "--tasks is for --engine ray", "add --engine ray, or drop --tasks")
    need(c.tasks is None or c.tasks >= 1, f"--tasks must be at least 1, got {c.tasks}", "e.g. --tasks 64")
    need(c.engine == "local" or (c.corpus is not None and not c.plan_only),
         "--engine ray counts a corpus; there is none to count here", "drop --engine ray")
    if c.plan_only:
        need(c.corpus is None and not c.from_shards, "--plan-only reads no corpus, but one was given",
             "drop the corpus (or --from-shards), or drop --plan-only to count it")
        need(c.target_collision_rate is None, "--target-collision-rate needs the corpus's n-gram counts",
             "size a --plan-only plan with --target-size or --memory-budget")
        return
    need(c.corpus is None or c.corpus.shard is None or not c.from_shards,
         "--shard and --from-shards cannot be combined", "count shards first, then merge them")
    need((c.corpus is not None) != bool(c.from_shards),
         "give a corpus or --from-shards" if c.corpus is None else "give either a corpus or --from-shards, not both",
         "e.g. `engram build-tables corpus/*.txt --vocab out/vocab --out out/tables`")


@dataclass
class CorpusCount:
    """What counting a corpus gave: the counts, the reading figures, the corpus fingerprint, and the
    token cache entry it wrote or read (None: a shard, or ``cache_tokens`` off)."""

    ngrams: Any                        # NgramCounter.finish(): the exact counts
    stats: CorpusStats
    fingerprint: dict[str, Any]        # corpus_fingerprint: what the manifest records
    token_cache: dict[str, Any] | None  # {"key", "dir", "entry", "hit"}


def token_cache_dir(config: BuildTablesConfig) -> Path:
    """``--cache-dir``, or train's default rule applied to ``--out`` (``<out>/../.engram-cache``),
    so that ``out/tables`` and ``out/run`` share ``out/.engram-cache``."""
    return Path(config.cache_dir) if config.cache_dir is not None else default_cache_dir(config.out)


def _count_corpus(config: BuildTablesConfig, tok, vocab: VocabMap, sep: tuple[int, int],
                  progress: ProgressFn) -> CorpusCount:
    """Count the corpus's n-grams. The one tokenizer pass also writes the token cache entry
    ``engram train`` reads for the same corpus, tokenizer, vocab, max_tokens and separator; where
    that entry exists already, the counts come from it and the tokenizer does not run."""

    spec = config.corpus
    fingerprint = corpus_fingerprint(spec)
    counter = NgramCounter(config.max_ngram_size, vocab_size=vocab.canonical_vocab_size, spill_dir=config.spill_dir,
                           boundary=Boundary(config.boundary, sep[1], int(vocab.table[config.pad_id])),
                           keep_edges=config.shard is not None,
                           **counter_sizes(config.memory_limit, config.max_ngram_size, vocab.canonical_vocab_size))
    # a shard's stream is not the corpus's (train never reads it): shards neither read nor write the cache
    caching = config.cache_tokens and config.shard is None
    key = cache_key(fingerprint, tok.fingerprint, vocab.fingerprint, spec.max_tokens, sep[0]) if caching else None
    cache_dir = token_cache_dir(config)
    cached = find_token_cache(cache_dir, key) if key is not None else None
    read_cache = cached is not None and splits_into_documents(cached)
    if read_cache:
        stats = _count_cached(cached, counter, vocab, progress)
    else:  # tokenize; write the entry unless it exists (one train made, that cannot be split into documents)
        stats = CorpusStats()
        batches = iter_tokenized(spec, tok.tokenizer, stats=stats, batch_size=config.batch_size, progress=progress)
        writer = TokenCacheWriter(cache_dir, key, sep[0], tok.fingerprint) if key and cached is None else None
        try:
            for batch in prefetch(batches):
                # one step per batch, not per document; tokenizer ids are always < vocab size, so the
                # table is indexed without a range check
                lengths = np.fromiter((a.shape[0] for a in batch), dtype=np.int64, count=len(batch))
                flat = np.concatenate(batch) if batch else np.zeros(0, np.int64)
                if writer is not None:
                    writer.add_concatenated(flat, lengths)  # the same ids, on to the cache file
                counter.add_batch(vocab.table[flat], lengths)
            if stats.tokens == 0:
                raise empty_corpus_error(spec, stats)
            if writer is not None:
                cached = writer.commit(stats)
        finally:
            if writer is not None:
                writer.close()
    ngrams = counter.finish(progress=progress)
    record = None if key is None else {"key": key, "dir": str(cache_dir.resolve()), "entry": cached.path.name,
                                       "hit": read_cache}
    return CorpusCount(ngrams=ngrams, stats=stats, fingerprint=fingerprint, token_cache=record)


def _count_on_ray(config: BuildTablesConfig, tok, vocab: VocabMap, sep: tuple[int, int],
                  progress: ProgressFn) -> CorpusCount:
    """``--engine ray``: the same counts from map and reduce tasks on a Ray cluster
    (``engram_cli.tables.ray_count``); their outputs go under the token cache directory, which every
    node must see. No token cache entry is written (the tasks tokenize apart)."""
    spec, tasks = config.corpus, config.tasks or DEFAULT_TASKS
    spill = str(Path(config.spill_dir).resolve()) if config.spill_dir is not None else None
    job = CountJob(tokenizer=str(Path(config.tokenizer).resolve()) if Path(config.tokenizer).exists() else config.tokenizer,
                   tokenizer_sha256=tok.fingerprint, vocab=str(Path(config.vocab).resolve()),
                   vocab_sha256=vocab.fingerprint, max_n=config.max_ngram_size,
                   boundary=Boundary(config.boundary, sep[1], int(vocab.table[config.pad_id])).to_dict(),
                   text_column=spec.text_column, doc_mode=spec.doc_mode, hf_split=spec.hf_split,
                   skip_bad_files=spec.skip_bad_files, batch_size=config.batch_size, memory_limit=config.memory_limit,
                   spill_dir=spill, partitions=default_partitions(tasks),
                   work_dir=str((token_cache_dir(config) / "counts").resolve()), cpus=config.threads or 1)
    counted = count_on_ray(spec, job, vocab_size=vocab.canonical_vocab_size, tasks=tasks,
                           address=config.ray_address, progress=progress)
    return CorpusCount(ngrams=counted.ngrams, stats=counted.stats, fingerprint=counted.fingerprint, token_cache=None)


def _count_cached(cache: TokenCache, counter: NgramCounter, vocab: VocabMap, progress: ProgressFn) -> CorpusStats:
    """Count from a token cache entry instead of the tokenizer; the reading figures are the ones
    recorded when the entry was made."""
    recorded = cache.stats
    stats = CorpusStats(documents=int(recorded.get("documents", 0)), tokens=int(recorded.get("tokens", 0)),
                        files=int(recorded.get("files", 0)), bytes=int(recorded.get("bytes", 0)),
                        documents_seen=int(recorded.get("documents_seen", 0)),
                        skipped_files=[(d["path"], d["reason"]) for d in recorded.get("skipped_files", [])],
                        bad_records=int(recorded.get("bad_records", 0)),
                        bad_record_examples=[(d["where"], d["reason"])
                                             for d in recorded.get("bad_record_examples", [])])
    total, done = int(cache.stream.shape[0]), 0
    for ids, lengths in iter_cached_documents(cache):
        counter.add_batch(vocab.table[ids], lengths)
        done += ids.shape[0] + lengths.shape[0]
        progress("read cache", done, total, documents=counter.documents)
    return stats


def separator_ids(config: BuildTablesConfig, tok, vocab: VocabMap) -> tuple[int, int]:
    """(original, canonical) id of the document separator: ``--eos-token``, or the tokenizer's EOS."""

    sep = find_eos_id(tok.tokenizer, config.eos_token)
    return sep, int(vocab.table[sep])


def _merge_shards(config: BuildTablesConfig, vocab: VocabMap, sep: tuple[int, int], progress: ProgressFn):

    manifests = [(Path(d), *read_shard(Path(d))) for d in config.from_shards]
    for d, m, _ in manifests:
        if m["inputs"]["vocab"]["sha256"] != vocab.fingerprint:
            raise ArtifactError(f"shard {d} was counted with another vocab map",
                                f"recount it with --vocab {config.vocab}, or pass the matching --vocab")
    check_shards(manifests)
    manifests.sort(key=lambda x: x[2][0])  # shard 0/N first: merge_stats interleaves the documents in order
    n = manifests[0][1]["config"]["max_ngram_size"]
    if n != config.max_ngram_size:
        raise InputError(f"the shards counted up to n={n}, this run wants --max-ngram-size {config.max_ngram_size}",
                         f"pass --max-ngram-size {n}")
    parts = [NgramStats.load(d / NGRAMS_DIR) for d, _, _ in manifests]
    inputs = [{"path": str(d), "shard": list(shard), "manifest_sha256": sha256_file(d / MANIFEST),
               "corpus": m["inputs"]["corpus"]} for d, m, shard in manifests]
    progress("merge", 0, 1)
    merged = merge_stats(parts)
    rule, counted_sep = (merged.boundary or {}).get("rule"), (merged.boundary or {}).get("separator")
    if rule != config.boundary:
        raise InputError(f"the shards were counted under the {rule or 'within-document'} boundary rule, this run "
                         f"wants --boundary {config.boundary}",
                         f"pass --boundary {rule}" if rule else "recount the shards with this engram version")
    if counted_sep != sep[1]:
        raise InputError(f"the shards were counted with canonical separator {counted_sep}, --eos-token "
                         f"{config.eos_token!r} gives {sep[1]}", "pass the --eos-token the shards used")
    progress("merge", 1, 1)
    return merged, inputs


def _target_sizes(config: BuildTablesConfig, ngrams, n_orders: int) -> tuple[int, ...] | None:

    if config.target_size is not None:
        return (config.target_size,) * n_orders
    if config.target_collision_rate is not None:
        return tuple(target_size_for_collision_rate(ngrams.distinct(n), config.target_collision_rate)
                     for n in range(2, config.max_ngram_size + 1))
    if config.memory_budget is not None:
        m = target_size_for_memory_budget(config.memory_budget, n_layers=len(config.layer_ids), n_orders=n_orders,
                                          n_heads=config.n_head_per_ngram,
                                          embed_dim_per_head=config.embed_dim_per_head, dtype=config.dtype)
        return (m,) * n_orders
    return None  # the reference default: 5 x the original vocabulary size


def ngram_keys(rows: np.ndarray, vocab: VocabMap) -> list[list[str]]:
    """The canonical keys of canonical n-grams (one list per row of canonical ids): what the
    tables key on ("the" for "The", "the" and " The")."""
    keys = vocab.keys()
    return [[keys[int(c)] for c in r] for r in rows]


def top_ngrams(ngrams, vocab: VocabMap, max_ngram_size: int, k: int) -> dict[int, list[TopNgram]]:
    """The ``k`` most frequent n-grams of every order 1..max_ngram_size, with their text."""
    top: dict[int, list[TopNgram]] = {}
    for n in range(1, max_ngram_size + 1):
        ids, cnt = ngrams.top(n, k)
        total = max(ngrams.total(n), 1)
        top[n] = [TopNgram(rank=r + 1, count=int(c), share=int(c) / total, keys=k, ids=row.tolist())
                  for r, (row, c, k) in enumerate(zip(ids, cnt, ngram_keys(ids, vocab)))]
    return top


def _order_rows(ngrams, max_ngram_size: int) -> list[dict]:
    rows = []
    for n in range(1, max_ngram_size + 1):
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


@holds_output_lock(lambda config: config.out)
def build_tables(config: BuildTablesConfig, progress: ProgressFn | None = None) -> BuildTablesResult:
    """Count n-grams, plan the tables, measure collisions; write an ``engram.tables`` artifact
    (or an ``engram.ngram_shard`` artifact when ``config.corpus.shard`` is set)."""
    progress = report(progress)
    _check_config(config)
    check_output_dir(config.out, config.force, _output_format(config))  # before the expensive part
    t0 = time.perf_counter()
    vocab = load_vocab(config.vocab)
    tok = load_tokenizer(config.tokenizer)
    vocab.check_tokenizer(tok)
    if not 0 <= config.pad_id < vocab.original_vocab_size:
        raise ConfigError(f"--pad-id {config.pad_id} is outside the vocabulary (0..{vocab.original_vocab_size - 1})",
                          "pass an original token id, e.g. --pad-id 2 (DeepSeek's pad token)")
    sep = separator_ids(config, tok, vocab)  # a tokenizer without the separator fails before counting
    if config.plan_only:
        return _plan_only(config, vocab, tok, sep, t0)
    if config.shard is None:  # impossible plan options and budgets fail before counting
        _check_plan_options(config, vocab)
        if config.memory_budget is not None:
            _target_sizes(config, None, config.max_ngram_size - 1)
    vocab_input = {"path": str(Path(config.vocab).resolve()), "sha256": vocab.fingerprint,
                   "canonical_vocab_size": vocab.canonical_vocab_size}

    if config.from_shards:
        ngrams, shard_inputs = _merge_shards(config, vocab, sep, progress)
        corpus_input: dict[str, Any] = {"shards": shard_inputs}
        token_cache = None  # nothing tokenized: the shards were
        skipped: list = []
        bad_records = 0
    else:
        counted = (_count_corpus if config.engine == "local" else _count_on_ray)(config, tok, vocab, sep, progress)
        ngrams, corpus_input, token_cache = counted.ngrams, counted.fingerprint, counted.token_cache
        skipped = [tuple(x) for x in counted.stats.skipped_files]
        bad_records = counted.stats.bad_records
    seconds = time.perf_counter() - t0
    tokens = int(ngrams.tokens)
    orders = _order_rows(ngrams, config.max_ngram_size)
    inputs = {"tokenizer": tok.describe(), "vocab": vocab_input, "corpus": corpus_input}
    common = dict(documents=int(ngrams.documents), tokens=tokens, skipped_files=skipped, bad_records=bad_records,
                  seconds=seconds, tokens_per_second=tokens / seconds if seconds else 0.0, orders=orders,
                  token_cache=token_cache)
    summary = {"documents": common["documents"], "tokens": tokens, "bad_records": bad_records,
               "token_cache": token_cache}

    if config.shard is not None:
        with artifact_dir(config.out, "engram.ngram_shard", force=config.force) as w:
            ngrams.save(w.path(NGRAMS_DIR))
            w.config, w.inputs = config.resolved(), inputs
            w.summary = {**summary, "distinct": {str(r["n"]): r["distinct"] for r in orders}}
        return BuildTablesResult(out=Path(config.out), kind="shard", top={}, plan=None, memory=None,
                                 collisions=None, sweep=None, **common)
    return _plan_and_measure(config, vocab, sep, ngrams, inputs, summary, common, progress)


def _plan_and_measure(config: BuildTablesConfig, vocab: VocabMap, sep: tuple[int, int], ngrams, inputs: dict,
                      summary: dict, common: dict, progress: ProgressFn) -> BuildTablesResult:
    """The plan, its collisions and hot rows measured on the counts, the ``engram.tables`` artifact."""



    plan = _make_plan(config, vocab, sep, ngrams)
    memory = {d: plan.memory_bytes(d) for d in TABLE_DTYPES}
    published = check_published_rows(config.preset, {layer: plan.total_slots(layer) for layer in plan.layer_ids})
    by_order = {n: ngrams.ngrams[n] for n in range(2, config.max_ngram_size + 1)}
    counts = {n: ngrams.counts[n] for n in range(2, config.max_ngram_size + 1)}
    with artifact_dir(config.out, "engram.tables", force=config.force) as w, ThreadPoolExecutor(1) as background:
        saving = background.submit(ngrams.save, w.path(NGRAMS_DIR))  # Arrow compresses without the GIL
        # one hashing pass gives the collision figures, the rows' heat and the slot-load histogram
        measured = measure_tables(by_order, counts, plan, progress=progress, num_threads=config.threads)
        collisions = measured.collisions
        hot = hot_row_curves(by_order, counts, plan, progress=progress, heat=measured.row_heat)
        hot_lines = cache_lines(hot, plan, config.dtype)
        top = top_ngrams(ngrams, vocab, config.max_ngram_size, config.top_ngrams)
        plan.save(w.path(PLAN_FILE))
        sweep_rows = _write_reports(w, config, plan, by_order, counts, top, collisions, measured.slot_load_hist,
                                    progress)
        pq.write_table(pa.Table.from_pylist([r for c in hot for r in c.to_rows()]), w.path(HOT_ROWS_FILE))
        plot_hot_rows(hot, config.dtype, plan, w.path(HOT_ROWS_PNG))
        saving.result()
        w.config, w.inputs = config.resolved(), inputs
        w.summary = {**summary, "orders": common["orders"],
                     "plan": {"layer_ids": list(plan.layer_ids), "target_sizes": list(plan.target_sizes),
                              "total_slots": plan.total_slots_all, "memory_bytes": memory},
                     "collisions": collisions.summary(),
                     "published_rows": {str(k): v for k, v in published.items()},
                     "hot_rows": hot_lines}
    return BuildTablesResult(out=Path(config.out), kind="tables", top=top, plan=plan, memory=memory,
                             collisions=collisions, sweep=sweep_rows, published_rows=published, hot_rows=hot,
                             hot_row_lines=hot_lines, train_memory=table_store_advice(plan, ram_available()),
                             **common)


def _make_plan(config: BuildTablesConfig, vocab: VocabMap, sep: tuple[int, int], ngrams) -> TablePlan:

    return make_plan(boundary=config.boundary, separator_id=sep[0], canonical_separator_id=sep[1],
                     canonical_vocab_size=vocab.canonical_vocab_size,
                     canonical_pad_id=int(vocab.table[config.pad_id]),
                     original_vocab_size=vocab.original_vocab_size, pad_id=config.pad_id,
                     layer_ids=config.layer_ids, max_ngram_size=config.max_ngram_size,
                     n_head_per_ngram=config.n_head_per_ngram,
                     target_sizes=_target_sizes(config, ngrams, config.max_ngram_size - 1),
                     seed=config.seed, embed_dim_per_head=config.embed_dim_per_head, preset=config.preset)


def _check_plan_options(config: BuildTablesConfig, vocab: VocabMap) -> None:
    """Every plan option except the sizes, checked by make_plan itself on the smallest tables."""

    make_plan(canonical_vocab_size=vocab.canonical_vocab_size, canonical_pad_id=int(vocab.table[config.pad_id]),
              original_vocab_size=vocab.original_vocab_size, pad_id=config.pad_id, layer_ids=config.layer_ids,
              max_ngram_size=config.max_ngram_size, n_head_per_ngram=config.n_head_per_ngram,
              target_sizes=(1,) * (config.max_ngram_size - 1), seed=config.seed,
              embed_dim_per_head=config.embed_dim_per_head)


def _plan_only(config: BuildTablesConfig, vocab: VocabMap, tok, sep: tuple[int, int], t0: float) -> BuildTablesResult:
    """``--plan-only``: the plan and its memory figures, written as an ``engram.plan`` artifact."""

    plan = _make_plan(config, vocab, sep, None)
    memory = {d: plan.memory_bytes(d) for d in TABLE_DTYPES}
    published = check_published_rows(config.preset, {layer: plan.total_slots(layer) for layer in plan.layer_ids})
    with artifact_dir(config.out, "engram.plan", force=config.force) as w:
        plan.save(w.path(PLAN_FILE))
        w.config = config.resolved()
        w.inputs = {"tokenizer": tok.describe(), "vocab": {"path": str(Path(config.vocab).resolve()),
                                                           "sha256": vocab.fingerprint}}
        w.summary = {"preset": config.preset, "rows_per_layer": {str(k): plan.total_slots(k) for k in plan.layer_ids},
                     "total_rows": plan.total_slots_all, "memory_bytes": memory, "storage_dtype": config.dtype,
                     "published_rows": {str(k): v for k, v in published.items()}}
    return BuildTablesResult(out=Path(config.out), kind="plan", documents=0, tokens=0, skipped_files=[],
                             bad_records=0, seconds=time.perf_counter() - t0, tokens_per_second=0.0, orders=[],
                             top={}, plan=plan, memory=memory, collisions=None, sweep=None,
                             published_rows=published, train_memory=table_store_advice(plan, ram_available()))


def _write_reports(w, config: BuildTablesConfig, plan: TablePlan, by_order, counts, top, collisions, hists,
                   progress: ProgressFn) -> list[dict] | None:
    """The artifact's tables and pictures: top n-grams, collision rows, slot loads, the sweep."""


    pq.write_table(pa.Table.from_pylist([{"n": n, **asdict(t)} for n, rows in top.items() for t in rows]),
                   w.path(TOP_FILE))
    pq.write_table(pa.Table.from_pylist(collisions.to_rows()), w.path(COLLISIONS_FILE))
    n_plots = 2 if config.sweep else 1
    progress("plots", 0, n_plots)
    plot_slot_load_histogram(by_order, plan, w.path(SLOT_LOAD_PNG), hists=hists)
    sweep_rows = None
    if config.sweep:
        sweep_rows = sweep_collisions(by_order, counts, plan, _sweep_sizes(plan), num_threads=config.threads)
        pq.write_table(pa.Table.from_pylist(sweep_rows), w.path(SWEEP_FILE))
        plot_sweep(sweep_rows, w.path(SWEEP_PNG))
    progress("plots", n_plots, n_plots)
    return sweep_rows


def _sweep_sizes(plan: TablePlan) -> list[int]:
    """Table sizes for the sweep: log-spaced from 1/16 to 4x the plan's first target."""
    t = plan.target_sizes[0]
    return sorted({max(2, int(t * f)) for f in np.geomspace(1 / 16, 4, 13)})
