"""Tests for engram_cli.tables.hashing: the table plan, the N-gram hash and the sizing helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engram_cli.core.errors import ArtifactError, ConfigError, InputError
from engram_cli.tables import kernels as hash_kernels
from engram_cli.tables import plan as hashing_plan
from engram_cli.tables.hashing import hash_ngrams, hash_ngrams_reference
from engram_cli.tables.plan import PLAN_FORMAT, PLAN_VERSION, TablePlan, make_multipliers, make_plan, make_primes
from engram_cli.tables.sizing import (
    expected_colliding_share,
    target_size_for_collision_rate,
    target_size_for_memory_budget,
)


def wrap64(x: int) -> int:
    return ((x + 2**63) % 2**64) - 2**63


def is_prime(n: int) -> bool:
    """Trial division: independent of sympy."""
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def python_hash(ids: list[list[int]], plan: TablePlan, layer: int) -> list[list[list[int]]]:
    """The hash in plain Python ints with explicit 64-bit wrap-around: the oracle."""
    mults = plan.multipliers[layer]
    out = []
    for row in ids:
        out_row = []
        for t in range(len(row)):
            slots = []
            for n in range(2, plan.max_ngram_size + 1):
                mix = 0
                for k in range(n):
                    tok = row[t - k] if t - k >= 0 else plan.canonical_pad_id
                    mix ^= wrap64(tok * mults[k])  # XOR of two int64 values stays an int64
                slots += [mix % p for p in plan.primes[layer][n - 2]]  # Python % is floor modulo
            out_row.append(slots)
        out.append(out_row)
    return out


def small_plan(**kw) -> TablePlan:
    args = dict(canonical_vocab_size=50, canonical_pad_id=3, original_vocab_size=60, layer_ids=(1, 4),
                max_ngram_size=3, n_head_per_ngram=3, target_sizes=(31, 47), seed=7)
    args.update(kw)
    return make_plan(**args)


# -----------------------------------------------------------------------------
# hashing


def test_hash_hand_computed():
    # m = (3, 5, 7), pad 4, ids 6 1 9:
    # t=0: 6*3 ^ 4*5 = 18 ^ 20 = 6;  ^ 4*7 -> 6 ^ 28 = 26
    # t=1: 1*3 ^ 6*5 = 3 ^ 30 = 29;  ^ 4*7 -> 29 ^ 28 = 1
    # t=2: 9*3 ^ 1*5 = 27 ^ 5 = 30;  ^ 6*7 -> 30 ^ 42 = 52
    plan = TablePlan(seed=0, max_ngram_size=3, n_head_per_ngram=2, layer_ids=(0,), pad_id=4,
                     canonical_pad_id=4, canonical_vocab_size=10, original_vocab_size=10,
                     target_sizes=(11, 17), multipliers={0: (3, 5, 7)}, primes={0: ((11, 13), (17, 19))})
    expected = [[6 % 11, 6 % 13, 26 % 17, 26 % 19],
                [29 % 11, 29 % 13, 1 % 17, 1 % 19],
                [30 % 11, 30 % 13, 52 % 17, 52 % 19]]
    assert hash_ngrams(np.array([[6, 1, 9]]), plan, 0).tolist() == [expected]
    assert hash_ngrams(np.array([6, 1, 9]), plan, 0).tolist() == expected  # 1-D: one sequence


@pytest.mark.parametrize("max_n", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (2, 7), (4, 33)])
def test_hash_matches_python_ints(max_n, shape):
    plan = small_plan(max_ngram_size=max_n, target_sizes=(31, 47, 61)[:max_n - 1])
    rng = np.random.default_rng(sum(shape) + max_n)
    ids = rng.integers(0, plan.canonical_vocab_size, shape)
    for layer in plan.layer_ids:
        got = hash_ngrams(ids, plan, layer)
        assert got.dtype == np.int64 and got.shape == shape + (plan.total_heads,)
        assert got.tolist() == python_hash(ids.tolist(), plan, layer)
        assert hash_ngrams_reference(ids, plan, layer).tolist() == got.tolist()


def test_reference_keeps_a_1d_shape():
    plan = small_plan()
    ids = np.arange(9)
    assert np.array_equal(hash_ngrams_reference(ids, plan, 1), hash_ngrams(ids, plan, 1))


def test_hash_wraps_like_int64_with_negative_mixes():
    # ids far outside [0, V) overflow id * m and give negative mixes: floor modulo must still
    # land in [0, p) and agree with explicit 64-bit wrap-around
    plan = make_plan(canonical_vocab_size=7, canonical_pad_id=0, original_vocab_size=7,
                     n_head_per_ngram=4, target_sizes=(1000, 3000))
    ids = np.random.default_rng(0).integers(-2**62, 2**62, (3, 40))
    got = hash_ngrams(ids, plan, 15)
    assert got.tolist() == python_hash(ids.tolist(), plan, 15)
    mults = plan.multipliers[15]
    assert any(wrap64(int(a) * mults[0]) ^ wrap64(int(b) * mults[1]) < 0
               for a, b in zip(ids[0, 1:], ids[0, :-1]))


@pytest.mark.parametrize("chunk", [5, 64, 4096])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 300), (37, 3), (200, 1), (6, 50)])
def test_hash_matches_reference_transcription(monkeypatch, chunk, threads, shape):
    # small chunks put row starts and chunk edges everywhere; negative ids exercise the signed path
    monkeypatch.setattr(hash_kernels, "_CHUNK", chunk)
    plan = small_plan(canonical_vocab_size=1000, target_sizes=(5000, 9000))
    rng = np.random.default_rng(chunk * threads)
    ids = rng.integers(0, 1000, shape)
    ids[rng.random(shape) < 0.05] = -123456789012
    for layer in plan.layer_ids:
        assert np.array_equal(hash_ngrams(ids, plan, layer, num_threads=threads),
                              hash_ngrams_reference(ids, plan, layer))


def test_hash_default_plan_matches_reference_on_big_vocab():
    plan = make_plan(canonical_vocab_size=98_304, canonical_pad_id=2, original_vocab_size=129_280)
    ids = np.random.default_rng(1).integers(0, 98_304, (3, 5000))
    for layer in plan.layer_ids:
        got = hash_ngrams(ids, plan, layer)
        assert np.array_equal(got, hash_ngrams_reference(ids, plan, layer))
        assert (got >= 0).all() and (got < np.array(plan.head_sizes(layer))).all()


@pytest.mark.parametrize("shape", [(5,), (2, 9), (4, 1)])
def test_numpy_equals_torch(shape):
    plan = small_plan()
    ids = np.random.default_rng(3).integers(0, 50, shape)
    ids.flat[0] = -5  # a negative id as well
    for layer in plan.layer_ids:
        want = hash_ngrams(ids, plan, layer)
        # public dispatch with a CPU tensor (NumPy path, zero-copy) ...
        got = hash_ngrams(torch.from_numpy(ids), plan, layer)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
        assert np.array_equal(got.numpy(), want)
        # ... and the pure-torch path that other devices take
        torch_path = hash_kernels.hash_torch(torch.from_numpy(ids), plan.multipliers[layer],
                                         plan.primes[layer], plan.canonical_pad_id)
        assert np.array_equal(torch_path.numpy(), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_equals_numpy():
    plan = small_plan()
    ids = np.random.default_rng(4).integers(0, 50, (3, 20))
    got = hash_ngrams(torch.from_numpy(ids).cuda(), plan, 1)
    assert got.device.type == "cuda"
    assert np.array_equal(got.cpu().numpy(), hash_ngrams(ids, plan, 1))


def test_hash_accepts_other_int_dtypes_and_empty():
    plan = small_plan()
    ids = np.array([[1, 2, 3, 4]], dtype=np.int32)
    assert np.array_equal(hash_ngrams(ids, plan, 1), hash_ngrams(ids.astype(np.int64), plan, 1))
    assert hash_ngrams(np.zeros((0, 5), dtype=np.int64), plan, 1).shape == (0, 5, plan.total_heads)


@pytest.mark.parametrize("bad, err", [
    (np.zeros((2, 3), dtype=np.float32), InputError),
    (np.zeros((1, 2, 3), dtype=np.int64), InputError),
    (torch.zeros(2, 3), InputError),
])
def test_hash_rejects_bad_input(bad, err):
    with pytest.raises(err):
        hash_ngrams(bad, small_plan(), 1)


def test_hash_rejects_unknown_layer():
    with pytest.raises(ConfigError, match="layer 2"):
        hash_ngrams(np.zeros((1, 3), dtype=np.int64), small_plan(), 2)


# -----------------------------------------------------------------------------
# plan


def test_multipliers_follow_the_rng_rule():
    V = 98_304
    mults = make_multipliers(V, (1, 15), 3, seed=0)
    half_bound = max(1, ((2**63 - 1) // V) // 2)
    for layer, m in mults.items():
        r = np.random.default_rng(0 + 10007 * layer).integers(0, half_bound, size=3, dtype=np.int64)
        assert m == tuple(int(x) * 2 + 1 for x in r)
        assert all(x % 2 == 1 for x in m)
        assert all((V - 1) * x <= 2**63 - 1 for x in m)  # valid ids never overflow


def test_multipliers_tiny_half_bound():
    # V close to 2^63: M_max // 2 is 0, the reference clamps half_bound to 1 -> all multipliers 1
    assert make_multipliers(2**62 + 1, (0, 3), 2, seed=5) == {0: (1, 1), 3: (1, 1)}


@pytest.mark.parametrize("layers, max_n, heads, targets", [
    ((1, 15), 3, 8, (646_400, 646_400)),
    ((0, 1, 2), 4, 3, (10, 10, 50)),
    ((5,), 2, 5, (2,)),
    ((2, 9), 3, 2, (100, 30)),
])
def test_primes(layers, max_n, heads, targets):
    primes = make_primes(layers, max_n, heads, targets)
    flat = [p for layer in layers for order in primes[layer] for p in order]
    assert len(flat) == len(set(flat)) == len(layers) * (max_n - 1) * heads  # distinct plan-wide
    seen: set[int] = set()
    for layer in layers:
        assert len(primes[layer]) == max_n - 1
        for order, target in zip(primes[layer], targets):
            assert all(is_prime(p) and p > target - 1 for p in order)
            assert list(order) == sorted(order) and len(set(order)) == len(order)
            # each head: the smallest unused prime above the previous head's
            start = target - 1
            for p in order:
                q = start + 1
                while not is_prime(q) or q in seen:
                    q += 1
                assert p == q
                seen.add(p)
                start = p


def test_next_prime_equals_sympy():
    import sympy

    rng = np.random.default_rng(0)
    starts = list(range(-3, 2000)) + [int(x) for x in rng.integers(2000, 2**40, 300)] + \
        [646_399, 16_000_000 - 1, 2**61 - 2, 2**63 - 60, 3_215_031_751 - 1]   # 3215031751: strong pseudoprime to 2, 3, 5, 7
    for n in starts:
        assert hashing_plan.next_prime(n) == sympy.nextprime(n), n
    for n in list(range(0, 3000)) + [2**61 - 1, 2**63 - 25, 3_215_031_751, 3_825_123_056_546_413_051, 561, 1105]:
        assert hashing_plan.is_prime(n) == sympy.isprime(n), n


def test_default_plan():
    plan = make_plan(canonical_vocab_size=98_304, canonical_pad_id=2, original_vocab_size=129_280)
    assert plan.layer_ids == (1, 15) and plan.max_ngram_size == 3 and plan.n_head_per_ngram == 8
    assert plan.target_sizes == (646_400, 646_400) and plan.seed == 0 and plan.pad_id == 2
    assert plan.primes[1][0][:3] == (646_403, 646_411, 646_421)  # first primes above 646_399
    assert plan.total_heads == 16 and plan.n_orders == 2
    sizes = plan.head_sizes(1)
    assert len(sizes) == 16 and sizes[:8] == list(plan.primes[1][0])
    offsets = plan.head_offsets(1)
    assert offsets[0] == 0 and offsets[1] == sizes[0] and offsets[-1] == sum(sizes[:-1])
    assert plan.total_slots(1) == sum(sizes)
    assert plan.total_slots_all == plan.total_slots(1) + plan.total_slots(15)
    assert plan.memory_bytes("bf16") == plan.total_slots_all * 64 * 2  # the demo: 512 dims over 8 heads
    assert plan.memory_bytes("fp32") == 2 * plan.memory_bytes("bf16") == 4 * plan.memory_bytes("fp8")
    with pytest.raises(ConfigError):
        plan.memory_bytes("int4")


@pytest.mark.parametrize("kw", [
    dict(target_sizes=(0, 47)),
    dict(target_sizes=(31,)),
    dict(max_ngram_size=1, target_sizes=()),
    dict(layer_ids=()),
    dict(layer_ids=(1, 1)),
    dict(n_head_per_ngram=0),
    dict(canonical_pad_id=50),
    dict(pad_id=60),
    dict(canonical_vocab_size=0),
    dict(seed=-1),
    dict(embed_dim_per_head=0),
])
def test_make_plan_rejects_impossible_values(kw):
    with pytest.raises(ConfigError):
        small_plan(**kw)


def test_plan_round_trip(tmp_path):
    plan = small_plan(embed_dim_per_head=16)
    d = plan.to_dict()
    assert list(d)[:2] == ["format", "format_version"]
    assert d["format"] == PLAN_FORMAT and d["format_version"] == PLAN_VERSION
    assert TablePlan.from_dict(json.loads(json.dumps(d))) == plan
    path = tmp_path / "sub" / "plan.json"
    plan.save(path)
    assert TablePlan.load(path) == plan
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temp file


def _mutate(d: dict, key: str, value) -> dict:
    d = json.loads(json.dumps(d))
    if value is KeyError:
        del d[key]
    else:
        d[key] = value
    return d


@pytest.mark.parametrize("key, value, match", [
    ("format", "engram.vocab", "format"),
    ("format_version", 2, "version"),
    ("seed", KeyError, "missing keys: seed"),
    ("extra", 1, "unknown keys: extra"),
    ("max_ngram_size", "3", "max_ngram_size must be an integer"),
    ("canonical_pad_id", 50, "canonical_pad_id"),
    ("target_sizes", [31], "target_sizes"),
    ("layer_ids", [1], "one entry per layer"),
    ("multipliers", {"1": [1, 2, 3], "4": [1, 3, 5]}, "odd"),
    ("primes", {"1": [[37, 41, 43], [53, 59, 61]], "4": [[67, 71, 72], [79, 83, 89]]}, "not a prime"),
    ("primes", {"1": [[37, 41, 43], [53, 59, 61]], "4": [[37, 71, 73], [79, 83, 89]]}, "used twice"),
    ("primes", {"1": [[37, 41], [53, 59, 61]], "4": [[67, 71, 73], [79, 83, 89]]}, "head sizes"),
    ("primes", {"1": [[29, 41, 43], [53, 59, 61]], "4": [[67, 71, 73], [79, 83, 89]]}, ">= target"),
])
def test_plan_validation_errors(key, value, match):
    d = _mutate(small_plan().to_dict(), key, value)
    with pytest.raises(ArtifactError, match=match):
        TablePlan.from_dict(d)


def test_plan_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        TablePlan.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        TablePlan.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="JSON object"):
        TablePlan.load(bad)


# -----------------------------------------------------------------------------
# sizing helpers


@pytest.mark.parametrize("k, rate", [(2, 0.5), (10, 0.1), (1000, 0.01), (10**6, 0.05), (10**9, 0.2),
                                     (50, 0.999)])
def test_target_size_for_collision_rate_is_the_smallest_size(k, rate):
    m = target_size_for_collision_rate(k, rate)
    assert expected_colliding_share(k, m) <= rate
    assert m == 1 or expected_colliding_share(k, m - 1) > rate


def test_target_size_for_collision_rate_edges():
    assert target_size_for_collision_rate(0, 0.1) == 1
    assert target_size_for_collision_rate(1, 0.1) == 1
    assert abs(target_size_for_collision_rate(100_000, 0.01) - 100_000 / 0.01) / 1e7 < 0.01  # ~k/rate
    for rate in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError):
            target_size_for_collision_rate(10, rate)
    with pytest.raises(ConfigError):
        target_size_for_collision_rate(-1, 0.1)


def test_expected_colliding_share():
    assert expected_colliding_share(1, 10) == 0.0
    assert expected_colliding_share(2, 10) == pytest.approx(0.1)
    assert expected_colliding_share(5, 1) == 1.0
    assert expected_colliding_share(3, 4) == pytest.approx(1 - (3 / 4) ** 2)


@pytest.mark.parametrize("budget, dtype", [(10**6, "bf16"), (123_456_789, "fp32"), (5 * 10**9, "fp8")])
def test_target_size_for_memory_budget(budget, dtype):
    kw = dict(n_layers=2, n_orders=2, n_heads=4, embed_dim_per_head=8, dtype=dtype)
    m = target_size_for_memory_budget(budget, **kw)
    row = 8 * {"bf16": 2, "fp32": 4, "fp8": 1}[dtype]
    assert m <= budget // (16 * row)
    fits = make_plan(canonical_vocab_size=10, canonical_pad_id=0, original_vocab_size=10, layer_ids=(0, 1),
                     n_head_per_ngram=4, target_sizes=(m, m), embed_dim_per_head=8)
    assert fits.memory_bytes(dtype) <= budget
    bigger = make_plan(canonical_vocab_size=10, canonical_pad_id=0, original_vocab_size=10, layer_ids=(0, 1),
                       n_head_per_ngram=4, target_sizes=(m + 1, m + 1), embed_dim_per_head=8)
    assert bigger.memory_bytes(dtype) > budget  # the largest size that fits


def test_target_size_for_memory_budget_errors():
    kw = dict(n_layers=1, n_orders=1, n_heads=2, embed_dim_per_head=4, dtype="fp32")
    with pytest.raises(ConfigError, match="too small"):
        target_size_for_memory_budget(16, **kw)  # primes 2 and 3 need (2 + 3) * 16 bytes
    assert target_size_for_memory_budget(80, **kw) == 2  # target 2 still picks primes 2 and 3
    with pytest.raises(ConfigError):
        target_size_for_memory_budget(10**6, **{**kw, "dtype": "int8"})
    with pytest.raises(ConfigError):
        target_size_for_memory_budget(10**6, **{**kw, "n_heads": 0})
