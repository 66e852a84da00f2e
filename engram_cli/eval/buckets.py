"""Which bucket every scored token falls in: by the training count of its n-gram, by its script.

* **Training count.** For a target at position p the n-gram is the canonical ids of positions
  p-n+1 .. p: its n-1 preceding tokens and the target itself. Canonical ids, because that is
  what the Engram tables key on (the memory of the (n-1)-gram before the target is the row that
  training could have taught this continuation). Its count is taken exactly over the run's
  *training* ranges of the cached stream with :class:`engram_cli.tables.counting.NgramCounter`, each
  training range one document (an n-gram never joins two ranges; inside a range it crosses
  document separators under the plan's pad-start rule and restarts after them under the document
  rule, as the model's hashing does, ``engram_cli.tables.boundary``). Counts are looked up
  through the same key packing (``KeyLayout``, ``group_rows``). A target with fewer than n-1
  tokens before it in the stream is ``unseen``.
* **Script** of the target token's decoded text (:func:`script_of`).
"""

from __future__ import annotations

import unicodedata

import numpy as np

from engram_cli.core.progress import ProgressFn, report
from engram_cli.core.text import is_cjk
from engram_cli.eval.config import COUNT_EDGES, SCRIPT_BUCKETS
from engram_cli.tables.counting import NgramCounter
from engram_cli.tables.keys import KeyLayout, group_rows, id_bits


def training_ngram_counts(stream: np.ndarray, ranges, canonical: np.ndarray, n: int, vocab_size: int,
                          progress: ProgressFn | None = None, restart: tuple[int, int] | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct canonical n-gram of the training ranges of ``stream`` (original ids) and its
    count: (int64 [K, n], int64 [K]). ``canonical`` maps original to canonical ids. ``restart``
    (the plan's document rule: original separator id, canonical pad id): n-grams read the pad id
    before a document's start, as the model hashes them (:func:`context_ngrams`)."""
    progress = report(progress)
    total = sum(b - a for a, b in ranges)
    done = 0
    with NgramCounter(n, vocab_size=vocab_size) as counter:
        for a, b in ranges:
            if restart is None:
                counter.add(canonical[np.asarray(stream[a:b])])
            else:
                for s in range(a + n - 1, b, _BLOCK):
                    counter.add_ngrams({n: context_ngrams(stream, np.arange(s, min(b, s + _BLOCK)), canonical, n,
                                                          restart)[0]})
            done += b - a
            progress("count", done, total, tokens=done)
        stats = counter.finish()
    return stats.ngrams[n], stats.counts[n]


_BLOCK = 1 << 20  # positions per block of training n-grams under the document rule


def context_ngrams(stream: np.ndarray, positions: np.ndarray, canonical: np.ndarray, n: int,
                   restart: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The canonical n-gram ending at each position (int64 [P, n]; rows of positions without n-1
    tokens before them are zero) and which positions have one (bool [P]). With ``restart``
    (original separator id, canonical pad id: the document rule) the ids before the start of the
    position's document read the pad id, as :func:`engram_cli.tables.hashing.hash_ngrams` reads them."""
    valid = positions >= n - 1
    span = np.where(valid, positions, n - 1)[:, None] + np.arange(1 - n, 1)[None, :]  # (P, n), oldest first
    ids = np.asarray(stream)[span]
    grams = canonical[ids]
    if restart is not None and n > 1:
        sep, pad = restart
        # column j is in another document when a separator lies at columns j .. n-2
        crossed = np.flip(np.logical_or.accumulate(np.flip(ids[:, :-1] == sep, axis=1), axis=1), axis=1)
        grams[:, :-1][crossed] = pad
    grams[~valid] = 0
    return grams, valid


def lookup_counts(train_ngrams: np.ndarray, train_counts: np.ndarray, queries: np.ndarray,
                  vocab_size: int) -> np.ndarray:
    """The training count of each query n-gram (int64 [Q]; 0 when never seen).

    Training and query rows are packed (``KeyLayout``) and grouped together (``group_rows``, a
    stable sort): the training rows come first and are distinct, so a group's first row is its
    training row when it has one.
    """
    n = queries.shape[1]
    layout = KeyLayout(n, id_bits(vocab_size))
    k = train_ngrams.shape[0]
    keys = np.concatenate([layout.pack(train_ngrams), layout.pack(queries)])
    if keys.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    order, starts = group_rows(keys)
    first = order[starts]  # a group's first row: its training row, when it has one
    group_count = np.zeros(starts.size, dtype=np.int64)
    group_count[first < k] = train_counts[first[first < k]]
    group_of = np.empty(keys.shape[0], dtype=np.int64)
    group_of[order] = np.repeat(np.arange(starts.size), np.diff(np.append(starts, keys.shape[0])))
    return group_count[group_of[k:]].astype(np.int64)


def count_buckets(counts: np.ndarray) -> np.ndarray:
    """Training count -> bucket index of ``COUNT_BUCKETS``: 0 unseen, 1, 2-9, 10-99, >= 100."""
    return np.searchsorted(np.asarray(COUNT_EDGES), counts, side="right").astype(np.int64)


# ---------------------------------------------------------------------------------------------
# scripts


def script_of(text: str) -> int:
    """Index in ``SCRIPT_BUCKETS`` of a token's text, spaces ignored: CJK when it holds a CJK
    character, else Latin when it holds a Latin letter, else digits & punctuation when every
    character is a number, punctuation or symbol; other (empty, separators, byte fragments,
    other scripts) otherwise."""
    chars = [ch for ch in text if not ch.isspace()]
    if any(is_cjk(ch) for ch in chars):
        return SCRIPT_BUCKETS.index("CJK")
    if any(unicodedata.category(ch).startswith("L") and unicodedata.name(ch, "").startswith("LATIN")
           for ch in chars):
        return SCRIPT_BUCKETS.index("Latin")
    if chars and all(unicodedata.category(ch)[0] in "NPS" and ch != "\ufffd" for ch in chars):
        return SCRIPT_BUCKETS.index("digits & punctuation")
    return SCRIPT_BUCKETS.index("other")


def token_scripts(tokenizer, ids: np.ndarray) -> np.ndarray:
    """Script bucket of each original id in ``ids`` (any shape), each distinct id decoded alone."""
    uniq, inverse = np.unique(np.asarray(ids), return_inverse=True)
    texts = tokenizer.tokenizer.decode_batch([[int(i)] for i in uniq], skip_special_tokens=True)
    return np.array([script_of(t) for t in texts], dtype=np.int64)[inverse].reshape(np.shape(ids))
