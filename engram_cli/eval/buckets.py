"""Which bucket every scored token falls in: by the training count of its n-gram, by its script, by
its collision exposure.

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
* **Collision exposure** (:func:`collision_exposure`): to predict the target at p, the Engram
  layer reads one row per head: head j of order n holds the slot of the order-n n-gram ending at
  the input position p-1, as the model hashes its window (:func:`read_ngrams`). The exposure is
  the number of those heads, over all orders 2..N of the plan (0 .. ``total_heads``), whose slot
  also holds a training n-gram of that order MORE frequent than the position's own (whose count
  is 0 when it never occurred in training). Counts are the exact training counts above, hashed
  with :func:`engram_cli.tables.hashing.hash_ngrams` (:func:`ngram_slots`). The first Engram
  layer of the plan is used (each layer has its own primes, so its own collisions).
"""

from __future__ import annotations

import unicodedata

import numpy as np

from engram_cli.core.progress import ProgressFn, report
from engram_cli.core.text import is_cjk
from engram_cli.eval.config import COUNT_EDGES, SCRIPT_BUCKETS
from engram_cli.eval.texts import target_positions
from engram_cli.tables.counting import NgramCounter
from engram_cli.tables.hashing import hash_ngrams
from engram_cli.tables.keys import KeyLayout, group_rows, id_bits
from engram_cli.tables.plan import TablePlan


