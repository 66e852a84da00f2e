"""Counting a corpus on a Ray cluster: ``engram build-tables --engine ray`` (docs/scale-out.md).

The counts are exactly those of the local pass (:func:`engram_cli.tables.build.build_tables` plans,
measures and writes from them as always); only where the counting runs changes. A map-reduce:

1. **split** (:func:`split_tasks`): the corpus's resolved sources, in reading order, cut into
   ``tasks`` contiguous groups of files of about equal bytes, so the tasks' documents one after the
   other are the corpus's documents in the local order;
2. **map** (:func:`count_task`, a Ray task per group): the local counting path on its group —
   ``iter_tokenized`` → the vocab map → :class:`~engram_cli.tables.counting.NgramCounter` under the
   run's boundary rule and ``--memory-limit`` — then every order's keys split by a hash of the key
   into ``partitions`` sorted runs on the shared directory. A task starts its stream as a corpus
   starts (pads before it), so under pad-start the N-grams that reach back from its first documents
   into the previous task's last ones are counted wrongly; the task keeps its first and last
   documents' edges (:func:`~engram_cli.tables.boundary.split_edges`, at most N-1 documents each);
3. **correct** (:func:`edge_corrections`, on the driver): from those edges, in task order, the
   N-grams the tasks' starts really have (``boundary_ngrams`` with the previous tasks' context, as
   ``--from-shards`` adds the N-grams across shards) counted +1 and the ones each task counted -1;
4. **reduce** (:func:`reduce_partition`, a Ray task per partition): the k-way merge of every
   task's run of that partition and its corrections (``keys.merge_runs``, bounded windows),
   zero counts dropped, streamed to the shared directory;
5. **merge** (driver): the partitions' runs merged into :class:`~engram_cli.tables.stats.NgramStats`.

Faults: a worker that dies mid-task is retried by Ray (``max_retries``); a task writes its output
into a fresh directory that is renamed into place whole, so a retry, a second copy or a killed driver
never leaves half an output. Every output is keyed by its task's input fingerprint (the contents of
its files, the reading options, tokenizer, vocab, order, boundary rule, partitions): a rerun after
a killed driver reuses the finished tasks' outputs and recomputes the rest, and an edited file
changes its task's key, so inputs are never mixed. The work directory is removed once the counts
are merged.

Tasks check what they read: a corpus file, vocab or work directory a worker cannot see, a file
whose contents differ from the driver's, or a vocab map or tokenizer that differs, fails the run in
one line naming the worker and the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engram_cli.core.artifacts import atomic_write_json, sha256_file
from engram_cli.core.cluster import connect, task_failure, worker_name
from engram_cli.core.errors import ArtifactError, ConfigError, InputError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.corpus.spec import CorpusSpec, CorpusStats, Source, resolve_sources
from engram_cli.corpus.stream import corpus_fingerprint, empty_corpus_error, iter_tokenized, prefetch
from engram_cli.tables.boundary import Boundary, boundary_ngrams, split_edges
from engram_cli.tables.counting import NgramCounter, counter_sizes
from engram_cli.tables.keys import KeyLayout, SortedRun, concat_chunks, id_bits, merge_runs, reduce_keys, write_run
from engram_cli.tables.stats import NgramStats, sorted_stats
from engram_cli.vocab.normalize import load_vocab
from engram_cli.vocab.tokenizer import load_tokenizer

FORMAT = "engram.ray_count"         # the map and reduce outputs' record format (task.json / part.json)
VERSION = 1
DEFAULT_TASKS = 64                  # map tasks without --tasks (fewer when the corpus has fewer files)
MAX_PARTITIONS = 32                 # reduce tasks at most (each merges one hash share of every task's keys)
MAX_RETRIES = 3                     # Ray retries of a task whose worker died
TASK_FILE = "task.json"
PART_FILE = "part.json"


@dataclass
class CountJob:
    """What every task of one counting run shares (JSON-able: sent to the workers)."""

    tokenizer: str                   # the tokenizer spec (as --tokenizer)
    tokenizer_sha256: str            # what the driver loaded: workers must load the same
    vocab: str                       # the vocab artifact's path (resolved): workers must see it
    vocab_sha256: str
    max_n: int
    boundary: dict[str, Any]         # Boundary.to_dict(): rule, canonical separator, canonical pad
    text_column: str
    doc_mode: str
    hf_split: str
    skip_bad_files: bool
    batch_size: int
    memory_limit: int | None         # each task's counting memory, as --memory-limit locally
    spill_dir: str | None            # where a task spills (a path on the worker; None: its temp dir)
    partitions: int
    work_dir: str                    # shared: every worker reads and writes here
    cpus: int = 1                    # CPUs per task (its tokenizer's threads)

    def identity(self) -> dict[str, Any]:
        """What a task's output depends on besides its files (not paths, memory or CPUs)."""
        keys = ("tokenizer_sha256", "vocab_sha256", "max_n", "boundary", "text_column", "doc_mode", "hf_split",
                "skip_bad_files", "partitions")
        return {"format": FORMAT, "version": VERSION, **{k: getattr(self, k) for k in keys}}


