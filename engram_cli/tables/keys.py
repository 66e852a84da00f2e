"""N-gram keys: packing canonical ids into integer keys, reducing keys to sorted (key, count)
runs, and merging runs — the building blocks of exact counting (:mod:`engram_cli.tables.counting`
puts them together: buffering, spilling to disk, the final merge).

1. **Keys** (:class:`KeyLayout`, :func:`stream_keys`). Every id fits in
   ``bits = ceil(log2(vocab_size))`` bits, so ``64 // bits`` ids pack into one uint64 word, the
   oldest id in the highest bits. An N-gram of order n is a row of ``ceil(n / (64 // bits))``
   words; comparing rows word by word is comparing the id tuples lexicographically. With
   DeepSeek's canonical vocabulary (17 bits) orders 1-3 take one word, orders 4-6 two.
2. **Reduction** (:func:`reduce_keys`, with the plain :func:`reduce_keys_lexsort` beside it).
   Keys become unique keys with counts, sorted. Two-word keys are sorted through 64-bit codes
   (``_reduce_two_words``: order 4 of a 17-bit vocabulary is 68 bits, sorted as 16 buckets of
   64-bit codes), several times faster than ``np.lexsort``; three or more words fall back to it.
3. **Runs** (:class:`SortedRun`, :func:`write_run`, :func:`concat_chunks`): a reduced block in
   memory or spilled to disk and read back through ``np.memmap``.
4. **Merge** (:func:`merge_runs`): a k-way merge that holds one window of each run at a time:
   all keys up to the smallest window end are combined and emitted, so memory is bounded by the
   windows, not the corpus.

``tests/test_ngrams.py`` checks every path against ``collections.Counter``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_MERGE_WINDOW_ENTRIES = 1 << 20    # entries of all windows together in a k-way merge (~50 MB of temporaries)
_MIN_WINDOW = 1 << 12              # smallest window per run


def id_bits(vocab_size: int) -> int:
    """Bits needed for ids 0..vocab_size-1 (at least 1)."""
    return max(1, (int(vocab_size) - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# packing N-grams into uint64 words


@dataclass(frozen=True)
class KeyLayout:
    """How N-grams of order ``n`` are packed into uint64 words (oldest id in the highest bits)."""

    n: int      # N-gram order
    bits: int   # bits per id

    @property
    def per_word(self) -> int:
        return 64 // self.bits

    @property
    def words(self) -> int:
        return -(-self.n // self.per_word)

    def spans(self) -> list[tuple[int, int]]:
        """(first, end) positions of the ids held by each word."""
        p = self.per_word
        return [(s, min(s + p, self.n)) for s in range(0, self.n, p)]

    def pack(self, ngrams: np.ndarray) -> np.ndarray:
        """int [K, n] -> uint64 [K, words]."""
        ngrams = np.asarray(ngrams)
        keys = np.empty((ngrams.shape[0], self.words), dtype=np.uint64)
        shift = np.uint64(self.bits)
        for w, (s, e) in enumerate(self.spans()):
            acc = ngrams[:, s].astype(np.uint64)
            for j in range(s + 1, e):
                acc = (acc << shift) | ngrams[:, j].astype(np.uint64)
            keys[:, w] = acc
        return keys

    def unpack(self, keys: np.ndarray) -> np.ndarray:
        """uint64 [K, words] -> int64 [K, n]."""
        out = np.empty((keys.shape[0], self.n), dtype=np.int64)
        bits_out = out.view(np.uint64)  # ids < 2**63, so the bit patterns are the int64 values
        tmp = np.empty(keys.shape[0], dtype=np.uint64)
        mask = np.uint64((1 << self.bits) - 1)
        for w, (s, e) in enumerate(self.spans()):
            word = np.ascontiguousarray(keys[:, w])
            for j in range(s, e):
                np.right_shift(word, np.uint64(self.bits * (e - 1 - j)), out=tmp)
                np.bitwise_and(tmp, mask, out=tmp)
                bits_out[:, j] = tmp
        return out


def stream_keys(ids: np.ndarray, lengths: np.ndarray, layouts: dict[int, KeyLayout]) -> dict[int, np.ndarray]:
    """Packed keys of every N-gram inside the documents of a concatenated id stream.

    ``ids``: uint64 [T], the documents one after another; ``lengths``: their lengths. Returns
    ``{n: uint64 [K_n, words]}`` in stream order, without N-grams that cross a document end.
    """
    total = ids.shape[0]
    bits = next(iter(layouts.values())).bits
    shift = np.uint64(bits)
    per_word = next(iter(layouts.values())).per_word
    # prefix packs: packs[m][i] = ids[i .. i+m-1] in one word (m <= per_word)
    packs = {1: ids}
    for m in range(2, min(per_word, max(layouts)) + 1):
        prev = packs[m - 1]
        packs[m] = (prev[:-1] << shift) | ids[m - 1:]
    # remaining[i] = tokens from i to the end of its document (inclusive)
    remaining = np.repeat(np.cumsum(lengths), lengths) - np.arange(total)
    out = {}
    for n, layout in layouts.items():
        count = total - n + 1
        if count <= 0:
            out[n] = np.empty((0, layout.words), dtype=np.uint64)
            continue
        valid = None if n == 1 else remaining[:count] >= n
        keys = np.empty((count if valid is None else int(valid.sum()), layout.words), dtype=np.uint64)
        for w, (s, e) in enumerate(layout.spans()):
            col = packs[e - s][s:s + count]
            keys[:, w] = col if valid is None else col[valid]
        out[n] = keys
    return out


# ---------------------------------------------------------------------------------------------
# reducing keys to sorted unique keys with counts


def _group_starts(sorted_code: np.ndarray) -> np.ndarray:
    if sorted_code.shape[0] == 0:
        return np.empty(0, dtype=np.intp)
    change = np.empty(sorted_code.shape[0], dtype=bool)
    change[0] = True
    np.not_equal(sorted_code[1:], sorted_code[:-1], out=change[1:])
    return np.flatnonzero(change)


def _reduce_code(code: np.ndarray, counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Unique values of a uint64 code (sorted) and their summed counts (1 each when None)."""
    if counts is None:
        uniq, c = np.unique(code, return_counts=True)
        return uniq, c.astype(np.int64)
    order = np.argsort(code, kind="stable")
    sorted_code = code[order]
    starts = _group_starts(sorted_code)
    return sorted_code[starts], np.add.reduceat(counts[order], starts) if starts.size else counts[:0]


