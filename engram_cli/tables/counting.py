"""Exact n-gram counting of a token stream: :class:`NgramCounter` and :func:`count_ngrams`.

Documents of canonical ids go in; every 1..N-gram of the stream they make under a boundary rule
(``engram_cli.tables.boundary``: a separator after every document, N-grams across it or restarting after
it; without a rule, only those inside a document) is packed into one integer key (``engram_cli.tables.keys.KeyLayout``), buffered, reduced to (key, count) runs by a sort, spilled
to disk as sorted runs when memory is full and k-way merged at the end (``engram_cli.tables.keys``),
giving an :class:`engram_cli.tables.stats.NgramStats`. Counts are exact (tested against
``collections.Counter``) and memory stays bounded (``counter_sizes``). Measured throughput and
peak memory: docs/corpus.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from engram_cli.core.errors import ArtifactError, ConfigError, InputError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.tables.boundary import Boundary, boundary_ngrams, split_edges
from engram_cli.tables.keys import (
    KeyLayout,
    SortedRun,
    concat_chunks,
    id_bits,
    merge_runs,
    reduce_keys,
    stream_keys,
    write_run,
)
from engram_cli.tables.stats import NgramStats, sorted_stats

MAX_ORDER = 8                      # highest order counted; orders needing 3+ words are slower


_EXTRACT_TOKENS = 1 << 20          # queued tokens per key computation (~8 MB per array)


_DENSE_UNIGRAM_IDS = 1 << 22       # vocabularies up to this size count 1-grams in an array (32 MiB)


_MAX_MEMORY_RUNS = 16              # more runs of one order in memory are merged into one


_MAX_DISK_RUNS = 32                # more runs of one order on disk are merged into one


def counter_sizes(memory_limit: int | None, max_n: int, vocab_size: int) -> dict[str, int]:
    """:class:`NgramCounter` options that keep its buffers and runs within ``memory_limit`` bytes
    (None: the defaults): a quarter for the key buffers (8 bytes per word of every order counted
    by sorting, per token), another quarter for reducing one of them, half for the sorted runs
    kept in memory before they spill to disk. The result of the count is not included: it is
    ``8 (n + 1)`` bytes per distinct n-gram of order n, whatever the limit."""
    if memory_limit is None:
        return {}
    if memory_limit < 1 << 20:
        raise ConfigError(f"a memory limit of {memory_limit} bytes is too small to count in",
                          "give at least 1 MiB, e.g. --memory-limit 2GB")
    bits = id_bits(vocab_size)
    dense = vocab_size <= _DENSE_UNIGRAM_IDS
    per_token = 8 * sum(KeyLayout(n, bits).words for n in range(1 + dense, max_n + 1))
    return {"buffer_tokens": max(1024, memory_limit // 4 // max(per_token, 8)), "spill_bytes": memory_limit // 2}


class NgramCounter:
    """Counts N-grams of orders 1..max_n over documents of canonical ids, in bounded memory.

    >>> counter = NgramCounter(3, vocab_size=vm.canonical_vocab_size)   # doctest: +SKIP
    >>> for batch in iter_tokenized(spec, tok, stats=cstats):            # doctest: +SKIP
    ...     counter.add_many(vm.table[ids] for ids in batch)             # or add_batch(ids, lengths)
    >>> stats = counter.finish(progress)                                 # doctest: +SKIP

    Memory: about ``8 * words`` bytes per order and buffered token (``buffer_tokens``) during
    buffering, up to twice that while a buffer is reduced, plus the in-memory runs (at most
    ``spill_bytes``), plus the final result; :func:`counter_sizes` derives both from one limit.
    1-grams of a vocabulary up to ``_DENSE_UNIGRAM_IDS`` ids are counted in one array instead.
    """

    def __init__(self, max_n: int = 3, *, vocab_size: int, spill_dir: str | os.PathLike | None = None,
                 buffer_tokens: int = 8_000_000, spill_bytes: int = 1 << 30, boundary: Boundary | None = None,
                 keep_edges: bool = False):
        if not 1 <= max_n <= MAX_ORDER:
            raise ConfigError(f"N-gram order {max_n} is out of range", f"pass max_n between 1 and {MAX_ORDER}")
        if vocab_size < 1:
            raise ConfigError(f"vocab_size must be positive, got {vocab_size}", "pass the canonical vocabulary size")
        if buffer_tokens < 1 or spill_bytes < 0:
            raise ConfigError("buffer_tokens must be positive and spill_bytes non-negative",
                              "pass positive sizes")
        self.max_n = max_n                    # highest order counted
        self.vocab_size = int(vocab_size)     # ids must lie in 0..vocab_size-1
        self.buffer_tokens = buffer_tokens    # keys per order buffered before reduction to a run
        self.spill_bytes = spill_bytes        # in-memory run bytes that trigger a spill to disk
        self.documents = 0
        self.tokens = 0
        self.spills = 0                       # how many times runs were written to disk
        # the boundary rule (None: N-grams inside documents only). Under pad-start the N-grams
        # across documents read the stream's last ids (the context) or, for a shard whose documents
        # are not consecutive (keep_edges), are left to merge_stats, which reads the kept edges
        self.boundary = boundary
        if boundary is not None:
            for what, i in (("separator", boundary.separator), ("pad", boundary.pad)):
                if not 0 <= i < vocab_size:
                    raise ConfigError(f"the {what} id {i} is outside the canonical vocabulary 0..{vocab_size - 1}",
                                      "pass canonical ids (mapped through the vocab map)")
        self._edges: list[np.ndarray] | None = [] if keep_edges and boundary is not None and \
            boundary.rule == "pad-start" else None
        self._context = None if boundary is None else np.full(max_n - 1, boundary.pad, dtype=np.int64)
        bits = id_bits(self.vocab_size)
        self.layouts = {n: KeyLayout(n, bits) for n in range(1, max_n + 1)}
        self._spill_parent = Path(spill_dir) if spill_dir is not None else None
        self._spill_path: Path | None = None
        # 1-grams of a vocabulary that fits an array are counted there (np.bincount), not sorted
        self._unigrams = np.zeros(self.vocab_size, np.int64) if self.vocab_size <= _DENSE_UNIGRAM_IDS else None
        self._keyed = {n: lay for n, lay in self.layouts.items() if n > 1 or self._unigrams is None}
        self._pending: list[np.ndarray] = []          # queued ids, documents one after another
        self._pending_lengths: list[np.ndarray] = []  # their document lengths
        self._pending_tokens = 0
        self._buffers: dict[int, list[np.ndarray]] = {n: [] for n in self.layouts}
        self._buffered = 0
        self._memory_runs: dict[int, list[SortedRun]] = {n: [] for n in self.layouts}
        self._disk_runs: dict[int, list[SortedRun]] = {n: [] for n in self.layouts}
        self._run_files = 0
        self._finished = False

    # -- input ---------------------------------------------------------------------------------

    def add(self, doc_ids) -> None:
        """Queue one document's canonical ids (1-D integer array)."""
        ids = np.asarray(doc_ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise InputError(f"a document must be a 1-D integer array, got {ids.dtype} {ids.shape}",
                             "pass one document's canonical ids at a time")
        self._queue(ids, np.array([ids.size], dtype=np.int64))

    def add_many(self, docs: Iterable) -> None:
        """Queue several documents (each a 1-D array of canonical ids)."""
        for d in docs:
            self.add(d)

    def add_batch(self, ids, lengths) -> None:
        """Queue several documents at once: ``ids`` holds their canonical ids one after another
        (1-D integers), ``lengths`` each document's length (0 for an empty document).

        The same counts as :meth:`add` per document, without a Python step per document: what
        ``build-tables`` uses for a tokenizer batch (corpora read by line have millions of them).
        """
        ids, lengths = np.asarray(ids), np.asarray(lengths)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise InputError(f"a batch must be a 1-D integer array of ids, got {ids.dtype} {ids.shape}",
                             "pass the documents' canonical ids concatenated, and their lengths")
        if lengths.ndim != 1 or (lengths.size and (not np.issubdtype(lengths.dtype, np.integer)
                                                   or int(lengths.min()) < 0)) or int(lengths.sum()) != ids.size:
            raise InputError(f"the document lengths ({lengths.size} values, sum {int(lengths.sum())}) do not "
                             f"split the batch's {ids.size} ids", "pass one non-negative length per document")
        self._queue(ids, lengths.astype(np.int64, copy=False))

    def _queue(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        if self._finished:
            raise RuntimeError("NgramCounter.add after finish")
        self.documents += lengths.shape[0]
        if ids.size == 0 and self._edges is None:
            return
        self._pending.append(ids)
        self._pending_lengths.append(lengths)
        self._pending_tokens += ids.size
        self.tokens += ids.size + (0 if self.boundary is None else int(np.count_nonzero(lengths)))
        if self._pending_tokens >= min(_EXTRACT_TOKENS, self.buffer_tokens):
            self._extract()

    def _extract(self) -> None:
        if not self._pending:
            return
        lengths = np.concatenate(self._pending_lengths)
        flat = np.concatenate(self._pending)
        self._pending, self._pending_lengths, self._pending_tokens = [], [], 0
        if flat.size:
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise InputError(f"id {bad} is outside the canonical vocabulary 0..{self.vocab_size - 1}",
                                 "map tokenizer ids to canonical ids (the vocab map) before counting")
        if self.boundary is not None:
            flat, lengths = self._join(flat, lengths)
        if self._unigrams is not None:
            self._unigrams += np.bincount(flat, minlength=self.vocab_size)
        if self._keyed:
            keys = stream_keys(flat.astype(np.uint64), lengths, self._keyed)
            for n, k in keys.items():
                self._buffers[n].append(k)
        self._buffered += flat.size
        if self._buffered >= self.buffer_tokens:
            self._flush()

    def _join(self, flat: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append the separator to every (non-empty) document and queue the N-grams that reach
        back across each document's start (or keep its edges for merge_stats)."""
        b = self.boundary
        ends = np.cumsum(lengths)[lengths > 0]
        flat = np.insert(flat.astype(np.int64, copy=False), ends, b.separator)
        lengths = lengths + (lengths > 0)
        if self.max_n < 2:
            return flat, lengths
        heads, tails = split_edges(flat, lengths, self.max_n - 1)
        if self._edges is not None:
            self._edges.append(np.concatenate([lengths[:, None], heads, tails], axis=1))
            return flat, lengths
        context = None if b.rule == "document" else self._context
        cross, context = boundary_ngrams(heads, tails, lengths, self.max_n, context=context, pad=b.pad)
        if b.rule == "pad-start":
            self._context = context
        self.add_ngrams(cross)
        return flat, lengths

    def add_ngrams(self, rows: dict[int, np.ndarray]) -> None:
        """Count explicit N-grams: ``{n: int [K, n] canonical ids}`` (orders 2..max_n)."""
        for n, r in rows.items():
            if r.shape[0]:
                self._buffers[n].append(self.layouts[n].pack(np.asarray(r).astype(np.uint64)))

    def _flush(self) -> None:
        """Reduce each order's buffer to a sorted run; spill when in-memory runs get too big."""
        for n in self.layouts:
            parts = self._buffers[n]
            self._buffers[n] = []
            if not parts:
                continue
            keys = parts[0] if len(parts) == 1 else np.concatenate(parts)
            del parts
            if keys.shape[0]:
                self._memory_runs[n].append(SortedRun(*reduce_keys(keys)))
            del keys
            if len(self._memory_runs[n]) > _MAX_MEMORY_RUNS:
                words = self.layouts[n].words
                self._memory_runs[n] = [SortedRun(*concat_chunks(merge_runs(self._memory_runs[n]), words))]
        self._buffered = 0
        if sum(r.nbytes for runs in self._memory_runs.values() for r in runs) > self.spill_bytes:
            self._spill()

    def _spill(self) -> None:
        for n, runs in self._memory_runs.items():
            if runs:
                self._disk_runs[n].append(self._write(n, merge_runs(runs)))
                self._memory_runs[n] = []
            if len(self._disk_runs[n]) > _MAX_DISK_RUNS:
                old = self._disk_runs[n]
                self._disk_runs[n] = [self._write(n, merge_runs(old))]
                for r in old:
                    _delete_run(r)
        self.spills += 1

    def _write(self, n: int, chunks) -> SortedRun:
        if self._spill_path is None:
            if self._spill_parent is not None:
                self._spill_parent.mkdir(parents=True, exist_ok=True)
            self._spill_path = Path(tempfile.mkdtemp(prefix="engram-ngrams-", dir=self._spill_parent))
        self._run_files += 1
        return write_run(chunks, self._spill_path / f"order{n}-run{self._run_files:05d}", self.layouts[n].words)

    # -- output --------------------------------------------------------------------------------

    def finish(self, progress: ProgressFn | None = None) -> NgramStats:
        """Merge everything into :class:`NgramStats`; reports ``progress("merge", n, max_n)``.

        The counter cannot be used afterwards; spilled files are removed.
        """
        if self._finished:
            raise RuntimeError("NgramCounter.finish called twice")
        progress = report(progress)
        try:
            self._extract()
            self._flush()
            self._finished = True
            stats = NgramStats(max_n=self.max_n, vocab_size=self.vocab_size, documents=self.documents,
                               tokens=self.tokens, boundary=None if self.boundary is None else self.boundary.to_dict(),
                               edges=None if self._edges is None else (
                                   np.concatenate(self._edges) if self._edges
                                   else np.empty((0, 2 * self.max_n - 1), np.int64)))
            for n, layout in self.layouts.items():
                progress("merge", n - 1, self.max_n, order=n)
                if n not in self._keyed:  # 1-grams counted in an array: already unique, in id order
                    ids = np.flatnonzero(self._unigrams).astype(np.uint64)
                    stats.ngrams[n], stats.counts[n] = sorted_stats(layout, ids.reshape(-1, 1),
                                                                     self._unigrams[ids.view(np.int64)])
                    continue
                runs = self._disk_runs[n] + self._memory_runs[n]
                if len(runs) == 1 and not runs[0].files:  # one run in memory: nothing to merge
                    keys, counts = runs[0].keys, runs[0].counts
                else:
                    keys, counts = concat_chunks(merge_runs(runs), layout.words, sum(len(r) for r in runs))
                self._disk_runs[n], self._memory_runs[n] = [], []
                for r in runs:
                    _delete_run(r)
                del runs
                stats.ngrams[n], stats.counts[n] = sorted_stats(layout, keys, counts)
            progress("merge", self.max_n, self.max_n)
            return stats
        finally:
            self.close()

    def close(self) -> None:
        """Remove spilled runs (``finish`` does this itself)."""
        self._finished = True
        self._memory_runs = {n: [] for n in self.layouts}
        self._disk_runs = {n: [] for n in self.layouts}
        if self._spill_path is not None:
            shutil.rmtree(self._spill_path, ignore_errors=True)
            self._spill_path = None

    def __enter__(self) -> NgramCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _delete_run(run: SortedRun) -> None:
    """Unlink a spilled run's files (the mapping stays valid until its arrays are dropped)."""
    for p in run.files:
        p.unlink(missing_ok=True)


def count_ngrams(docs: Iterable, max_n: int, vocab_size: int, **counter_options) -> NgramStats:
    """Count the N-grams of an iterable of canonical-id documents in one call (small inputs, tests)."""
    with NgramCounter(max_n, vocab_size=vocab_size, **counter_options) as counter:
        counter.add_many(docs)
        return counter.finish()


def merge_stats(parts: Sequence[NgramStats]) -> NgramStats:
    """Combine counts of disjoint document sets: the shards I/N for I = 0..N-1, in that order.

    The result equals exactly one count over all their documents: N-grams inside documents add
    up, and under the pad-start rule the N-grams across every document boundary are added from
    the shards' kept edges, document i being the (i // N)-th of shard i % N. All parts must share
    ``max_n``, ``vocab_size`` and the boundary rule.
    """
    if not parts:
        raise ConfigError("nothing to merge", "pass at least one set of N-gram counts")
    first = parts[0]
    for p in parts[1:]:
        if (p.max_n, p.vocab_size) != (first.max_n, first.vocab_size):
            raise ArtifactError(
                f"cannot merge counts of max_n {p.max_n} / vocab {p.vocab_size} with max_n {first.max_n} / "
                f"vocab {first.vocab_size}", "count every shard with the same --max-n and vocab")
        if p.boundary != first.boundary:
            raise ArtifactError(f"cannot merge counts under boundary {p.boundary} with counts under {first.boundary}",
                                "count every shard with the same --boundary and separator")
    bits = id_bits(first.vocab_size)
    out = NgramStats(max_n=first.max_n, vocab_size=first.vocab_size, boundary=first.boundary,
                     documents=sum(p.documents for p in parts), tokens=sum(p.tokens for p in parts))
    cross = _cross_shard_ngrams(parts)
    for n in range(1, first.max_n + 1):
        layout = KeyLayout(n, bits)
        keys = [layout.pack(p.ngrams[n]) for p in parts]
        counts = [p.counts[n] for p in parts]
        if n in cross and cross[n].shape[0]:
            keys.append(layout.pack(cross[n]))
            counts.append(np.ones(cross[n].shape[0], np.int64))
        ukeys, ucounts = reduce_keys(np.concatenate(keys), np.concatenate(counts))
        out.ngrams[n], out.counts[n] = sorted_stats(layout, ukeys, ucounts)
    return out


def _cross_shard_ngrams(parts: Sequence[NgramStats]) -> dict[int, np.ndarray]:
    """The pad-start N-grams across the documents of sharded counts (their edges, interleaved)."""
    if not any(p.edges is not None for p in parts):
        return {}
    N, first = len(parts), parts[0]
    if any(p.edges is None for p in parts):
        raise ArtifactError("some shards kept their documents' edges and some did not",
                            "count every shard with the same engram version and --boundary")
    D = sum(p.documents for p in parts)
    expected = [len(range(i, D, N)) for i in range(N)]
    if [p.documents for p in parts] != expected:
        raise ArtifactError(f"shards of {[p.documents for p in parts]} documents are not the {N} shards of "
                            f"one corpus of {D} documents ({expected})",
                            "count every shard of the corpus without --max-tokens, with the same --shard I/N")
    edges = np.empty((D, parts[0].edges.shape[1]), np.int64)
    for i, p in enumerate(parts):
        edges[i::N] = p.edges
    w = first.max_n - 1
    cross, _ = boundary_ngrams(edges[:, 1:1 + w], edges[:, 1 + w:], edges[:, 0], first.max_n,
                               context=np.full(w, first.boundary["pad"], np.int64), pad=first.boundary["pad"])
    return cross
