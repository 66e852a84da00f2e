"""Tests for engram_cli.tables.collisions: every figure against brute force, predictions, plots."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from engram_cli.core.errors import InputError
from engram_cli.tables import collisions
from engram_cli.tables.collision_plots import plot_slot_load_histogram, plot_sweep
from engram_cli.tables.collisions import (
    ROW_COLUMNS,
    hash_keys,
    hash_keys_reference,
    measure_collisions,
    measure_collisions_reference,
    measure_tables,
    shared_in_all_heads,
    slot_load_hist,
    sweep_collisions,
)
from engram_cli.tables.hashing import hash_ngrams
from engram_cli.tables.plan import TablePlan, make_plan
from engram_cli.tables.sizing import (
    expected_colliding_share,
    expected_indistinguishable_share,
    expected_max_load,
    expected_occupied,
)


def wrap64(x: int) -> int:
    return ((x + 2**63) % 2**64) - 2**63


def brute_slots(key: tuple[int, ...], plan: TablePlan, layer: int) -> list[int]:
    """Slots of one n-gram (text order: last id newest) in its order's heads, in plain Python."""
    n = len(key)
    mults = plan.multipliers[layer]
    mix = 0
    for k in range(n):
        mix ^= wrap64(key[n - 1 - k] * mults[k])  # m_0 multiplies the newest token
    return [mix % p for p in plan.primes[layer][n - 2]]


def random_keys(rng: np.random.Generator, n: int, k: int, vocab: int) -> np.ndarray:
    keys = np.unique(rng.integers(0, vocab, (k, n)), axis=0)   # distinct rows
    return keys[rng.permutation(keys.shape[0])]


def small_setup(seed: int = 0, vocab: int = 40, targets=(23, 29), heads: int = 3):
    plan = make_plan(canonical_vocab_size=vocab, canonical_pad_id=1, original_vocab_size=vocab,
                     layer_ids=(0, 5), n_head_per_ngram=heads, target_sizes=targets, seed=seed)
    rng = np.random.default_rng(seed)
    ngrams = {2: random_keys(rng, 2, 90, vocab), 3: random_keys(rng, 3, 150, vocab)}
    counts = {n: rng.integers(1, 50, k.shape[0]) for n, k in ngrams.items()}
    return plan, ngrams, counts


@pytest.mark.parametrize("seed, targets, heads", [(0, (23, 29), 3), (1, (7, 11), 2), (2, (97, 61), 4),
                                                  (3, (3, 2), 1)])
def test_every_figure_against_brute_force(seed, targets, heads):
    plan, ngrams, counts = small_setup(seed, targets=targets, heads=heads)
    rep = measure_collisions(ngrams, counts, plan)
    assert [(o.layer, o.n) for o in rep.orders] == [(0, 2), (0, 3), (5, 2), (5, 3)]
    for o in rep.orders:
        keys = [tuple(int(x) for x in row) for row in ngrams[o.n]]
        cnt = [int(c) for c in counts[o.n]]
        slots = [brute_slots(key, plan, o.layer) for key in keys]
        total = sum(cnt)
        assert o.keys == len(keys) and o.total_count == total
        for j, h in enumerate(o.heads):
            by_slot = defaultdict(list)
            for i, s in enumerate(slots):
                by_slot[s[j]].append(i)
            colliding = [i for members in by_slot.values() if len(members) > 1 for i in members]
            assert h.head == j and h.head_index == (o.n - 2) * heads + j
            assert h.slots == plan.primes[o.layer][o.n - 2][j]
            assert h.occupied == len(by_slot)
            assert h.colliding == len(colliding)
            assert h.colliding_weighted == sum(cnt[i] for i in colliding)
            assert h.colliding_share == pytest.approx(len(colliding) / len(keys))
            assert h.colliding_share_weighted == pytest.approx(sum(cnt[i] for i in colliding) / total)
            assert h.max_load == max(len(v) for v in by_slot.values())
            assert h.occupied_share == pytest.approx(len(by_slot) / h.slots)
        tuples = Counter(tuple(s) for s in slots)
        tied = [i for i, s in enumerate(slots) if tuples[tuple(s)] > 1]
        assert o.indistinguishable == len(tied)
        assert o.indistinguishable_weighted == sum(cnt[i] for i in tied)
        assert o.indistinguishable_share == pytest.approx(len(tied) / len(keys))


