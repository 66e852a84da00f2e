"""Training data for ``engram train``: the cached token stream, the split, the sub-vocabulary, batches.

1. **Token stream, cached.** The corpus is tokenized once (``engram_cli.corpus.iter_tokenized``)
   into one int32 stream of ORIGINAL tokenizer ids, every document followed by the EOS token.
   The stream is saved as ``stream.npy`` in ``<cache_dir>/tokens-<key>/`` and memory-mapped on
   later runs. ``key`` is a sha256 of the corpus content fingerprint
   (``corpus.corpus_fingerprint``: file contents and reading options), the tokenizer and vocab-map
   fingerprints, ``max_tokens`` and the EOS id, so a second run over the same inputs skips the
   tokenizer and any change to them makes a new entry.
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
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram_cli.artifacts import atomic_write_json, sha256_file, verify_hashes_default
from engram_cli.errors import ArtifactError, ConfigError, InputError
from engram_cli.progress import ProgressFn, report

CACHE_FORMAT = "engram.token_cache"
CACHE_VERSION = 2
STREAM_FILE = "stream.npy"
CACHE_META = "meta.json"

#: EOS token names tried, in order, when ``eos_token = "auto"``
EOS_CANDIDATES = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>",
                  "<|im_end|>", "[SEP]")


# ---------------------------------------------------------------------------------------------
# EOS separator


def find_eos_id(tokenizer, eos_token: str = "auto") -> int:
    """The id of the document separator: ``eos_token`` itself, or the first known EOS name."""
    names = EOS_CANDIDATES if eos_token == "auto" else (eos_token,)
    for name in names:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i)
    if eos_token == "auto":
        raise ConfigError("the tokenizer has none of the usual end-of-sequence tokens "
                          f"({', '.join(EOS_CANDIDATES[:4])}, …)",
                          "name its separator token: build-tables --eos-token '<|end|>', "
                          "train --set data.eos_token='<|end|>'")
    raise ConfigError(f"end-of-document token {eos_token!r} (build-tables --eos-token, train data.eos_token) "
                      "is not a token of this tokenizer", "pass a token of its vocabulary, or `auto`")


# ---------------------------------------------------------------------------------------------
# the token cache


@dataclass
class TokenCache:
    """The corpus as one memory-mapped stream of original ids (EOS after every document)."""

    path: Path             # the cache entry directory
    key: str               # sha256 of what the stream depends on (see module docstring)
    stream: np.ndarray     # (N,) int32, memory-mapped
    documents: int
    eos_id: int
    hit: bool              # True: read from the cache; False: tokenized by this call
    stats: dict[str, Any]  # corpus reading figures (documents, bytes, skipped files ...)


def cache_key(corpus_fp: dict[str, Any], tokenizer_fp: str, vocab_fp: str, max_tokens: int | None,
              eos_id: int) -> str:
    """sha256 over everything the cached stream depends on."""
    key = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "corpus_sha256": corpus_fp["corpus_sha256"],
           "hub": corpus_fp.get("hub", []), "shard": corpus_fp.get("shard"), "tokenizer": tokenizer_fp,
           "vocab": vocab_fp, "max_tokens": max_tokens, "eos_id": eos_id}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_cache_dir(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/../.engram-cache``: shared by the runs of one output folder."""
    return Path(run_dir).resolve().parent / ".engram-cache"


def load_or_build_token_cache(spec, tokenizer, vocab, cache_dir: str | os.PathLike, *, eos_id: int,
                              corpus_fp: dict[str, Any] | None = None,
                              progress: ProgressFn | None = None) -> TokenCache:
    """Return the cached stream for (corpus, tokenizer, vocab, max_tokens, EOS), tokenizing on a miss.

    ``spec`` is a :class:`engram_cli.corpus.CorpusSpec`, ``tokenizer`` a ``LoadedTokenizer``,
    ``vocab`` the ``VocabMap`` (only its fingerprint enters the key). A new entry is written to a
    temp directory and renamed into place, so a crash never leaves a half-written entry and two
    runs building the same entry at once both end with a complete one.
    """
    from engram_cli.corpus import corpus_fingerprint

    progress = report(progress)
    corpus_fp = corpus_fp if corpus_fp is not None else corpus_fingerprint(spec)
    key = cache_key(corpus_fp, tokenizer.fingerprint, vocab.fingerprint, spec.max_tokens, eos_id)
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise InputError(f"token cache path {cache_dir} is a file, not a directory",
                         "pass a directory as --cache-dir (it is created if missing)")
    entry = cache_dir / f"tokens-{key[:20]}"
    cached = _open_entry(entry, key)
    if cached is not None:
        return cached
    return _build_entry(spec, tokenizer, entry, key, eos_id, progress)