def training_ngram_counts(stream: np.ndarray, ranges, canonical: np.ndarray, n: int, vocab_size: int,
                          progress: ProgressFn | None = None, restart: tuple[int, int] | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct canonical n-gram of the training ranges of ``stream`` (original ids) and its
    count: (int64 [K, n], int64 [K]). ``canonical`` maps original to canonical ids. ``restart``
    (the plan's document rule: original separator id, canonical pad id): n-grams read the pad id
    before a document's start, as the model hashes them (:func:`context_ngrams`)."""
    return training_ngram_tables(stream, ranges, canonical, (n,), vocab_size, progress, restart)[n]


def training_ngram_tables(stream: np.ndarray, ranges, canonical: np.ndarray, orders, vocab_size: int,
                          progress: ProgressFn | None = None, restart: tuple[int, int] | None = None
                          ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """:func:`training_ngram_counts` of several orders from one pass: ``{n: (grams, counts)}``.
    The counter counts every order up to the largest anyway; under the document rule each
    order's n-grams are added explicitly."""
    progress = report(progress)
    orders = sorted(set(orders))
    total = sum(b - a for a, b in ranges)
    done = 0
    with NgramCounter(max(orders), vocab_size=vocab_size) as counter:
        for a, b in ranges:
            if restart is None:
                counter.add(canonical[np.asarray(stream[a:b])])
            else:
                for n in orders:
                    for s in range(a + n - 1, b, _BLOCK):
                        counter.add_ngrams({n: context_ngrams(stream, np.arange(s, min(b, s + _BLOCK)), canonical,
                                                              n, restart)[0]})
            done += b - a
            progress("count", done, total, tokens=done)
        stats = counter.finish()
    return {n: (stats.ngrams[n], stats.counts[n]) for n in orders}


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
# collision exposure


def read_ngrams(stream: np.ndarray, windows: np.ndarray, canonical: np.ndarray, n: int, pad: int,
                restart: tuple[int, int] | None = None) -> np.ndarray:
    """The order-n n-gram the model hashes to predict each target of ``windows`` (int64 [P, n],
    targets window after window as :func:`engram_cli.eval.texts.target_positions` lays them).

    To predict the target at p the model reads the suffix n-gram of its *input* position p-1:
    canonical ids of p-n .. p-1. The model sees one window at a time, so ids before the window's
    start read the canonical ``pad`` id; under the document rule (``restart``: original separator
    id, canonical pad id) so do the ids before the start of p-1's document, as
    :func:`engram_cli.tables.hashing.hash_ngrams` reads them (``tests/test_eval.py`` holds the
    two equal)."""
    lengths = (windows[:, 1] - windows[:, 0]).astype(np.int64)
    inputs = target_positions(windows) - 1
    starts = np.repeat(windows[:, 0], lengths)
    span = inputs[:, None] + np.arange(1 - n, 1)[None, :]          # (P, n), oldest first
    before = span < starts[:, None]
    ids = np.asarray(stream)[np.maximum(span, 0)]
    grams = canonical[ids].astype(np.int64)
    grams[before] = pad
    if restart is not None and n > 1:
        sep, rpad = restart
        is_sep = (ids[:, :-1] == sep) & ~before[:, :-1]
        crossed = np.flip(np.logical_or.accumulate(np.flip(is_sep, axis=1), axis=1), axis=1)
        grams[:, :-1][crossed] = rpad
    return grams


def ngram_slots(grams: np.ndarray, plan: TablePlan, layer_id: int) -> np.ndarray:
    """The slot of each order-n n-gram (int64 [K, n], n >= 2) in each of the layer's heads of order
    n: int64 [K, n_head_per_ngram]. Each n-gram is hashed as a sequence of its own n ids by
    :func:`engram_cli.tables.hashing.hash_ngrams`, whose order-n heads at the last position read
    exactly those ids."""
    k, n = grams.shape
    h = plan.n_head_per_ngram
    heads = slice((n - 2) * h, (n - 1) * h)
    out = np.empty((k, h), dtype=np.int64)
    for s in range(0, k, _HASH_ROWS):
        out[s:s + _HASH_ROWS] = hash_ngrams(grams[s:s + _HASH_ROWS], plan, layer_id)[:, n - 1, heads]
    return out


_HASH_ROWS = 1 << 16  # n-grams hashed at a time (hash_ngrams returns every order's heads at every position)


def slot_max_counts(slots: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one head: the distinct slots the training n-grams fall in (sorted) and the largest
    training count among the n-grams of each."""
    if slots.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = np.argsort(slots, kind="stable")
    s, c = slots[order], counts[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return s[starts], np.maximum.reduceat(c, starts)


def collision_exposure(read: dict[int, np.ndarray], train: dict[int, tuple[np.ndarray, np.ndarray]],
                       plan: TablePlan, layer_id: int, vocab_size: int) -> np.ndarray:
    """How many of the layer's heads, over all orders 2..N, give each position a row shared with a
    MORE frequent training n-gram (int64 [P], 0 .. ``plan.total_heads``).

    ``read[n]``: the order-n n-grams the positions read (:func:`read_ngrams`); ``train[n]``: every
    distinct training n-gram of order n and its count (:func:`training_ngram_tables`). A head of
    order n counts when the largest training count among the n-grams hashed into the position's
    slot exceeds the training count of the position's own n-gram (0 when unseen). The position's
    own n-gram cannot exceed itself, so this is exactly "another n-gram in the slot is more
    frequent"; a tie is not more frequent.
    """
    positions = next(iter(read.values())).shape[0]
    exposure = np.zeros(positions, dtype=np.int64)
    for n in range(2, plan.max_ngram_size + 1):
        grams, counts = train[n]
        own = lookup_counts(grams, counts, read[n], vocab_size)
        train_slots, query_slots = ngram_slots(grams, plan, layer_id), ngram_slots(read[n], plan, layer_id)
        for h in range(plan.n_head_per_ngram):
            slots, most = slot_max_counts(train_slots[:, h], counts)
            if slots.size == 0:  # no training n-gram of this order: nothing can be more frequent
                continue
            q = query_slots[:, h]
            i = np.minimum(np.searchsorted(slots, q), slots.size - 1)
            exposure += np.where(slots[i] == q, most[i], 0) > own
    return exposure


def exposure_buckets(plan: TablePlan) -> tuple[str, ...]:
    """Bucket names of the collision exposure: ``"0"`` .. ``str(plan.total_heads)``."""
    return tuple(str(k) for k in range(plan.total_heads + 1))


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
