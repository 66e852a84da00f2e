"""The text a run is scored on, cut into windows, and the run's training split.

* **Training split.** A run's token stream is the one its trainer cached (``engram_cli.train.data``):
  found by the cache key the trainer used (the corpus fingerprint the run's manifest records, the
  tokenizer and vocab-map fingerprints, ``data.max_tokens`` and the separator), so neither the
  corpus files nor a tokenizer pass are needed. Without the cache entry the corpus is tokenized
  again, but only when its files still have the recorded fingerprint. The stream is split exactly
  as training split it (``split_stream`` with the run's ``data.val_fraction`` and
  ``data.val_chunk_tokens``).
* **Scored text** (:class:`ScoredText`): a stream of original ids and the ranges of it that are
  scored. Held-out: the run's stream and its validation ranges. A corpus: its documents, each
  after the run's separator as in training (``[sep] doc1 [sep] doc2 ... [sep]``), one range.
  In a range [a, b) the targets are positions a+1 .. b-1 (the first token has no context there).
* **Windows** of the model's ``block_size``: each range is tiled by windows whose inputs are
  ``stream[s:e]`` and targets ``stream[s+1:e+1]``, so every target is scored exactly once, with
  the context since its window's start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engram_cli.core.errors import ArtifactError, EngramError, InputError
from engram_cli.core.progress import ProgressFn
from engram_cli.corpus.cache import cache_key, default_cache_dir, find_token_cache, load_or_build_token_cache
from engram_cli.corpus.spec import CorpusStats
from engram_cli.corpus.stream import corpus_fingerprint, iter_tokenized
from engram_cli.train.data import split_stream
from engram_cli.train.runs import LoadedRun
from engram_cli.train.settings import DataSettings


@dataclass
class ScoredText:
    """What is scored: ``stream`` (original ids) and its scored ranges [a, b)."""

    kind: str                                  # "held-out" or "corpus"
    stream: np.ndarray                         # (N,) original ids
    ranges: tuple[tuple[int, int], ...]        # scored ranges; targets a+1 .. b-1 of each


@dataclass
class TrainingSplit:
    """A run's cached token stream and the split training made of it."""

    stream: np.ndarray                         # (N,) int32 original ids, memory-mapped
    train: tuple[tuple[int, int], ...]         # training ranges [a, b)
    val: tuple[tuple[int, int], ...]           # held-out ranges [a, b)
    cache: str                                 # the cache entry directory

    @property
    def train_tokens(self) -> int:
        return sum(b - a for a, b in self.train)


# ---------------------------------------------------------------------------------------------
# the training split of a run


def training_split(run: LoadedRun, cache_dir=None, progress: ProgressFn | None = None) -> TrainingSplit:
    """The run's token stream (from its trainer's cache; see the module docstring) and its split."""

    recorded = run.manifest.get("inputs", {}).get("corpus", {})
    data = run.config.get("data", {})
    key = cache_key(recorded, run.tokenizer.fingerprint, run.vocab.fingerprint, data.get("max_tokens"),
                    run.separator_id)
    dirs = [cache_dir] if cache_dir is not None else [run.config.get("run", {}).get("cache_dir"),
                                                      default_cache_dir(run.run_dir)]
    cache = next((c for c in (find_token_cache(d, key) for d in dirs if d) if c is not None), None)
    if cache is None:
        cache = _tokenize_again(run, recorded, key, dirs[-1], progress)
    expected = run.manifest.get("summary", {}).get("data", {}).get("tokens")
    if expected is not None and int(expected) != int(cache.stream.shape[0]):
        raise ArtifactError(f"the token stream of run {run.name} holds {cache.stream.shape[0]:,} tokens, its "
                            f"manifest {int(expected):,}", "pass the run's own --cache-dir, or retrain it")
    split = split_stream(int(cache.stream.shape[0]), float(data.get("val_fraction", 0.05)),
                         int(data.get("val_chunk_tokens", 1024)))
    return TrainingSplit(stream=cache.stream, train=split.train, val=split.val, cache=str(cache.path))