@dataclass
class CountTask:
    """One contiguous slice of the corpus: a group of its sources in reading order."""

    index: int
    sources: list[str]               # as CorpusSpec.sources (files, directories, hf:NAME[:CONFIG])
    files: list[dict[str, Any]]      # the driver's fingerprint records of its files: path, bytes, sha256
    key: str = ""                    # the input fingerprint its output is stored under


@dataclass
class RayCount:
    """What counting on Ray gave the driver."""

    ngrams: NgramStats
    stats: CorpusStats
    fingerprint: dict[str, Any]      # corpus_fingerprint, as the local pass records it
    tasks: int
    reused: int                      # tasks whose output an earlier (killed) run had finished
    partitions: int
    reduce_input_rows: int           # (key, count) rows the reduce tasks read, corrections included
    seconds: dict[str, float] = field(default_factory=dict)  # map, reduce, merge


# ---------------------------------------------------------------------------------------------
# split


def _source_arg(s: Source) -> str:
    return f"hf:{s.location}" + (f":{s.config}" if s.config else "") if s.kind == "hf_hub" else s.location


def split_tasks(spec: CorpusSpec, fingerprint: dict[str, Any], tasks: int) -> list[CountTask]:
    """The corpus's sources cut into at most ``tasks`` contiguous groups of about equal bytes (a
    file is never cut: fewer files than ``tasks`` give one task per file)."""
    if tasks < 1:
        raise ConfigError(f"--tasks must be at least 1, got {tasks}", "e.g. --tasks 64")
    records = {r["path"]: r for r in fingerprint["files"]}
    units = []
    for s in resolve_sources(spec):
        if s.kind == "hf_disk":
            files = [records[str(p)] for p in sorted(Path(s.location).rglob("*")) if str(p) in records]
        else:
            files = [records[s.location]] if s.location in records else []
        units.append((_source_arg(s), files, sum(f["bytes"] for f in files)))
    total = sum(u[2] for u in units)
    n = min(tasks, len(units))
    groups: list[list[tuple]] = [[] for _ in range(n)]
    done, g = 0, 0
    for i, unit in enumerate(units):
        # move on once this group holds its share, leaving at least one unit for every later group
        while g < n - 1 and groups[g] and (done >= total * (g + 1) / n or len(units) - i <= n - 1 - g):
            g += 1
        groups[g].append(unit)
        done += unit[2]
    return [CountTask(index=i, sources=[u[0] for u in grp], files=[f for u in grp for f in u[1]])
            for i, grp in enumerate(groups) if grp]


