"""Exact N-gram counts of a corpus: :class:`NgramStats`, its figures and its Parquet files.

What :class:`engram_cli.tables.counting.NgramCounter` produces and ``engram build-tables`` writes under
``ngrams/``: per order n, the distinct N-grams (int64 [K, n] canonical ids, oldest first) with
their counts, sorted by count descending, then by the ids. ``NgramStats.load`` checks the format,
the columns, the totals and the order of what it reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engram_cli.core.artifacts import read_json
from engram_cli.core.errors import ArtifactError, ConfigError
from engram_cli.tables.keys import KeyLayout

STATS_FORMAT = "engram.ngram_stats"
STATS_VERSION = 1
STATS_FILE = "ngram_stats.json"
EDGES_FILE = "document_edges.npy"   # sharded pad-start counts only (see NgramStats.edges)

_PARQUET_ROW_GROUP = 1 << 20
_UNPACK_ROWS = 1 << 20             # keys unpacked to ids per block (sorted_stats)


def ngrams_file(n: int) -> str:
    return f"ngrams_{n}.parquet"


@dataclass
class NgramStats:
    """Exact N-gram counts of a corpus, orders 1..max_n.

    ``ngrams[n]``: int64 [K, n], canonical ids in text order (column 0 = oldest token);
    ``counts[n]``: int64 [K]. Rows are sorted by count, descending, then by the ids.
    """

    max_n: int                          # highest order counted
    vocab_size: int                     # canonical vocabulary size (ids are 0..vocab_size-1)
    documents: int                      # documents counted
    tokens: int                         # tokens counted (= total(1); separators included)
    # the document-boundary rule counted under (engram_cli.tables.boundary.Boundary.to_dict()); None:
    # N-grams inside documents only, no separator (counts from before the rule existed)
    boundary: dict[str, Any] | None = None
    # sharded pad-start counts: each document's length and first/last ids (int64 [D, 1 + 2w]),
    # from which --from-shards adds the N-grams across documents of different shards
    edges: np.ndarray | None = field(default=None, repr=False)
    ngrams: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # n -> int64 [K, n] ids
    counts: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # n -> int64 [K] counts

    def _order(self, n: int) -> int:
        if n not in self.counts:
            raise ConfigError(f"no N-grams of order {n} were counted (orders 1..{self.max_n})",
                              f"count with max_n >= {n}")
        return n

    def total(self, n: int) -> int:
        """Occurrences of order-n N-grams."""
        return int(self.counts[self._order(n)].sum())

    def distinct(self, n: int) -> int:
        """Distinct order-n N-grams."""
        return int(self.counts[self._order(n)].shape[0])

    def count_of_counts(self, n: int, max_c: int = 10) -> np.ndarray:
        """int64 [max_c + 2]: ``[c]`` = distinct N-grams seen exactly c times (1 <= c <= max_c),
        ``[-1]`` = those seen more than max_c times; ``[0]`` is 0."""
        if max_c < 1:
            raise ConfigError(f"max_c must be at least 1, got {max_c}", "pass max_c >= 1")
        c = np.minimum(self.counts[self._order(n)], max_c + 1)
        return np.bincount(c, minlength=max_c + 2).astype(np.int64)

    def coverage(self, n: int, ks: int | Iterable[int]) -> float | np.ndarray:
        """Share of order-n occurrences covered by the k most frequent N-grams, for each k."""
        counts = self.counts[self._order(n)]
        scalar = np.isscalar(ks)
        k = np.atleast_1d(np.asarray(ks, dtype=np.int64))
        if (k < 0).any():
            raise ConfigError("coverage needs k >= 0", "pass non-negative k")
        cum = np.concatenate([[0], np.cumsum(counts)])
        total = cum[-1]
        share = cum[np.minimum(k, counts.shape[0])] / total if total else np.zeros(k.shape)
        return float(share[0]) if scalar else share

    def top(self, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most frequent order-n N-grams: (int64 [k, n] ids, int64 [k] counts)."""
        n = self._order(n)
        return self.ngrams[n][:k], self.counts[n][:k]

    def summary(self) -> dict[str, Any]:
        """Figures per order, for manifests and ``--json`` output."""
        return {
            "documents": self.documents, "tokens": self.tokens, "max_n": self.max_n, "vocab_size": self.vocab_size,
            **({"boundary": self.boundary} if self.boundary is not None else {}),
            "orders": {str(n): {"distinct": self.distinct(n), "total": self.total(n),
                                "singletons": int(self.count_of_counts(n, 1)[1])}
                       for n in range(1, self.max_n + 1)},
        }

    # -- files ---------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``ngrams_{n}.parquet`` per order (columns ``id_0``..``id_{n-1}``, ``count``)
        and ``ngram_stats.json``. Returns the paths written."""

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)

        def write(n: int) -> Path:
            # one row group at a time: a few MB of columns in Arrow, not a copy of the whole order
            names = [f"id_{j}" for j in range(n)] + ["count"]
            path = directory / ngrams_file(n)
            with pq.ParquetWriter(path, pa.schema([(c, pa.int64()) for c in names]), compression="zstd") as f:
                for s in range(0, self.counts[n].shape[0], _PARQUET_ROW_GROUP):
                    rows = self.ngrams[n][s:s + _PARQUET_ROW_GROUP]
                    cols = [pa.array(np.ascontiguousarray(rows[:, j]), type=pa.int64()) for j in range(n)]
                    cols.append(pa.array(self.counts[n][s:s + _PARQUET_ROW_GROUP], type=pa.int64()))
                    f.write_table(pa.Table.from_arrays(cols, names=names))
            return path

        # the orders' files in parallel: Arrow compresses and writes without the GIL
        with ThreadPoolExecutor(max(1, min(self.max_n, os.cpu_count() or 1))) as pool:
            written = list(pool.map(write, range(1, self.max_n + 1)))
        if self.edges is not None:
            np.save(directory / EDGES_FILE, self.edges, allow_pickle=False)
            written.append(directory / EDGES_FILE)
        meta = {"format": STATS_FORMAT, "format_version": STATS_VERSION, **self.summary(),
                "files": {str(n): ngrams_file(n) for n in range(1, self.max_n + 1)},
                **({"edges": EDGES_FILE} if self.edges is not None else {}),
                "columns": "id_0 .. id_{n-1} (int64, id_0 = oldest token), count (int64); "
                           "rows by count descending, then ids"}
        path = directory / STATS_FILE
        path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        written.append(path)
        return written

    @classmethod
    def load(cls, directory: str | os.PathLike) -> NgramStats:
        """Read what :meth:`save` wrote, checking the format, the columns and the totals."""

        directory = Path(directory)
        producer = "engram build-tables"
        meta_path = directory / STATS_FILE
        if not meta_path.is_file():
            raise ArtifactError(f"{directory} holds no {STATS_FILE}: it has no N-gram counts",
                                f"create them with `{producer}`")
        meta = read_json(meta_path, what="N-gram statistics", producer=producer)
        if meta.get("format") != STATS_FORMAT or meta.get("format_version") != STATS_VERSION:
            raise ArtifactError(f"{meta_path} is not {STATS_FORMAT} version {STATS_VERSION} "
                                f"(found {meta.get('format')!r} version {meta.get('format_version')!r})",
                                f"recreate it with `{producer} --force`")
        stats = cls(max_n=int(meta["max_n"]), vocab_size=int(meta["vocab_size"]),
                    documents=int(meta["documents"]), tokens=int(meta["tokens"]),
                    boundary=_read_boundary(meta, meta_path))
        if "edges" in meta:
            stats.edges = _read_edges(directory / EDGES_FILE, stats)
        for n in range(1, stats.max_n + 1):
            path = directory / ngrams_file(n)
            if not path.is_file():
                raise ArtifactError(f"{directory} is incomplete: {path.name} is missing",
                                    f"recreate it with `{producer} --force`")
            try:
                table = pq.ParquetFile(path).read()  # not read_table: that imports pandas (~1 s)
            except (pa.ArrowException, OSError) as e:
                raise ArtifactError(f"{path} is not a readable Parquet file",
                                    f"recreate it with `{producer} --force`") from e
            expected = [f"id_{j}" for j in range(n)] + ["count"]
            if table.column_names != expected or any(t != pa.int64() for t in table.schema.types):
                raise ArtifactError(f"{path} has columns {table.column_names}, expected int64 {expected}",
                                    f"recreate it with `{producer} --force`")
            k = table.num_rows
            ngrams = np.empty((k, n), dtype=np.int64)
            for j in range(n):
                ngrams[:, j] = table.column(j).to_numpy()
            counts = table.column(n).to_numpy().astype(np.int64, copy=False)
            order_meta = meta.get("orders", {}).get(str(n), {})
            problem = None
            if k != order_meta.get("distinct") or int(counts.sum()) != order_meta.get("total"):
                problem = "its row count or total does not match ngram_stats.json"
            elif k and (counts.min() < 1 or (counts[1:] > counts[:-1]).any()):
                problem = "its counts are not positive and in descending order"
            elif k and (ngrams.min() < 0 or ngrams.max() >= stats.vocab_size):
                problem = f"it holds ids outside 0..{stats.vocab_size - 1}"
            if problem:
                raise ArtifactError(f"{path} is damaged: {problem}", f"recreate it with `{producer} --force`")
            stats.ngrams[n], stats.counts[n] = ngrams, counts
        return stats


def _read_boundary(meta: dict, path: Path) -> dict[str, Any] | None:
    b = meta.get("boundary")
    if b is None:
        return None
    ok = (isinstance(b, dict) and set(b) == {"rule", "separator", "pad"} and isinstance(b["rule"], str)
          and all(isinstance(b[k], int) and not isinstance(b[k], bool) for k in ("separator", "pad")))
    if not ok:
        raise ArtifactError(f"{path}: boundary must hold rule, separator and pad, got {b!r}",
                            "recreate it with `engram build-tables --force`")
    return b


def _read_edges(path: Path, stats: NgramStats) -> np.ndarray:
    """The documents' edges of a sharded count, checked (int64 [documents, 1 + 2 (max_n - 1)])."""
    try:
        edges = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable .npy array", "recount the shard with --force") from e
    w = stats.max_n - 1
    if edges.dtype != np.int64 or edges.shape != (stats.documents, 1 + 2 * w) or \
            (edges.size and (edges[:, 0].min() < 0 or edges[:, 1:].min() < 0 or edges[:, 1:].max() >= stats.vocab_size)):
        raise ArtifactError(f"{path} is damaged: expected int64 [{stats.documents}, {1 + 2 * w}] lengths and ids",
                            "recount the shard with --force")
    return edges