def _tokenize_again(run: LoadedRun, recorded: dict, key: str, cache_dir, progress):
    """No cache entry: tokenize the run's corpus again, if its files are still the recorded ones."""

    sources = run.config.get("run", {}).get("corpus", [])
    fix = "pass the run's token cache (--cache-dir), or run from the directory the run was trained in"
    try:
        spec = DataSettings(**run.config.get("data", {})).corpus_spec(sources)  # as the trainer read it
        current = corpus_fingerprint(spec)
    except (EngramError, TypeError) as e:  # TypeError: a [data] section this version does not know
        raise ArtifactError(f"the token cache of run {run.name} is gone and its corpus cannot be read "
                            f"({getattr(e, 'message', e)})", fix) from None
    if current["corpus_sha256"] != recorded.get("corpus_sha256"):
        raise ArtifactError(f"the token cache of run {run.name} is gone and its corpus files changed since "
                            "training, so its training split cannot be rebuilt exactly", fix)
    return load_or_build_token_cache(spec, run.tokenizer, run.vocab, cache_dir, eos_id=run.separator_id,
                                     corpus_fp=current, progress=progress)


def heldout_text(run: LoadedRun, split: TrainingSplit) -> ScoredText:
    """The run's held-out split: its validation ranges of the cached stream."""
    ranges = tuple((a, b) for a, b in split.val if b - a >= 2)
    if not ranges:
        raise InputError(f"run {run.name} has no held-out text (its stream holds {split.stream.shape[0]:,} tokens)",
                         "score a corpus instead: engram eval RUN CORPUS...")
    return ScoredText(kind="held-out", stream=split.stream, ranges=ranges)


def corpus_text(docs: Sequence[np.ndarray], separator: int | None) -> ScoredText:
    """Documents (original ids) as training read them: each after the separator, one range."""
    sep = np.array([] if separator is None else [separator], dtype=np.int64)
    parts = [sep]
    for d in docs:
        parts += [np.asarray(d, dtype=np.int64), sep]
    stream = np.concatenate(parts)
    return ScoredText(kind="corpus", stream=stream, ranges=((0, int(stream.shape[0])),))


def read_corpus(spec, tokenizer, progress: ProgressFn | None = None) -> tuple[list[np.ndarray], dict]:
    """The documents of a corpus as original ids (the tokenizer's, no special tokens) and the
    reading figures (``CorpusStats``); an empty corpus is an InputError of the reader."""

    stats = CorpusStats()
    docs = [d for batch in iter_tokenized(spec, tokenizer.tokenizer, stats=stats, progress=progress)
            for d in batch if len(d)]
    return docs, stats.to_dict()


# ---------------------------------------------------------------------------------------------
# windows and what they score


def plan_windows(ranges: Sequence[tuple[int, int]], block: int, max_windows: int | None = None) -> np.ndarray:
    """Windows ``(s, e)`` tiling every range: inputs ``[s, e)``, targets ``[s+1, e+1)``, e - s <= block.

    With ``max_windows``, that many windows evenly spread over all of them (first and last kept).
    Returns an int64 array (W, 2).
    """
    wins = [(s, min(s + block, b - 1)) for a, b in ranges for s in range(a, b - 1, block)]
    out = np.array(wins, dtype=np.int64).reshape(-1, 2)
    if max_windows is not None and out.shape[0] > max_windows:
        out = out[np.unique(np.linspace(0, out.shape[0] - 1, max_windows).round().astype(np.int64))]
    return out


def target_positions(windows: np.ndarray) -> np.ndarray:
    """Stream positions of every scored target, window after window: (P,) int64."""
    if windows.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(s + 1, e + 1, dtype=np.int64) for s, e in windows])


def utf8_bytes(tokenizer, stream: np.ndarray, positions: np.ndarray) -> int:
    """UTF-8 bytes of the decoded text of the tokens at ``positions`` (special tokens such as the
    separator decode to nothing). Consecutive positions are decoded together, so a character
    split over several tokens counts its bytes once."""
    if positions.size == 0:
        return 0
    cuts = np.flatnonzero(np.diff(positions) != 1) + 1
    spans = [stream[p].tolist() for p in np.split(positions, cuts)]
    texts = tokenizer.tokenizer.decode_batch(spans, skip_special_tokens=True)
    return sum(len(t.encode("utf-8")) for t in texts)
