"""Which n-grams of the corpus hash into which table rows: the counts of the tables artifact
(``engram_cli.tables.stats.NgramStats``) laid over a run's plan.

Each distinct n-gram of order n is hashed once per layer exactly as build-tables' collision
measurement hashes it (:func:`engram_cli.tables.collisions.key_mix` and
:func:`~engram_cli.tables.collisions.mix_slots`, equal to ``hash_ngrams`` by its tests), and each
row gets its **load** (distinct n-grams in it) and its **summed count** (their occurrences in the
corpus). Nothing is counted again: the counts are the artifact's. One int64 mix per n-gram and one
load and count per row are kept; a head's slots are derived from the mixes when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engram_cli.tables.collisions import key_mix, mix_slots
from engram_cli.tables.plan import TablePlan
from engram_cli.tables.stats import NgramStats
from engram_cli.vocab.normalize import VocabMap


@dataclass
class HeadInfo:
    """One head of one layer's table: its order, its index within the order and its rows."""

    layer: int
    head: int           # index in hash_ngrams' last dim (order 2's heads first)
    n: int              # N-gram order
    order_head: int     # index within the order (0..n_head_per_ngram-1)
    offset: int         # first row of the head in the layer's concatenated table
    size: int           # rows (the head's prime)


def layer_heads(plan: TablePlan, layer_id: int) -> list[HeadInfo]:
    """The heads of one layer, in table order."""
    sizes, offsets = plan.head_sizes(layer_id), plan.head_offsets(layer_id)
    H = plan.n_head_per_ngram
    return [HeadInfo(layer=layer_id, head=h, n=2 + h // H, order_head=h % H, offset=int(o), size=int(s))
            for h, (s, o) in enumerate(zip(sizes, offsets))]


@dataclass
class LayerNgrams:
    """The corpus's n-grams over one layer's rows (made by :func:`layer_ngrams`)."""

    layer: int
    heads: list[HeadInfo]
    load: np.ndarray            # (rows,) int64: distinct n-grams hashed into each row
    count: np.ndarray           # (rows,) int64: their summed corpus count
    ngrams: dict[int, np.ndarray] = field(repr=False)   # n -> (K, n) canonical ids (count descending)
    counts: dict[int, np.ndarray] = field(repr=False)   # n -> (K,) counts
    mixes: dict[int, np.ndarray] = field(repr=False)    # n -> (K,) int64 mix (the hash before the modulo)

    @property
    def rows(self) -> int:
        return int(self.load.shape[0])

    def head_slots(self, head: int) -> np.ndarray:
        """(K,) slot of every order-n n-gram in head ``head`` (n = the head's order)."""
        h = self.heads[head]
        return mix_slots(self.mixes[h.n], h.size)

    def ngrams_at(self, head: int, slots: list[int], limit: int) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
        """For each slot of head ``head``: (ids (k, n), counts (k,), total n-grams there), the ``limit``
        most frequent n-grams first."""
        n = self.heads[head].n
        hs = self.head_slots(head)
        out = {}
        for s in slots:
            idx = np.flatnonzero(hs == s)   # the keys are sorted by count: most frequent first
            out[int(s)] = (self.ngrams[n][idx[:limit]], self.counts[n][idx[:limit]], int(idx.shape[0]))
        return out


def layer_ngrams(stats: NgramStats, plan: TablePlan, layer_id: int) -> LayerNgrams:
    """Load and summed count of every row of one layer, from the artifact's counts."""
    heads = layer_heads(plan, layer_id)
    rows = sum(h.size for h in heads)
    load = np.zeros(rows, dtype=np.int64)
    count = np.zeros(rows, dtype=np.int64)
    mixes = {}
    for n in range(2, plan.max_ngram_size + 1):
        mixes[n] = key_mix(stats.ngrams[n], plan.multipliers[layer_id])           # (K,)
    weights = {n: stats.counts[n].astype(np.float64) for n in mixes}             # exact below 2^53
    for h in heads:
        slots = mix_slots(mixes[h.n], h.size)                                      # (K,)
        load[h.offset:h.offset + h.size] = np.bincount(slots, minlength=h.size)
        count[h.offset:h.offset + h.size] = np.bincount(slots, weights=weights[h.n], minlength=h.size).astype(np.int64)
    return LayerNgrams(layer=layer_id, heads=heads, load=load, count=count,
                       ngrams={n: stats.ngrams[n] for n in mixes}, counts={n: stats.counts[n] for n in mixes},
                       mixes=mixes)


def ngram_text(ids: np.ndarray, vocab: VocabMap) -> str:
    """An n-gram of canonical ids as text: its canonical keys (what the tables key on, as build-tables
    lists them) joined by spaces ("united states")."""
    keys = vocab.keys()
    return " ".join(keys[int(c)] for c in ids)


def ngram_records(ids: np.ndarray, counts: np.ndarray, vocab: VocabMap) -> list[dict]:
    """[{"ngram": text, "keys": [...], "ids": [...], "count": c}] for n-grams (k, n) and counts (k,)."""
    keys = vocab.keys()
    return [{"ngram": " ".join(keys[int(c)] for c in row), "keys": [keys[int(c)] for c in row],
             "ids": [int(c) for c in row], "count": int(cnt)} for row, cnt in zip(ids, counts)]