def order_by_count(counts: np.ndarray) -> np.ndarray:
    """Permutation sorting ``counts`` descending, ties kept in their current order (stable).

    Sorts one uint64 per row, ``(max - count) << index_bits | index``, which measured ~3x faster
    than ``np.argsort(-counts, kind="stable")`` on 26M rows; that is the fallback when the two
    do not fit in 64 bits together.
    """
    k = counts.shape[0]
    if k == 0:
        return np.empty(0, dtype=np.int64)
    index_bits = max(1, (k - 1).bit_length())
    top = int(counts.max())
    if top.bit_length() + index_bits > 64 or int(counts.min()) < 0:
        return np.argsort(-counts, kind="stable")
    code = (np.uint64(top) - counts.astype(np.uint64)) << np.uint64(index_bits)
    code |= np.arange(k, dtype=np.uint64)
    code.sort()
    code &= np.uint64((1 << index_bits) - 1)
    return code.view(np.int64)


def sorted_stats(layout: KeyLayout, keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Key-sorted unique keys -> (int64 [K, n] ids, counts), by count descending then ids."""
    order = order_by_count(counts)  # stable: ties stay in key (= id tuple) order
    ids = np.empty((keys.shape[0], layout.n), dtype=np.int64)
    for s in range(0, keys.shape[0], _UNPACK_ROWS):  # in blocks: no reordered copy of all the keys
        ids[s:s + _UNPACK_ROWS] = layout.unpack(keys[order[s:s + _UNPACK_ROWS]])
    return ids, counts[order]