def find_token_cache(cache_dir: str | os.PathLike, key: str) -> TokenCache | None:
    """The intact cache entry for ``key`` (see :func:`cache_key`) under ``cache_dir``, or None;
    never tokenizes. Readers of a finished run (``engram eval``) find its exact training stream
    this way without needing the corpus files."""
    cache_dir = Path(cache_dir)
    return _open_entry(cache_dir / f"tokens-{key[:20]}", key) if cache_dir.is_dir() else None


def _open_entry(entry: Path, key: str) -> TokenCache | None:
    meta_path = entry / CACHE_META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        stream = np.load(entry / STREAM_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None  # a damaged entry is rebuilt, not trusted
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION \
            or meta.get("key") != key or stream.dtype != np.int32 or stream.ndim != 1 \
            or stream.shape[0] != meta.get("tokens"):
        return None
    if verify_hashes_default() and sha256_file(entry / STREAM_FILE) != meta.get("stream_sha256"):
        return None  # edited in place: rebuilt
    return TokenCache(path=entry, key=key, stream=stream, documents=int(meta["documents"]),
                      eos_id=int(meta["eos_id"]), hit=True, stats=meta.get("corpus_stats", {}))


def _build_entry(spec, tokenizer, entry: Path, key: str, eos_id: int, progress: ProgressFn) -> TokenCache:
    from engram_cli.corpus import CorpusStats, iter_tokenized

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        stats = CorpusStats()
        # Two passes over a growing list of arrays would hold the corpus twice; instead append to
        # a raw file and wrap it in a .npy header at the end.
        raw = tmp / "stream.raw"
        n_tokens = n_docs = 0
        eos = np.array([eos_id], dtype=np.int32)
        with open(raw, "wb") as f:
            for docs in iter_tokenized(spec, tokenizer.tokenizer, stats=stats, progress=progress):
                for ids in docs:
                    if len(ids) == 0:
                        continue
                    f.write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
                    f.write(eos.tobytes())
                    n_tokens += len(ids) + 1
                    n_docs += 1
        _raw_to_npy(raw, tmp / STREAM_FILE, n_tokens)
        raw.unlink()
        meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "tokens": n_tokens,
                "stream_sha256": sha256_file(tmp / STREAM_FILE),
                "documents": n_docs, "eos_id": eos_id, "tokenizer": tokenizer.fingerprint,
                "corpus_stats": stats.to_dict()}
        atomic_write_json(tmp / CACHE_META, meta)
        try:
            os.rename(tmp, entry)
        except OSError:
            # another process finished the same entry first (or a damaged one is in the way)
            if _open_entry(entry, key) is None:
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    cached = _open_entry(entry, key)
    if cached is None:  # pragma: no cover - only if the file system lost what we just wrote
        raise ArtifactError(f"token cache entry {entry} could not be read back", "check the --cache-dir disk")
    cached.hit = False
    return cached


def _raw_to_npy(raw: Path, out: Path, n: int) -> None:
    """Write ``raw`` (n little-endian int32) as a .npy file without loading it whole."""
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.int32, shape=(n,))
    src = np.memmap(raw, dtype=np.int32, mode="r", shape=(n,)) if n else np.zeros(0, np.int32)
    step = 1 << 24
    for i in range(0, n, step):
        arr[i:i + step] = src[i:i + step]
    arr.flush()
    del arr, src


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