def test_hash_keys_is_the_slot_at_the_end_of_the_ngram_in_a_sequence():
    plan, ngrams, _ = small_setup(4)
    for n, keys in ngrams.items():
        got = hash_keys(keys[:20], plan, 5, n)                      # (H, 20)
        for i, key in enumerate(keys[:20]):
            seq = np.concatenate([[7, 3, 9, 1], key])               # the n-gram ends the sequence
            full = hash_ngrams(seq, plan, 5)                        # (T, total_heads)
            lo = (n - 2) * plan.n_head_per_ngram
            assert full[-1, lo:lo + plan.n_head_per_ngram].tolist() == got[:, i].tolist()
            assert got[:, i].tolist() == brute_slots(tuple(int(x) for x in key), plan, 5)


def test_hash_keys_reference_in_several_blocks(monkeypatch):
    plan, ngrams, _ = small_setup(5)
    whole = hash_keys(ngrams[3], plan, 0, 3)
    monkeypatch.setattr(collisions, "_HASH_ROWS", 7)
    assert np.array_equal(hash_keys_reference(ngrams[3], plan, 0, 3), whole)


@pytest.mark.parametrize("vocab, id_high", [(40, 40), (98_304, 98_304), (50, 2**40)])
def test_hash_keys_equals_the_reference(vocab, id_high):
    # id_high beyond the vocabulary: products wrap around and mixes go negative (the signed path)
    plan = make_plan(canonical_vocab_size=vocab, canonical_pad_id=1, original_vocab_size=vocab,
                     layer_ids=(0, 5), n_head_per_ngram=3, target_sizes=(23, 1009, 97), max_ngram_size=4)
    rng = np.random.default_rng(vocab)
    for n in (2, 3, 4):
        keys = rng.integers(0, id_high, (500, n))
        for layer in (0, 5):
            want = hash_keys_reference(keys, plan, layer, n)
            assert np.array_equal(hash_keys(keys, plan, layer, n), want)
            if id_high <= vocab:                                     # other integer types of the same ids
                for dtype in (np.int32, np.uint64):
                    assert np.array_equal(hash_keys(keys.astype(dtype), plan, layer, n), want)
    if id_high > vocab:
        assert (collisions.key_mix(rng.integers(0, id_high, (100, 3)), plan.multipliers[0]) < 0).any()


@pytest.mark.parametrize("targets, threads", [((23, 29), 1), ((23, 29), 3), ((2**33, 2**34), 2)])
def test_measure_collisions_equals_the_reference(targets, threads, monkeypatch):
    # 2**33 slots for 150 keys: the sorted (sparse) path instead of a count per slot
    monkeypatch.setattr(collisions, "_THREAD_KEYS", 0)             # threads even for a few keys
    plan, ngrams, counts = small_setup(3, targets=targets)
    fast = measure_collisions(ngrams, counts, plan, num_threads=threads)
    assert fast == measure_collisions_reference(ngrams, counts, plan)


def test_keys_tied_in_every_head_are_the_keys_of_equal_mixes():
    # 8 heads of ~1000 slots: the primes' product exceeds 2^64, so only equal mixes tie (CRT)
    import dataclasses

    plan = make_plan(canonical_vocab_size=300, canonical_pad_id=0, original_vocab_size=300, layer_ids=(0,),
                     n_head_per_ngram=8, target_sizes=(1000, 1000))
    assert math.prod(plan.primes[0][0]) >= 2**64
    m = plan.multipliers[0]
    plan = dataclasses.replace(plan, multipliers={0: (m[0], 0, m[2])})  # the older token ignored: ties
    rng = np.random.default_rng(11)
    ngrams = {2: random_keys(rng, 2, 500, 300), 3: random_keys(rng, 3, 500, 300)}
    counts = {n: rng.integers(1, 9, k.shape[0]) for n, k in ngrams.items()}
    fast = measure_collisions(ngrams, counts, plan)
    assert fast == measure_collisions_reference(ngrams, counts, plan)
    assert all(o.indistinguishable > 0 for o in fast.orders)


@pytest.mark.parametrize("targets", [(23, 29), (2**33, 2**34)])
def test_measure_tables_gives_heat_and_histogram_of_the_references(targets, monkeypatch):
    from engram_cli.tables.hotrows import row_heat

    monkeypatch.setattr(collisions, "_THREAD_KEYS", 0)

    plan, ngrams, counts = small_setup(4, targets=targets)
    got = measure_tables(ngrams, counts, plan, num_threads=2)
    assert got.collisions == measure_collisions_reference(ngrams, counts, plan)
    for layer in plan.layer_ids:
        assert np.array_equal(np.sort(got.row_heat[layer]), np.sort(row_heat(ngrams, counts, plan, layer)))
    assert sorted(got.slot_load_hist) == [2, 3]
    for n, hist in got.slot_load_hist.items():
        want = slot_load_hist(ngrams[n], plan, plan.layer_ids[0], n)
        assert np.array_equal(hist, want) and hist.sum() == plan.primes[0][n - 2][0]


