"""Training data for ``engram train``: the split, the sub-vocabulary, batches.

1. **Token stream, cached.** The corpus is tokenized once into the token cache
   (:mod:`engram_cli.corpus.cache`): one int32 stream of ORIGINAL tokenizer ids, every document
   followed by the EOS token, memory-mapped.
2. **Split.** The stream is cut into chunks of ``val_chunk_tokens``; chunk j is held out for
   validation when ``floor((j+1) f + 1/2) > floor(j f + 1/2)`` (f = ``val_fraction``): every
   1/f-th chunk, the first one in the middle of the first 1/f. Systematic sampling over the *stream* (not over documents) keeps every source in the
   validation set in proportion to its tokens, however unequal the documents are; chunks keep the
   text contiguous. Training windows never cross into a validation chunk.
3. **Sub-vocabulary.** A 129k-way output layer would cost a tiny model more than everything else
   on a CPU, so the model predicts over the ids the *training* chunks use at least ``min_count``
   times (EOS always included): model id i <-> ``original_ids[i]`` (ascending), and one UNK id
   (= ``len(original_ids)``) for everything else. Rarer training tokens map to UNK too, so the
   model learns how much probability unseen tokens deserve (Good-Turing: about the share of
   singletons) instead of meeting UNK for the first time in validation. The map is saved in every
   checkpoint (``subvocab.safetensors``). The Engram tables are unaffected: they are hashed from
   the canonical ids of the full vocabulary (``VocabMap``), so rare tokens keep their identity
   there.
4. **Batches.** The training batch of step s is a pure function of (seed, s): ``batch_size``
   windows of ``block_size + 1`` tokens at uniform random starts drawn by
   ``np.random.default_rng([seed, s])``. Resuming at step s therefore needs no loader state
   beyond s, and data-parallel ranks draw the same global batch and take disjoint contiguous
   slices of it. Validation uses fixed non-overlapping windows spread evenly over the held-out
   chunks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from engram_cli.core.errors import ArtifactError, ConfigError, InputError
from engram_cli.corpus.cache import TokenCache

# ---------------------------------------------------------------------------------------------
# split


@dataclass(frozen=True)
class Split:
    """Which token ranges of the stream train and which validate: lists of [start, end)."""

    train: tuple[tuple[int, int], ...]
    val: tuple[tuple[int, int], ...]

    @property
    def train_tokens(self) -> int:
        return sum(b - a for a, b in self.train)

    @property
    def val_tokens(self) -> int:
        return sum(b - a for a, b in self.val)


def split_stream(n_tokens: int, val_fraction: float, chunk_tokens: int) -> Split:
    """Every 1/f-th chunk of ``chunk_tokens`` is validation (f = ``val_fraction``); adjacent
    chunks of the same kind are merged into one range."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}", "e.g. --set data.val_fraction=0.05")
    if chunk_tokens < 2:
        raise ConfigError(f"data.val_chunk_tokens must be >= 2, got {chunk_tokens}", "e.g. --set data.val_chunk_tokens=1024")
    ranges: dict[bool, list[list[int]]] = {True: [], False: []}
    last = None
    for j in range(math.ceil(n_tokens / chunk_tokens)):
        is_val = math.floor((j + 1) * val_fraction + 0.5) > math.floor(j * val_fraction + 0.5)
        a, b = j * chunk_tokens, min((j + 1) * chunk_tokens, n_tokens)
        if last is is_val:
            ranges[is_val][-1][1] = b
        else:
            ranges[is_val].append([a, b])
        last = is_val
    return Split(train=tuple(map(tuple, ranges[False])), val=tuple(map(tuple, ranges[True])))


# ---------------------------------------------------------------------------------------------
# sub-vocabulary


