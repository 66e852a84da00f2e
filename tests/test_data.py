"""Training data: the token cache, the split, the sub-vocabulary and the batches (engram_cli.train.data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engram_cli.core.errors import ArtifactError, ConfigError, InputError
from engram_cli.corpus.cache import TokenCache, cache_key, load_or_build_token_cache
from engram_cli.corpus.spec import CorpusSpec
from engram_cli.train.data import Batches, SubVocab, prepare_data, split_stream, token_counts, unigram_entropy
from engram_cli.vocab.tokenizer import find_eos_id

TEXT = ("The quick brown fox jumps over the lazy dog. " * 30, "Engram looks up static N-gram patterns. " * 40,
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 20)


def write_corpus(d: Path) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, t in enumerate(TEXT):
        p = d / f"doc{i}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(str(p))
    return paths


@pytest.fixture()
def cache(tmp_path, deepseek, vocab) -> TokenCache:
    spec = CorpusSpec(sources=write_corpus(tmp_path / "corpus"))
    return load_or_build_token_cache(spec, deepseek, vocab, tmp_path / "cache", eos_id=1)


def test_stream_is_documents_with_eos(cache, deepseek):
    ids = [deepseek.tokenizer.encode(t, add_special_tokens=False).ids for t in TEXT]
    expected = np.concatenate([np.array(i + [1], dtype=np.int32) for i in ids])
    assert cache.stream.dtype == np.int32 and not cache.hit
    np.testing.assert_array_equal(np.asarray(cache.stream), expected)
    assert cache.documents == 3 and cache.eos_id == 1


def test_cache_is_reused_and_keyed(tmp_path, deepseek, vocab, cache, monkeypatch):
    import engram_cli.corpus.cache

    def no_tokenizing(*a, **k):
        raise AssertionError("the second run must not tokenize")

    monkeypatch.setattr(engram_cli.corpus.cache, "iter_tokenized", no_tokenizing)
    spec = CorpusSpec(sources=sorted(str(p) for p in (tmp_path / "corpus").glob("*.txt")))
    again = load_or_build_token_cache(spec, deepseek, vocab, tmp_path / "cache", eos_id=1)
    assert again.hit and again.path == cache.path
    np.testing.assert_array_equal(np.asarray(again.stream), np.asarray(cache.stream))
    # max_tokens, the tokenizer, the vocab map and the EOS id all enter the key
    fp = {"corpus_sha256": "c", "hub": [], "shard": None}
    keys = {cache_key(fp, "t", "v", None, 1), cache_key(fp, "t", "v", 100, 1), cache_key(fp, "u", "v", None, 1),
            cache_key(fp, "t", "w", None, 1), cache_key(fp, "t", "v", None, 2),
            cache_key({**fp, "corpus_sha256": "d"}, "t", "v", None, 1)}
    assert len(keys) == 6


def test_damaged_cache_entry_is_rebuilt(tmp_path, deepseek, vocab, cache):
    (cache.path / "stream.npy").write_bytes(b"garbage")
    spec = CorpusSpec(sources=sorted(str(p) for p in (tmp_path / "corpus").glob("*.txt")))
    again = load_or_build_token_cache(spec, deepseek, vocab, tmp_path / "cache", eos_id=1)
    assert not again.hit and again.stream.shape == cache.stream.shape


def test_cache_edited_in_place_is_rebuilt(tmp_path, deepseek, vocab, cache):
    """Same size, ids still in range: only the recorded sha256 tells; the entry is rebuilt."""
    path = cache.path / "stream.npy"
    original = np.array(cache.stream)
    data = bytearray(path.read_bytes())
    data[-8:-4] = np.array([5], dtype=np.int32).tobytes()  # one id changed
    path.write_bytes(bytes(data))
    spec = CorpusSpec(sources=sorted(str(p) for p in (tmp_path / "corpus").glob("*.txt")))
    again = load_or_build_token_cache(spec, deepseek, vocab, tmp_path / "cache", eos_id=1)
    assert not again.hit
    np.testing.assert_array_equal(np.asarray(again.stream), original)


def test_cache_dir_that_is_a_file_is_refused(tmp_path, deepseek, vocab):
    (tmp_path / "f").write_text("x")
    spec = CorpusSpec(sources=write_corpus(tmp_path / "corpus"))
    with pytest.raises(InputError, match="is a file, not a directory"):
        load_or_build_token_cache(spec, deepseek, vocab, tmp_path / "f", eos_id=1)


def test_find_eos_id(deepseek):
    assert find_eos_id(deepseek.tokenizer) == 1
    assert find_eos_id(deepseek.tokenizer, "<｜begin▁of▁sentence｜>") == 0
    with pytest.raises(ConfigError, match="not a token"):
        find_eos_id(deepseek.tokenizer, "<no such token>")


@pytest.mark.parametrize("n,f,chunk", [(10_000, 0.05, 100), (10_000, 0.1, 256), (999, 0.3, 50), (5000, 0.5, 1000)])
def test_split_partitions_the_stream(n, f, chunk):
    s = split_stream(n, f, chunk)
    covered = np.zeros(n, dtype=int)
    for a, b in s.train + s.val:
        covered[a:b] += 1
    assert (covered == 1).all()  # disjoint and complete
    assert s.val and s.train
    assert abs(s.val_tokens / n - f) <= chunk / n + 0.01
    assert split_stream(n, f, chunk) == s  # deterministic


def test_split_bad_values():
    with pytest.raises(ConfigError, match="val_fraction"):
        split_stream(100, 0.0, 10)
    with pytest.raises(ConfigError, match="val_chunk_tokens"):
        split_stream(100, 0.1, 1)


def test_subvocab_round_trip_and_unk():
    counts = np.array([0, 5, 1, 0, 2, 9, 0], dtype=np.int64)
    sv = SubVocab.from_counts(counts, min_count=2, always=(3,))
    assert sv.original_ids.tolist() == [1, 3, 4, 5] and sv.unk_id == 4 and sv.size == 5
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    model = sv.to_model_ids(ids)
    assert model.tolist() == [[0, 4, 1], [2, 3, 4]]
    assert sv.to_original_ids(model).tolist() == [[1, -1, 3], [4, 5, -1]]
    again = SubVocab(sv.original_ids.copy(), 7)
    assert again.fingerprint == sv.fingerprint and SubVocab(np.array([1, 3]), 7).fingerprint != sv.fingerprint
    with pytest.raises(InputError):
        sv.to_model_ids(np.array([7]))
    with pytest.raises(ArtifactError, match="malformed"):
        SubVocab(np.array([3, 1]), 7)


def test_entropy_and_counts():
    stream = np.array([0, 1, 1, 2, 2, 2, 2, 3], dtype=np.int32)
    c = token_counts(stream, [(0, 4), (6, 8)], 4)
    assert c.tolist() == [1, 2, 2, 1]
    assert unigram_entropy(np.array([1, 1, 0, 2])) == pytest.approx(-(2 * 0.25 * np.log(0.25) + 0.5 * np.log(0.5)))


def test_prepare_data_uses_training_counts_only(cache, vocab):
    data = prepare_data(cache, vocab.table, val_fraction=0.25, val_chunk_tokens=64, min_count=1)
    train_ids = set(np.concatenate([np.asarray(cache.stream[a:b]) for a, b in data.split.train]).tolist())
    assert set(data.subvocab.original_ids.tolist()) == train_ids | {1}
    assert 0 <= data.val_unk_share < 1
    assert 0 < data.unigram_entropy <= np.log(data.subvocab.size)


def test_batches_stay_in_training_ranges_and_split_by_rank(cache, vocab):
    data = prepare_data(cache, vocab.table, val_fraction=0.2, val_chunk_tokens=64, min_count=1)
    b = Batches(data, block_size=16, batch_size=8, seed=3)
    starts = b.train_starts(5)
    np.testing.assert_array_equal(starts, b.train_starts(5))  # a pure function of (seed, step)
    assert not np.array_equal(starts, b.train_starts(6))
    for s in np.concatenate([b.train_starts(i) for i in range(50)]):
        assert any(a <= s and s + 17 <= e for a, e in data.split.train)  # never reads held-out tokens
    full = b.train_batch(5)
    parts = [Batches(data, block_size=16, batch_size=8, seed=3, rank=r, world_size=2).train_batch(5) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([p.idx for p in parts]), full.idx)
    # inputs, canonical ids and targets line up: targets are the inputs shifted by one
    np.testing.assert_array_equal(full.idx[:, 1:], full.targets[:, :-1])
    win = np.asarray(cache.stream)[starts[:, None] + np.arange(16)]
    np.testing.assert_array_equal(full.canonical, vocab.table[win])
    np.testing.assert_array_equal(full.idx, data.subvocab.to_model_ids(win))
    val = b.val_batches(2)
    for batch in val:
        assert batch.idx.shape[1] == 16
    with pytest.raises(ConfigError, match="divisible"):
        Batches(data, block_size=16, batch_size=7, seed=0, rank=0, world_size=2)