def test_slot_loads_sparse_path_matches_dense():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 50, 300)
    dense = collisions._slot_loads(s, 50)
    sparse = collisions._slot_loads(s, 2**40)                       # forces the np.unique path
    assert np.array_equal(dense[0], sparse[0]) and dense[1:] == sparse[1:]


def test_group_pairs_lexsort_path_matches_code_path():
    rng = np.random.default_rng(1)
    g = rng.integers(0, 20, 500)
    s = rng.integers(0, 30, 500)
    inv_a, cnt_a = collisions._group_pairs(g, s, 30)
    inv_b, cnt_b = collisions._group_pairs(g, s, 2**62)             # code would overflow: lexsort
    assert np.array_equal(cnt_a[inv_a], cnt_b[inv_b])
    pairs = list(zip(g.tolist(), s.tolist()))
    c = Counter(pairs)
    assert cnt_a[inv_a].tolist() == [c[p] for p in pairs]


def test_shared_in_all_heads_brute_force():
    rng = np.random.default_rng(2)
    slots = rng.integers(0, 4, (3, 200))
    want = Counter(map(tuple, slots.T.tolist()))
    mask = shared_in_all_heads(slots, [4, 4, 4])
    assert mask.tolist() == [want[tuple(col)] > 1 for col in slots.T.tolist()]


def test_rows_and_dict():
    plan, ngrams, counts = small_setup(6)
    rep = measure_collisions(ngrams, counts, plan)
    rows = rep.to_rows()
    assert all(list(r) == list(ROW_COLUMNS) for r in rows)
    per_order = plan.n_head_per_ngram + 1
    assert len(rows) == len(rep.orders) * per_order
    head_rows = [r for r in rows if r["head"] is not None]
    order_rows = [r for r in rows if r["head"] is None]
    assert len(order_rows) == 4 and all(r["indistinguishable_share_pred"] is not None for r in order_rows)
    assert all(0 <= r["colliding_share"] <= 1 and r["max_load"] >= 1 for r in head_rows)
    import pyarrow as pa

    assert pa.Table.from_pylist(rows).num_rows == len(rows)        # one consistent schema
    d = json.loads(json.dumps(rep.to_dict()))
    assert list(d)[:2] == ["format", "format_version"]
    assert d["orders"][0]["heads"][0]["colliding_share"] == rep.orders[0].heads[0].colliding_share
    assert len(rep.summary()) == 4


def test_progress_and_empty_order():
    plan, ngrams, counts = small_setup(7)
    ngrams[3] = np.zeros((0, 3), dtype=np.int64)
    counts[3] = np.zeros(0, dtype=np.int64)
    calls = []
    rep = measure_collisions(ngrams, counts, plan, progress=lambda *a, **kw: calls.append((a, kw)))
    assert calls[0][0] == ("collisions", 0, 4) and calls[-1][0] == ("collisions", 4, 4)
    empty = [o for o in rep.orders if o.n == 3]
    assert all(o.keys == 0 and o.indistinguishable == 0 and o.heads[0].occupied == 0 for o in empty)
    assert all(h.colliding_share == 0.0 and h.colliding_share_weighted == 0.0 for o in empty for h in o.heads)


@pytest.mark.parametrize("ngrams, counts", [
    ({4: np.zeros((2, 4), dtype=np.int64)}, {4: np.ones(2)}),     # order not hashed by the plan
    ({2: np.zeros((2, 3), dtype=np.int64)}, {2: np.ones(2)}),     # wrong width
    ({2: np.zeros((2, 2))}, {2: np.ones(2)}),                     # float ids
    ({2: np.zeros((2, 2), dtype=np.int64)}, {2: np.ones(3)}),     # counts of the wrong length
    ({2: np.zeros((2, 2), dtype=np.int64)}, {}),                  # counts missing
])
def test_bad_inputs(ngrams, counts):
    plan, _, _ = small_setup(0)
    with pytest.raises(InputError):
        measure_collisions(ngrams, counts, plan)


# -----------------------------------------------------------------------------
# predictions


def test_prediction_formulas():
    assert expected_occupied(0, 10) == 0.0
    assert expected_occupied(1, 10) == pytest.approx(1.0)
    assert expected_occupied(2, 10) == pytest.approx(10 * (1 - 0.9**2))
    assert expected_occupied(5, 1) == 1.0
    assert expected_indistinguishable_share(100, [7, 11]) == pytest.approx(1 - (1 - 1 / 77) ** 99)
    assert expected_indistinguishable_share(1, [7]) == 0.0
    assert expected_max_load(0, 10) == 0.0 and expected_max_load(7, 1) == 7.0
    assert expected_max_load(10**9, 2) == pytest.approx(5e8, rel=1e-3)