@dataclass
class SubVocab:
    """The model's compact vocabulary: model id i is original id ``original_ids[i]``; the last id is UNK."""

    original_ids: np.ndarray   # (n,) int64, ascending original ids kept
    original_vocab_size: int   # size of the tokenizer's vocabulary

    def __post_init__(self) -> None:
        ids = np.asarray(self.original_ids, dtype=np.int64)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= self.original_vocab_size)) \
                or np.any(np.diff(ids) <= 0):
            raise ArtifactError("sub-vocabulary map is malformed (ids must be ascending, distinct and in range)",
                                "start the run over with --force")
        self.original_ids = ids
        lookup = np.full(self.original_vocab_size, self.unk_id, dtype=np.int64)
        lookup[ids] = np.arange(ids.size, dtype=np.int64)
        self._lookup = lookup

    @property
    def unk_id(self) -> int:
        return int(self.original_ids.size)

    @property
    def size(self) -> int:
        """Model vocabulary size: the kept ids plus UNK."""
        return int(self.original_ids.size) + 1

    @property
    def lookup(self) -> np.ndarray:
        """(original_vocab_size,) int64: original id -> model id (UNK for ids not kept)."""
        return self._lookup

    def to_model_ids(self, ids: np.ndarray) -> np.ndarray:
        """Original ids (any shape) -> model ids; ids outside the vocabulary raise InputError."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.original_vocab_size):
            raise InputError(f"token ids must be in [0, {self.original_vocab_size})", "use this tokenizer's ids")
        return self._lookup[ids]

    def to_original_ids(self, model_ids: np.ndarray) -> np.ndarray:
        """Model ids -> original ids; UNK becomes -1."""
        model_ids = np.asarray(model_ids, dtype=np.int64)
        table = np.append(self.original_ids, -1)
        return table[model_ids]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.original_ids.tobytes())
        h.update(str(self.original_vocab_size).encode())
        return h.hexdigest()

    @classmethod
    def from_counts(cls, counts: np.ndarray, min_count: int, always: tuple[int, ...] = ()) -> SubVocab:
        """Keep ids with ``counts >= min_count`` (and the ids in ``always``)."""
        keep = counts >= max(1, min_count)
        keep[list(always)] = True
        return cls(np.flatnonzero(keep).astype(np.int64), int(counts.shape[0]))


def token_counts(stream: np.ndarray, ranges, vocab_size: int, block: int = 1 << 24) -> np.ndarray:
    """Occurrences of every original id in the given [start, end) ranges of the stream."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for a, b in ranges:
        for i in range(a, b, block):
            counts += np.bincount(stream[i:min(b, i + block)], minlength=vocab_size)
    return counts


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the empirical distribution ``counts / counts.sum()``."""
    c = counts[counts > 0].astype(np.float64)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------
# the prepared data and its batches


@dataclass
class TrainData:
    """Everything the training loop reads: stream, split, sub-vocabulary, canonical map, figures."""

    cache: TokenCache
    split: Split
    subvocab: SubVocab
    canonical: np.ndarray          # (original_vocab_size,) int64 original id -> canonical id
    unigram_entropy: float         # nats, training tokens over the model vocabulary (UNK merged)
    val_unigram_cross_entropy: float  # nats, validation tokens under the training unigram (add-one)
    val_unk_share: float           # share of validation tokens that are UNK for the model

    @property
    def stream(self) -> np.ndarray:
        return self.cache.stream

    def summary(self) -> dict[str, Any]:
        return {"tokens": int(self.stream.shape[0]), "documents": self.cache.documents,
                "train_tokens": self.split.train_tokens, "val_tokens": self.split.val_tokens,
                "model_vocab_size": self.subvocab.size, "unk_id": self.subvocab.unk_id,
                "eos_id": self.cache.eos_id, "unigram_entropy": self.unigram_entropy,
                "val_unigram_cross_entropy": self.val_unigram_cross_entropy,
                "val_unk_share": self.val_unk_share, "cache": str(self.cache.path), "cache_hit": self.cache.hit}


def prepare_data(cache: TokenCache, canonical: np.ndarray, *, val_fraction: float, val_chunk_tokens: int,
                 min_count: int, subvocab: SubVocab | None = None) -> TrainData:
    """Split the stream, build (or take, on resume) the sub-vocabulary, and measure the baselines."""
    V = int(canonical.shape[0])
    split = split_stream(int(cache.stream.shape[0]), val_fraction, val_chunk_tokens)
    if not split.train or not split.val:
        raise InputError(f"the corpus has only {cache.stream.shape[0]} tokens: too few for a training and a "
                         f"validation part (chunks of {val_chunk_tokens})",
                         "use a larger corpus or a smaller --set data.val_chunk_tokens")
    train_counts = token_counts(cache.stream, split.train, V)
    if subvocab is None:
        subvocab = SubVocab.from_counts(train_counts, min_count, always=(cache.eos_id,))
    model_counts = np.bincount(subvocab.lookup, weights=train_counts, minlength=subvocab.size)
    val_counts = token_counts(cache.stream, split.val, V)
    val_model = np.bincount(subvocab.lookup, weights=val_counts, minlength=subvocab.size)
    smoothed = (model_counts + 1.0) / (model_counts.sum() + subvocab.size)  # add-one: no zero for UNK
    val_ce = float(-(val_model * np.log(smoothed)).sum() / max(val_model.sum(), 1))
    return TrainData(cache=cache, split=split, subvocab=subvocab, canonical=np.asarray(canonical, dtype=np.int64),
                     unigram_entropy=unigram_entropy(model_counts), val_unigram_cross_entropy=val_ce,
                     val_unk_share=float(val_model[subvocab.unk_id] / max(val_model.sum(), 1)))


@dataclass
class Batch:
    """One (local) batch: model ids, canonical ids of the inputs, next-token targets; (B, T) int64."""

    idx: np.ndarray
    canonical: np.ndarray
    targets: np.ndarray


class Batches:
    """Training and validation windows of ``block_size + 1`` tokens (see the module docstring)."""

    def __init__(self, data: TrainData, *, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size {batch_size} is not divisible by the {world_size} processes",
                              f"use a multiple of {world_size}")
        self.data, self.T, self.B, self.seed = data, block_size, batch_size, seed
        self.rank, self.world = rank, world_size
        span = block_size + 1
        # valid window starts per training range, laid end to end: u in [0, total) -> a stream offset
        self._starts = np.array([a for a, b in data.split.train if b - a >= span], dtype=np.int64)
        counts = np.array([b - a - span + 1 for a, b in data.split.train if b - a >= span], dtype=np.int64)
        if counts.size == 0:
            raise ConfigError(f"no training range holds a window of block_size + 1 = {span} tokens",
                              "use a smaller model.block_size or a larger data.val_chunk_tokens")
        self._cum = np.cumsum(counts)
        self.train_windows = int(self._cum[-1])

    def _gather(self, starts: np.ndarray) -> Batch:
        win = self.data.stream[starts[:, None] + np.arange(self.T + 1)]  # (B, T+1) original ids
        model = self.data.subvocab.lookup[win]
        return Batch(idx=model[:, :-1], canonical=self.data.canonical[win[:, :-1]], targets=model[:, 1:])

    def train_starts(self, step: int) -> np.ndarray:
        """The global batch's window starts at ``step`` (identical on every rank)."""
        u = np.random.default_rng([self.seed, step]).integers(0, self.train_windows, size=self.B)
        r = np.searchsorted(self._cum, u, side="right")
        prev = np.where(r > 0, self._cum[r - 1], 0)
        return self._starts[r] + (u - prev)

    def train_canonical(self, step: int) -> np.ndarray:
        """The canonical ids of the whole global batch of ``step`` (B, T), identical on every rank:
        what a store run's working set is built from (``engram_cli.train.tablestore``)."""
        win = self.data.stream[self.train_starts(step)[:, None] + np.arange(self.T)]
        return self.data.canonical[win]

    def train_batch(self, step: int) -> Batch:
        """This rank's contiguous slice of the global batch of ``step``."""
        per = self.B // self.world
        return self._gather(self.train_starts(step)[self.rank * per:(self.rank + 1) * per])

    def val_windows(self, n_windows: int) -> np.ndarray:
        """Starts of up to ``n_windows`` non-overlapping validation windows spread over the held-out chunks."""
        span = self.T + 1
        starts = [s for a, b in self.data.split.val for s in range(a, b - span + 1, self.T)]
        if not starts:
            raise ConfigError(f"no validation chunk holds a window of block_size + 1 = {span} tokens",
                              "raise data.val_chunk_tokens above model.block_size")
        starts = np.array(starts, dtype=np.int64)
        if len(starts) > n_windows:
            starts = starts[np.linspace(0, len(starts) - 1, n_windows).round().astype(np.int64)]
        return starts

    def val_batches(self, n_batches: int) -> list[Batch]:
        """This rank's share of the fixed validation batches (``n_batches`` global batches)."""
        starts = self.val_windows(n_batches * self.B)[self.rank::self.world]
        return [self._gather(starts[i:i + self.B]) for i in range(0, len(starts), self.B)]