def _rank(column: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(sorted distinct values, uint64 rank of each value, bits of the largest rank)."""
    order = np.argsort(column)
    s = column[order]
    starts = _group_starts(s)
    is_start = np.zeros(s.shape[0], dtype=np.uint64)
    is_start[starts] = 1
    ranks = np.empty(s.shape[0], dtype=np.uint64)
    ranks[order] = np.cumsum(is_start) - np.uint64(1)
    return s[starts], ranks, max(1, (starts.shape[0] - 1).bit_length())


_MAX_PREFIX_BITS = 12  # two-word keys up to 64 + this many bits are sorted bucket by bucket


def _reduce_two_words(keys: np.ndarray, counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`reduce_keys` for two-word rows, through 64-bit codes whose order is the rows' order.

    With ``hb`` + ``lb`` significant bits in the two words: when they fit in 64 bits the code is
    ``hi << lb | lo``. When they exceed 64 by at most ``_MAX_PREFIX_BITS`` (order 4 with DeepSeek's
    17-bit ids: 68 bits), rows are bucketed by their top bits with a stable radix argsort of a
    uint16 and each bucket's remaining 64 bits are reduced as one code. Wider rows replace each
    word by its rank among the distinct words, which always fits.
    """
    hi, lo = np.ascontiguousarray(keys[:, 0]), np.ascontiguousarray(keys[:, 1])
    hb, lb = max(1, int(hi.max()).bit_length()), max(1, int(lo.max()).bit_length())
    u64 = np.uint64
    out_parts, count_parts = [], []
    if hb + lb <= 64:
        uniq, c = _reduce_code((hi << u64(lb)) | lo, counts)
        out = np.empty((uniq.shape[0], 2), dtype=np.uint64)
        out[:, 0], out[:, 1] = uniq >> u64(lb), uniq & u64((1 << lb) - 1)
        return out, c
    extra = hb + lb - 64
    if extra <= _MAX_PREFIX_BITS:
        low_hb = hb - extra  # bits of hi that go into the 64-bit code
        prefix = (hi >> u64(low_hb)).astype(np.uint16)
        code = ((hi & u64((1 << low_hb) - 1)) << u64(lb)) | lo
        order = np.argsort(prefix, kind="stable")  # radix sort for 16-bit keys
        prefix, code = prefix[order], code[order]
        counts = None if counts is None else counts[order]
        bounds = np.append(_group_starts(prefix), prefix.shape[0])
        for a, b in zip(bounds[:-1], bounds[1:]):
            uniq, c = _reduce_code(code[a:b], None if counts is None else counts[a:b])
            part = np.empty((uniq.shape[0], 2), dtype=np.uint64)
            part[:, 0] = (u64(prefix[a]) << u64(low_hb)) | (uniq >> u64(lb))
            part[:, 1] = uniq & u64((1 << lb) - 1)
            out_parts.append(part)
            count_parts.append(c)
        return np.concatenate(out_parts), np.concatenate(count_parts)
    u0, r0, b0 = _rank(hi)
    u1, r1, b1 = (None, lo, lb) if b0 + lb <= 64 else _rank(lo)
    uniq, c = _reduce_code((r0 << u64(b1)) | r1, counts)
    out = np.empty((uniq.shape[0], 2), dtype=np.uint64)
    out[:, 0] = u0[uniq >> u64(b1)]
    low = uniq & u64((1 << b1) - 1)
    out[:, 1] = low if u1 is None else u1[low]
    return out, c


def reduce_keys(keys: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``keys`` (uint64 [K, W]) made unique and sorted lexicographically, with counts.

    ``counts`` (int64 [K]) are summed per distinct row; None counts every row once.
    """
    k, words = keys.shape
    if k == 0:
        return keys.copy(), np.empty(0, dtype=np.int64)
    if words == 1:
        uniq, c = _reduce_code(np.ascontiguousarray(keys[:, 0]), counts)
        return uniq.reshape(-1, 1), c
    if words == 2:
        return _reduce_two_words(keys, counts)
    return reduce_keys_lexsort(keys, counts)


def reduce_keys_lexsort(keys: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Plain ``np.lexsort`` version of :func:`reduce_keys` (any number of words; the reference)."""
    if keys.shape[0] == 0:
        return keys.copy(), np.empty(0, dtype=np.int64)
    order, starts = group_rows(keys)
    c = np.ones(keys.shape[0], dtype=np.int64) if counts is None else counts[order]
    return keys[order[starts]], np.add.reduceat(c, starts)


def group_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Equal rows of ``keys`` (uint64 [K, W]) grouped: ``(order, starts)``.

    ``order`` sorts the rows lexicographically and is stable, so within a group the rows keep
    their input order: ``order[starts]`` are the first occurrences of the distinct rows (in
    sorted order), and per-row values ``x`` are summed per group by
    ``np.add.reduceat(x[order], starts)``.
    """
    order = np.lexsort(keys.T[::-1])
    sk = keys[order]
    change = np.ones(sk.shape[0], dtype=bool)
    change[1:] = np.any(sk[1:] != sk[:-1], axis=1)
    return order, np.flatnonzero(change)


# ---------------------------------------------------------------------------------------------
# sorted runs and their k-way merge


@dataclass
class SortedRun:
    """Sorted unique keys with counts, in memory or memory-mapped from ``spill_dir``."""

    keys: np.ndarray    # uint64 [K, W], rows sorted lexicographically, unique
    counts: np.ndarray  # int64 [K]
    files: tuple[Path, ...] = ()  # the backing files of a spilled run

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def nbytes(self) -> int:
        return 0 if self.files else self.keys.nbytes + self.counts.nbytes


def merge_runs(runs: Sequence[SortedRun], window: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """k-way merge of sorted runs: yields (keys, counts) chunks, sorted, disjoint, counts summed.

    Each step looks at a window of every run, takes from each all keys up to the smallest last
    key of the windows (so at least one window is used up) and reduces them together.
    """
    runs = [r for r in runs if len(r)]
    if not runs:
        return
    if window is None:
        window = max(_MIN_WINDOW, _MERGE_WINDOW_ENTRIES // len(runs))
    if len(runs) == 1:
        r = runs[0]
        for s in range(0, len(r), window):
            yield np.asarray(r.keys[s:s + window]), np.asarray(r.counts[s:s + window])
        return
    words = runs[0].keys.shape[1]
    pos = [0] * len(runs)
    while True:
        live = [i for i, r in enumerate(runs) if pos[i] < len(r)]
        if not live:
            return
        if len(live) == 1:  # the rest of one run: already unique and sorted
            i = live[0]
            k, c = np.asarray(runs[i].keys[pos[i]:pos[i] + window]), np.asarray(runs[i].counts[pos[i]:pos[i] + window])
            pos[i] += k.shape[0]
            yield k, c
            continue
        wins = {i: np.asarray(runs[i].keys[pos[i]:pos[i] + window]) for i in live}
        ends = {i: tuple(int(x) for x in w[-1]) for i, w in wins.items()}
        limit = min(ends.values())
        parts_k, parts_c = [], []
        for i in live:
            w = wins[i]
            if ends[i] <= limit:
                take = w.shape[0]
            elif words == 1:
                take = int(np.searchsorted(w[:, 0], np.uint64(limit[0]), side="right"))
            else:
                take = bisect.bisect_right(range(w.shape[0]), limit, key=lambda j: tuple(int(x) for x in w[j]))
            if take:
                parts_k.append(w[:take])
                parts_c.append(np.asarray(runs[i].counts[pos[i]:pos[i] + take]))
                pos[i] += take
        yield reduce_keys(np.concatenate(parts_k), np.concatenate(parts_c))


def write_run(chunks: Iterable[tuple[np.ndarray, np.ndarray]], base: Path, words: int) -> SortedRun:
    """Stream merged chunks to ``base.keys`` / ``base.counts`` and map them back read-only."""
    kpath, cpath = base.with_suffix(".keys"), base.with_suffix(".counts")
    total = 0
    with open(kpath, "wb") as fk, open(cpath, "wb") as fc:
        for k, c in chunks:
            fk.write(np.ascontiguousarray(k, dtype=np.uint64).tobytes())
            fc.write(np.ascontiguousarray(c, dtype=np.int64).tobytes())
            total += k.shape[0]
    if total == 0:
        return SortedRun(np.empty((0, words), np.uint64), np.empty(0, np.int64), (kpath, cpath))
    keys = np.memmap(kpath, dtype=np.uint64, mode="r", shape=(total, words))
    counts = np.memmap(cpath, dtype=np.int64, mode="r", shape=(total,))
    return SortedRun(keys, counts, (kpath, cpath))


def concat_chunks(chunks: Iterable[tuple[np.ndarray, np.ndarray]], words: int,
                   total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All merged chunks as two in-memory arrays. With ``total``, an upper bound of their rows
    (the merged runs' lengths summed), each chunk is copied into arrays of that size as it comes,
    so the chunks are never held all at once beside their concatenation."""
    if total is not None:
        keys, counts = np.empty((total, words), np.uint64), np.empty(total, np.int64)
        end = 0
        for k, c in chunks:
            keys[end:end + k.shape[0]], counts[end:end + k.shape[0]] = k, c
            end += k.shape[0]
        return keys[:end], counts[:end]
    ks, cs = [], []
    for k, c in chunks:
        ks.append(k)
        cs.append(c)
    if not ks:
        return np.empty((0, words), np.uint64), np.empty(0, np.int64)
    keys = np.concatenate(ks)
    del ks
    return keys, np.concatenate(cs)