@pytest.mark.parametrize("k, m", [(2000, 2000), (20000, 1009), (300, 50000)])
def test_expected_max_load_against_simulation(k, m):
    rng = np.random.default_rng(k)
    sims = [np.bincount(rng.integers(0, m, k), minlength=m).max() for _ in range(40)]
    assert abs(expected_max_load(k, m) - np.mean(sims)) < 0.1 * np.mean(sims) + 0.3


@pytest.mark.parametrize("target", [1000, 3000, 12000])
def test_measured_colliding_share_is_near_uniform_prediction(target):
    plan = make_plan(canonical_vocab_size=10_000, canonical_pad_id=0, original_vocab_size=10_000,
                     layer_ids=(3,), n_head_per_ngram=8, target_sizes=(target, target))
    rng = np.random.default_rng(target)
    ngrams = {2: random_keys(rng, 2, 3000, 10_000), 3: random_keys(rng, 3, 3000, 10_000)}
    counts = {n: np.ones(k.shape[0], dtype=np.int64) for n, k in ngrams.items()}
    for o in measure_collisions(ngrams, counts, plan).orders:
        shares = []
        for h in o.heads:
            p = h.colliding_share_pred
            assert p == pytest.approx(expected_colliding_share(o.keys, h.slots))
            sd = math.sqrt(p * (1 - p) / o.keys)                    # binomial std of the share
            assert abs(h.colliding_share - p) < 5 * sd
            assert abs(h.occupied - h.occupied_pred) < 5 * math.sqrt(h.occupied_pred)
            shares.append(h.colliding_share - p)
        assert abs(np.mean(shares)) < 2.5 * sd


def test_measured_indistinguishable_share_is_near_prediction():
    # two tiny heads (31 x 37 tuples) so that ties in every head are common
    plan = make_plan(canonical_vocab_size=5000, canonical_pad_id=0, original_vocab_size=5000,
                     layer_ids=(0,), max_ngram_size=2, n_head_per_ngram=2, target_sizes=(31,))
    rng = np.random.default_rng(9)
    ngrams = {2: random_keys(rng, 2, 600, 5000)}
    o = measure_collisions(ngrams, {2: np.ones(ngrams[2].shape[0])}, plan).orders[0]
    p = o.indistinguishable_share_pred
    assert p == pytest.approx(expected_indistinguishable_share(o.keys, [31, 37]))
    assert abs(o.indistinguishable_share - p) < 5 * math.sqrt(p * (1 - p) / o.keys)


# -----------------------------------------------------------------------------
# sweep and plots


def test_sweep_rows():
    plan, _, _ = small_setup(8, vocab=300, targets=(500, 500))
    rng = np.random.default_rng(0)
    ngrams = {2: random_keys(rng, 2, 400, 300), 3: random_keys(rng, 3, 400, 300)}
    counts = {n: np.ones(k.shape[0], dtype=np.int64) for n, k in ngrams.items()}
    sizes = [50, 200, 1000, 5000]
    rows = sweep_collisions(ngrams, counts, plan, sizes, layer_id=5, n_heads=2)
    assert len(rows) == 2 * len(sizes)
    assert {r["layer"] for r in rows} == {5} and {r["heads"] for r in rows} == {2}
    for n in (2, 3):
        rs = [r for r in rows if r["n"] == n]
        assert [r["target_size"] for r in rs] == sizes
        pred = [r["colliding_share_pred"] for r in rs]
        assert pred == sorted(pred, reverse=True)                  # bigger tables collide less
        assert all(abs(r["colliding_share"] - r["colliding_share_pred"]) < 0.15 for r in rs)
        assert all(r["slots_mean"] >= r["target_size"] for r in rs)


def _assert_png_not_blank(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.05                        # more than one flat color


def test_plots(tmp_path):
    plan, ngrams, counts = small_setup(9, vocab=300, targets=(150, 150))
    rows = sweep_collisions(ngrams, counts, plan, [20, 80, 300], n_heads=2)
    plot_sweep(rows, tmp_path / "sweep.png")
    _assert_png_not_blank(tmp_path / "sweep.png")
    plot_slot_load_histogram(ngrams, plan, tmp_path / "loads.png", layer_id=5, head=1)
    _assert_png_not_blank(tmp_path / "loads.png")