def task_key(job: CountJob, task: CountTask) -> str:
    """The input fingerprint of a task: its files' contents in order and the job's identity."""
    doc = {"job": job.identity(), "files": [[f["sha256"], f["bytes"]] for f in task.files],
           "hub": [s for s in task.sources if s.startswith("hf:")]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# map


def _partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """The partition of every key row (uint64 [K, W]): a multiplicative hash of its words, mod P."""
    h = np.zeros(keys.shape[0], np.uint64)
    with np.errstate(over="ignore"):
        for w in range(keys.shape[1]):
            h = (h ^ keys[:, w]) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
    return (h % np.uint64(partitions)).astype(np.int64)


def _run_files(directory: Path, n: int, p: int) -> Path:
    return directory / f"o{n}-p{p:03d}"


class _EdgeKeeper:
    """The first and last (at most ``width``) non-empty documents' edges of a task's stream: length
    with the separator, first and last ``width`` ids (``split_edges``'s rows, as shards keep them)."""

    def __init__(self, width: int, separator: int):
        self.width, self.separator = width, separator
        self.head = np.empty((0, 1 + 2 * width), np.int64)
        self.tail = self.head

    def _edges(self, ids: np.ndarray, lengths: np.ndarray, pick: np.ndarray) -> np.ndarray:
        starts = np.cumsum(lengths) - lengths
        docs = [np.append(ids[starts[i]:starts[i] + lengths[i]], self.separator) for i in pick]
        lens = lengths[pick].astype(np.int64) + 1
        heads, tails = split_edges(np.concatenate(docs).astype(np.int64), lens, self.width)
        return np.concatenate([lens[:, None], heads, tails], axis=1)

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        nonempty = np.flatnonzero(lengths)
        if not nonempty.size or not self.width:
            return
        if self.head.shape[0] < self.width:
            self.head = np.concatenate([self.head, self._edges(ids, lengths, nonempty[:self.width - self.head.shape[0]])])
        self.tail = np.concatenate([self.tail, self._edges(ids, lengths, nonempty[-self.width:])])[-self.width:]


def count_task(job: CountJob, task: CountTask) -> dict[str, Any]:
    """The map task: count one slice as the local pass counts, write its keys partitioned by hash.

    Returns the task's record (also ``<work>/map/<key>/task.json``); an earlier finished output of the
    same key is returned as it is."""
    out = Path(job.work_dir) / "map" / task.key
    if (out / TASK_FILE).is_file():
        return json.loads((out / TASK_FILE).read_text(encoding="utf-8"))
    _check_inputs(job, task)
    os.environ["RAYON_NUM_THREADS"] = str(job.cpus)  # the tokenizer's threads: this task's CPUs
    vocab, tok = load_vocab(job.vocab), load_tokenizer(job.tokenizer)
    who = worker_name()
    if vocab.fingerprint != job.vocab_sha256:
        raise InputError(f"Ray worker {who} loads another vocab map from {job.vocab} than the driver",
                         "give every node the same vocab artifact at the same path")
    if tok.fingerprint != job.tokenizer_sha256:
        raise InputError(f"Ray worker {who} loads another tokenizer for {job.tokenizer!r} than the driver",
                         "install the same engram version (and tokenizer files) on every node")
    b = Boundary(**job.boundary)
    counter = NgramCounter(job.max_n, vocab_size=vocab.canonical_vocab_size, spill_dir=job.spill_dir, boundary=b,
                           **counter_sizes(job.memory_limit, job.max_n, vocab.canonical_vocab_size))
    edges = _EdgeKeeper(job.max_n - 1, b.separator)
    spec = CorpusSpec(sources=task.sources, text_column=job.text_column, doc_mode=job.doc_mode,
                      hf_split=job.hf_split, skip_bad_files=job.skip_bad_files)
    stats = CorpusStats()
    try:
        for batch in prefetch(iter_tokenized(spec, tok.tokenizer, stats=stats, batch_size=job.batch_size)):
            lengths = np.fromiter((a.shape[0] for a in batch), dtype=np.int64, count=len(batch))
            ids = vocab.table[np.concatenate(batch)] if batch else np.zeros(0, np.int64)
            edges.add(ids, lengths)
            counter.add_batch(ids, lengths)
    except InputError as e:
        if stats.tokens or not e.message.startswith("corpus is empty"):
            counter.close()
            raise
        # a slice without documents: nothing to count (the driver refuses an empty corpus as a whole)
    ngrams = counter.finish()
    record = {"format": FORMAT, "version": VERSION, "key": task.key, "index": task.index, "worker": who,
              "identity": job.identity(), "documents": int(ngrams.documents), "tokens": int(ngrams.tokens),
              "stats": stats.to_dict(), "head": edges.head.tolist(), "tail": edges.tail.tolist(), "rows": {}}
    tmp = out.with_name(f".{task.key}.{os.getpid()}.{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    try:
        bits = id_bits(vocab.canonical_vocab_size)
        for n in range(1, job.max_n + 1):
            layout = KeyLayout(n, bits)
            keys = layout.pack(ngrams.ngrams.pop(n))
            counts = ngrams.counts.pop(n)
            part = _partition_of(keys, job.partitions)
            rows = []
            for p in range(job.partitions):
                sel = part == p
                k, c = reduce_keys(keys[sel], counts[sel])  # unique already: this sorts by key
                write_run([(k, c)], _run_files(tmp, n, p), layout.words)
                rows.append(int(k.shape[0]))
            record["rows"][str(n)] = rows
            del keys, counts, part
        atomic_write_json(tmp / TASK_FILE, record)
        try:
            tmp.rename(out)
        except OSError:  # another try of this task finished first: its output is the same
            if not (out / TASK_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def _check_inputs(job: CountJob, task: CountTask) -> None:
    """Every path this task reads is visible on this worker and holds what the driver hashed."""
    who = worker_name()
    hint = "put the corpus, vocab and --cache-dir on a filesystem every node mounts at the same path (docs/scale-out.md)"
    for what, path in (("work directory", job.work_dir), ("vocab", job.vocab)):
        if not Path(path).exists():
            raise InputError(f"Ray worker {who} cannot see the {what} {path}", hint)
    for f in task.files:
        path = Path(f["path"])
        if not path.exists():
            raise InputError(f"Ray worker {who} cannot see corpus file {path}", hint)
        if f["sha256"] is not None and sha256_file(path) != f["sha256"]:
            raise InputError(f"Ray worker {who} reads corpus file {path} with other contents than the driver",
                             "give every node the same files (a shared filesystem), and do not edit them while counting")


# ---------------------------------------------------------------------------------------------
# the N-grams across tasks' starts


def check_records(records: list[dict[str, Any]], job: CountJob) -> None:
    """Every task counted under this run's vocab, tokenizer, order and boundary rule."""
    want = job.identity()
    for r in records:
        got = r.get("identity", {})
        for k in want:
            if got.get(k) != want[k]:
                raise ArtifactError(f"task {r.get('index')} (on {r.get('worker')}) counted with another {k} "
                                    f"({got.get(k)!r}, this run: {want[k]!r})",
                                    "remove its output and rerun: every task must count under one vocab, tokenizer "
                                    "and boundary rule")


def edge_corrections(records: list[dict[str, Any]], max_n: int, boundary: dict[str, Any]) -> dict[int, tuple]:
    """Per order 2..max_n: (ngrams int64 [K, n], signed counts int64 [K]) that turn the tasks' counts
    into one pass's: +1 for every N-gram reaching back from a task's first documents into the stream
    before it, -1 for what the task counted there instead (pads before it). Pad-start only."""
    if boundary["rule"] != "pad-start" or max_n < 2:
        return {}
    w, pad = max_n - 1, boundary["pad"]
    pads = np.full(w, pad, np.int64)
    context = pads
    rows: dict[int, list] = {n: [] for n in range(2, max_n + 1)}
    signs: dict[int, list] = {n: [] for n in range(2, max_n + 1)}
    for r in sorted(records, key=lambda r: r["index"]):
        head = np.asarray(r["head"], np.int64).reshape(-1, 1 + 2 * w)
        tail = np.asarray(r["tail"], np.int64).reshape(-1, 1 + 2 * w)
        if head.shape[0]:
            right, _ = boundary_ngrams(head[:, 1:1 + w], head[:, 1 + w:], head[:, 0], max_n, context=context, pad=pad)
            wrong, _ = boundary_ngrams(head[:, 1:1 + w], head[:, 1 + w:], head[:, 0], max_n, context=pads, pad=pad)
            for n in rows:
                rows[n] += [right[n], wrong[n]]
                signs[n] += [np.ones(right[n].shape[0], np.int64), -np.ones(wrong[n].shape[0], np.int64)]
        if tail.shape[0]:  # the stream's last w ids after this task (the tail covers w ids, or all of it)
            _, context = boundary_ngrams(tail[:, 1:1 + w], tail[:, 1 + w:], tail[:, 0], max_n, context=context, pad=pad)
    return {n: (np.concatenate(rows[n]), np.concatenate(signs[n])) for n in rows if rows[n]}


# ---------------------------------------------------------------------------------------------
# reduce


def _load_run(base: Path, rows: int, words: int) -> SortedRun:
    if rows == 0:
        return SortedRun(np.empty((0, words), np.uint64), np.empty(0, np.int64))
    keys = np.memmap(base.with_suffix(".keys"), dtype=np.uint64, mode="r", shape=(rows, words))
    counts = np.memmap(base.with_suffix(".counts"), dtype=np.int64, mode="r", shape=(rows,))
    return SortedRun(keys, counts)


def _nonzero(chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for k, c in chunks:
        keep = c != 0
        yield k[keep], c[keep]


def reduce_partition(job: CountJob, run_key: str, p: int, records: list[dict[str, Any]], vocab_size: int,
                     corrections: dict[str, tuple[list, list]]) -> dict[str, Any]:
    """The reduce task of partition ``p``: every task's run of it and its corrections, merged."""
    out = Path(job.work_dir) / "reduce" / run_key / f"p{p:03d}"
    if (out / PART_FILE).is_file():
        return json.loads((out / PART_FILE).read_text(encoding="utf-8"))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    bits = id_bits(vocab_size)
    record: dict[str, Any] = {"format": FORMAT, "version": VERSION, "partition": p, "rows": {}, "input_rows": 0}
    try:
        for n in range(1, job.max_n + 1):
            layout = KeyLayout(n, bits)
            runs = [_load_run(_run_files(Path(job.work_dir) / "map" / r["key"], n, p), r["rows"][str(n)][p],
                              layout.words) for r in records]
            if str(n) in corrections:
                k, c = reduce_keys(layout.pack(np.asarray(corrections[str(n)][0], np.int64).reshape(-1, n)),
                                   np.asarray(corrections[str(n)][1], np.int64))
                runs.append(SortedRun(k, c))
            record["input_rows"] += sum(len(r) for r in runs)
            merged = write_run(_nonzero(merge_runs(runs)), _run_files(tmp, n, 0), layout.words)
            if np.any(np.asarray(merged.counts) < 0):
                raise ArtifactError(f"partition {p} of order {n} has negative counts after the edge corrections",
                                    "remove the work directory and rerun (the tasks' outputs do not fit together)")
            record["rows"][str(n)] = len(merged)
            del merged, runs
        atomic_write_json(tmp / PART_FILE, record)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / PART_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


# ---------------------------------------------------------------------------------------------
# the driver


def _merge_stats(records: list[dict[str, Any]]) -> CorpusStats:
    s = CorpusStats()
    for r in sorted(records, key=lambda r: r["index"]):
        d = r["stats"]
        for k in ("documents", "tokens", "files", "bytes", "documents_seen", "bad_records"):
            setattr(s, k, getattr(s, k) + int(d[k]))
        s.skipped_files += [(x["path"], x["reason"]) for x in d["skipped_files"]]
        s.bad_record_examples += [(x["where"], x["reason"]) for x in d["bad_record_examples"]]
    s.bad_record_examples = s.bad_record_examples[:20]
    return s


def _wait(ray: Any, refs: dict, what: Callable[[int], str], progress: ProgressFn, task: str) -> list[dict[str, Any]]:
    """Wait for every task (progress on the driver), the first failure raised as the project's error."""
    results, pending = {}, dict(refs)
    progress(task, 0, len(refs))
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            results[i] = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - turned into the one-line error of the task
            for ref in pending:
                ray.cancel(ref)
            raise task_failure(ray, e, what(i)) from e
        progress(task, len(results), len(refs))
    return [results[i] for i in sorted(results)]


def count_on_ray(spec: CorpusSpec, job: CountJob, *, vocab_size: int, tasks: int, address: str | None,
                 progress: ProgressFn | None = None, map_fn=count_task) -> RayCount:
    """Count ``spec`` on the Ray cluster at ``address`` in ``tasks`` map tasks; the exact counts of
    one local pass (module docstring). ``map_fn`` is the map task (tests wrap it to kill a worker)."""
    progress = report(progress)
    if spec.shard is not None:
        raise ConfigError("--engine ray splits the corpus into tasks itself; --shard is for counting by hand",
                          "drop --shard (or drop --engine ray and merge the shards with --from-shards)")
    if spec.max_tokens is not None:
        raise ConfigError("--max-tokens cuts the stream where one pass reaches it; tasks count in parallel",
                          "drop --max-tokens (or count with --engine local)")
    ray, started = connect(address)
    try:
        fingerprint = corpus_fingerprint(spec, progress)
        plan = split_tasks(spec, fingerprint, tasks)
        for t in plan:
            t.key = task_key(job, t)
        work = Path(job.work_dir)
        (work / "map").mkdir(parents=True, exist_ok=True)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        done = {t.index for t in plan if (work / "map" / t.key / TASK_FILE).is_file()}
        remote = ray.remote(map_fn).options(num_cpus=job.cpus, max_retries=MAX_RETRIES, name="engram-count")
        refs = {remote.remote(job, t): t.index for t in plan}
        records = _wait(ray, refs, lambda i: f"count task {i} ({plan[i].sources[0]}…)", progress, "count tasks")
        seconds["map"] = time.perf_counter() - t0
        check_records(records, job)
        if sum(r["tokens"] for r in records) == 0:
            raise empty_corpus_error(spec, _merge_stats(records))
        t0 = time.perf_counter()
        corr = {str(n): (rows.tolist(), signs.tolist())
                for n, (rows, signs) in edge_corrections(records, job.max_n, job.boundary).items()}
        run_key = hashlib.sha256(json.dumps([r["key"] for r in records]).encode()).hexdigest()[:32]
        corr_parts: list[dict[str, tuple[list, list]]] = [{} for _ in range(job.partitions)]
        bits = id_bits(vocab_size)
        for n, (rows, signs) in corr.items():
            arr = np.asarray(rows, np.int64).reshape(-1, int(n))
            part = _partition_of(KeyLayout(int(n), bits).pack(arr), job.partitions)
            for p in range(job.partitions):
                sel = part == p
                if sel.any():
                    corr_parts[p][n] = (arr[sel].tolist(), np.asarray(signs)[sel].tolist())
        reduce = ray.remote(reduce_partition).options(num_cpus=1, max_retries=MAX_RETRIES, name="engram-reduce")
        refs = {reduce.remote(job, run_key, p, records, vocab_size, corr_parts[p]): p for p in range(job.partitions)}
        parts = _wait(ray, refs, lambda p: f"reduce task {p}", progress, "reduce")
        seconds["reduce"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ngrams = _merge_partitions(job, run_key, parts, records, vocab_size, progress)
        seconds["merge"] = time.perf_counter() - t0
        shutil.rmtree(work / "reduce" / run_key, ignore_errors=True)
        for r in records:
            shutil.rmtree(work / "map" / r["key"], ignore_errors=True)
        return RayCount(ngrams=ngrams, stats=_merge_stats(records), fingerprint=fingerprint, tasks=len(plan),
                        reused=len(done), partitions=job.partitions,
                        reduce_input_rows=sum(p["input_rows"] for p in parts), seconds=seconds)
    finally:
        if started:
            ray.shutdown()


def _merge_partitions(job: CountJob, run_key: str, parts: list[dict[str, Any]], records: list[dict[str, Any]],
                      vocab_size: int, progress: ProgressFn) -> NgramStats:
    bits = id_bits(vocab_size)
    stats = NgramStats(max_n=job.max_n, vocab_size=vocab_size, boundary=dict(job.boundary),
                       documents=sum(r["documents"] for r in records), tokens=sum(r["tokens"] for r in records))
    base = Path(job.work_dir) / "reduce" / run_key
    for n in range(1, job.max_n + 1):
        progress("merge", n - 1, job.max_n, order=n)
        layout = KeyLayout(n, bits)
        runs = [_load_run(_run_files(base / f"p{p['partition']:03d}", n, 0), p["rows"][str(n)], layout.words)
                for p in parts]
        keys, counts = concat_chunks(merge_runs(runs), layout.words, sum(len(r) for r in runs))
        stats.ngrams[n], stats.counts[n] = sorted_stats(layout, keys, counts)
        del keys, counts, runs
    progress("merge", job.max_n, job.max_n)
    return stats


def default_partitions(tasks: int) -> int:
    """Reduce tasks for ``tasks`` map tasks: as many, up to :data:`MAX_PARTITIONS`."""
    return max(1, min(tasks, MAX_PARTITIONS))


__all__ = ["CountJob", "CountTask", "RayCount", "count_on_ray", "count_task", "reduce_partition", "split_tasks",
           "task_key", "edge_corrections", "check_records", "default_partitions", "DEFAULT_TASKS"]
