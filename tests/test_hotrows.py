"""Hot-row planning: lookups served by the hottest rows, collisions included (engram_cli.tables.hotrows)."""

from __future__ import annotations

import numpy as np

from engram_cli.tables.hashing import hash_ngrams
from engram_cli.tables.hotrows import cache_curve, hot_row_curves, row_heat, rows_for_share
from engram_cli.tables.plan import make_plan


def small_case(seed=0):
    plan = make_plan(canonical_vocab_size=50, canonical_pad_id=0, original_vocab_size=50, layer_ids=(1,),
                     n_head_per_ngram=3, target_sizes=(37, 41), embed_dim_per_head=4)
    rng = np.random.default_rng(seed)
    keys = {n: np.unique(rng.integers(0, 50, (200, n)), axis=0) for n in (2, 3)}
    counts = {n: rng.zipf(1.5, keys[n].shape[0]).astype(np.int64) for n in (2, 3)}
    return plan, keys, counts


def brute_heat(plan, keys, counts, layer):
    """Row heat by hashing each n-gram as its own sequence, one row at a time."""
    heat: dict[tuple[int, int], int] = {}
    for n, ks in keys.items():
        lo = (n - 2) * plan.n_head_per_ngram
        for key, c in zip(ks, counts[n]):
            slots = hash_ngrams(key[None, :], plan, layer)[0, -1]
            for h in range(plan.n_head_per_ngram):
                row = (lo + h, int(slots[lo + h]))
                heat[row] = heat.get(row, 0) + int(c)
    return np.array(sorted(heat.values()))


def test_row_heat_sums_the_ngrams_sharing_a_row():
    plan, keys, counts = small_case()
    got = np.sort(row_heat(keys, counts, plan, 1))
    want = brute_heat(plan, keys, counts, 1)
    np.testing.assert_array_equal(got, want)
    # tiny tables: many n-grams share rows, so there are fewer hot rows than n-gram-head pairs
    pairs = sum(k.shape[0] for k in keys.values()) * plan.n_head_per_ngram
    assert got.size < pairs and got.sum() == sum(int(c.sum()) for c in counts.values()) * plan.n_head_per_ngram


def test_curve_and_cache_sizes():
    heat = np.array([50, 30, 10, 5, 5])
    assert rows_for_share(heat, 0.5) == 1 and rows_for_share(heat, 0.8) == 2 and rows_for_share(heat, 0.9) == 3
    assert rows_for_share(heat, 1.0) == 5
    k, share = cache_curve(np.arange(1, 5001), 8000)
    assert k[0] == 1000 and k[-1] == 8000 and share[-1] == 1.0 and all(np.diff(share) >= 0)


def test_hot_row_curves_per_layer():
    plan, keys, counts = small_case(1)
    (curve,) = hot_row_curves(keys, counts, plan)
    assert curve.rows == plan.total_slots(1) and curve.k[-1] == curve.rows and curve.share[-1] == 1.0
    assert curve.rows_for[0.5] <= curve.rows_for[0.9] <= curve.rows_for[0.99] <= curve.used_rows <= curve.rows
