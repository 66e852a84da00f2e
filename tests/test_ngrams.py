"""Exact N-gram counting against collections.Counter, spilling, shard merging and the statistics."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from engram_cli.core.errors import ArtifactError, ConfigError, InputError
from engram_cli.tables.counting import NgramCounter, count_ngrams, counter_sizes, merge_stats
from engram_cli.tables.keys import KeyLayout, group_rows, reduce_keys, reduce_keys_lexsort
from engram_cli.tables.stats import NgramStats, order_by_count


def naive_counts(docs, max_n) -> dict[int, Counter]:
    """The reference: a plain loop over every position of every document."""
    counts = {n: Counter() for n in range(1, max_n + 1)}
    for doc in docs:
        doc = [int(x) for x in doc]
        for n in range(1, max_n + 1):
            for i in range(len(doc) - n + 1):
                counts[n][tuple(doc[i:i + n])] += 1
    return counts


def as_dict(stats: NgramStats, n: int) -> dict[tuple[int, ...], int]:
    return {tuple(row): int(c) for row, c in zip(stats.ngrams[n].tolist(), stats.counts[n])}


def random_docs(rng, vocab_size, count=120, max_len=40, skew=True):
    docs = []
    for _ in range(count):
        length = int(rng.integers(0, max_len))
        ids = rng.zipf(1.5, size=length) % vocab_size if skew else rng.integers(0, vocab_size, size=length)
        docs.append(ids.astype(np.int64 if rng.random() < 0.5 else np.int32))
    return docs


# Buffers small enough to force many runs, compaction of in-memory runs, and spilling to disk.
BUFFERS = {
    "one-run": {},
    "many-runs": {"buffer_tokens": 50},
    "spilling": {"buffer_tokens": 30, "spill_bytes": 0},
}


@pytest.mark.parametrize("max_n", [2, 3, 4])
@pytest.mark.parametrize("buffers", list(BUFFERS))
@pytest.mark.parametrize("vocab_size", [7, 129_280])
def test_counts_equal_naive_counter(max_n, buffers, vocab_size, tmp_path):
    rng = np.random.default_rng(max_n * 100 + vocab_size % 97)
    docs = random_docs(rng, vocab_size)
    counter = NgramCounter(max_n, vocab_size=vocab_size, spill_dir=tmp_path / "spill", **BUFFERS[buffers])
    counter.add_many(docs)
    stats = counter.finish()
    ref = naive_counts(docs, max_n)
    for n in range(1, max_n + 1):
        assert as_dict(stats, n) == dict(ref[n])
        # sorted by count descending, then by ids: deterministic
        expected = sorted(ref[n].items(), key=lambda kv: (-kv[1], kv[0]))
        assert [tuple(r) for r in stats.ngrams[n].tolist()] == [k for k, _ in expected]
        assert stats.ngrams[n].dtype == np.int64 and stats.counts[n].dtype == np.int64
    assert stats.tokens == sum(map(len, docs)) == stats.total(1)
    assert stats.documents == len(docs)
    if buffers == "spilling":
        assert counter.spills > 0
    spill = tmp_path / "spill"
    assert not spill.exists() or not any(spill.iterdir())  # spilled runs are removed


@pytest.mark.parametrize("buffers", list(BUFFERS))
@pytest.mark.parametrize("vocab_size", [7, 129_280, 2**23])   # 2**23: 1-grams sorted, not counted in an array
def test_add_batch_equals_naive_counter(buffers, vocab_size, tmp_path):
    rng = np.random.default_rng(vocab_size % 89)
    docs = random_docs(rng, vocab_size, count=150)
    counter = NgramCounter(3, vocab_size=vocab_size, spill_dir=tmp_path / "spill", **BUFFERS[buffers])
    for i in range(0, len(docs), 16):                       # batches of 16 documents, some of them empty
        batch = docs[i:i + 16]
        counter.add_batch(np.concatenate(batch), [len(d) for d in batch])
    stats = counter.finish()
    ref = naive_counts(docs, 3)
    for n in (1, 2, 3):
        assert as_dict(stats, n) == dict(ref[n])
        expected = sorted(ref[n].items(), key=lambda kv: (-kv[1], kv[0]))
        assert [tuple(r) for r in stats.ngrams[n].tolist()] == [k for k, _ in expected]
    assert stats.documents == len(docs) and stats.tokens == sum(map(len, docs))


def test_results_unpacked_in_blocks_are_the_same(monkeypatch):
    from engram_cli.tables import stats as ngram_stats

    rng = np.random.default_rng(12)
    docs = random_docs(rng, 60, count=80)
    whole = count_ngrams(docs, 3, 60, buffer_tokens=40)
    monkeypatch.setattr(ngram_stats, "_UNPACK_ROWS", 7)
    blocks = count_ngrams(docs, 3, 60, buffer_tokens=40)
    for n in (1, 2, 3):
        assert np.array_equal(blocks.ngrams[n], whole.ngrams[n]) and np.array_equal(blocks.counts[n], whole.counts[n])
    assert as_dict(blocks, 3) == dict(naive_counts(docs, 3)[3])


def test_add_batch_refuses_lengths_that_do_not_split_the_ids():
    counter = NgramCounter(2, vocab_size=10)
    for ids, lengths in [([1, 2, 3], [1, 1]), ([1, 2], [3, -1]), ([1.5], [1]), ([1, 2], [[1, 1]])]:
        with pytest.raises(InputError):
            counter.add_batch(np.array(ids), np.array(lengths))
    counter.add_batch(np.zeros(0, np.int64), [0, 0])       # two empty documents
    assert counter.finish().documents == 2


def test_counter_sizes_bound_the_buffers_and_runs():
    assert counter_sizes(None, 3, 99_092) == {}
    sizes = counter_sizes(1 << 30, 3, 99_092)               # 1-grams in an array: 2 one-word orders
    assert sizes == {"buffer_tokens": (1 << 28) // 16, "spill_bytes": 1 << 29}
    assert counter_sizes(1 << 30, 3, 2**23)["buffer_tokens"] == (1 << 28) // 32   # 23-bit ids: 3-grams take 2 words
    with pytest.raises(ConfigError):
        counter_sizes(1000, 3, 99_092)


@pytest.mark.parametrize("vocab_size,max_n", [(2**20, 6), (2**22, 5), (2**40, 3), (1, 3)])
def test_wide_keys(vocab_size, max_n):
    """Two-word keys with a ranked low word (20 bits: 3 ids/word) and 3+ words (lexsort path)."""
    rng = np.random.default_rng(vocab_size % 1000)
    docs = [rng.integers(0, vocab_size, size=int(rng.integers(0, 12))) % max(1, vocab_size) for _ in range(60)]
    docs += [d[: len(d) // 2] for d in docs[:20]] + [docs[0]] * 5  # repeats, so counts above 1
    stats = count_ngrams(docs, max_n, vocab_size, buffer_tokens=40, spill_bytes=0)
    ref = naive_counts(docs, max_n)
    for n in range(1, max_n + 1):
        assert as_dict(stats, n) == dict(ref[n])


@pytest.mark.parametrize("hi_bits,lo_bits,distinct_hi", [
    (10, 20, 1000),   # fits one 64-bit code
    (51, 17, 1000),   # 68 bits: bucketed by the top 4 bits (order 4 of a 17-bit vocabulary)
    (60, 17, 50),     # ranked first word, raw second word
    (60, 60, 1000),   # both words ranked
])
def test_reduce_two_words_equals_lexsort_reference(hi_bits, lo_bits, distinct_hi):
    rng = np.random.default_rng(hi_bits + lo_bits)
    his = rng.integers(0, 2**hi_bits, size=distinct_hi, dtype=np.uint64) | np.uint64(1 << (hi_bits - 1))
    keys = np.stack([rng.choice(his, size=3000),
                     rng.integers(0, 2**lo_bits, size=3000, dtype=np.uint64) % np.uint64(40 << (lo_bits - 6))], axis=1)
    keys[0, 1] = np.uint64((1 << lo_bits) - 1)  # the widest second word occurs
    counts = rng.integers(1, 5, size=keys.shape[0])
    for c in (None, counts):
        got, ref = reduce_keys(keys, c), reduce_keys_lexsort(keys, c)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def test_reduce_keys_other_widths_equal_lexsort_reference():
    rng = np.random.default_rng(0)
    for words in (1, 3):
        keys = rng.integers(0, 4, size=(500, words)).astype(np.uint64)
        keys[:, -1] |= np.uint64(1) << np.uint64(rng.integers(0, 63))
        counts = rng.integers(1, 5, size=500)
        for c in (None, counts):
            got, ref = reduce_keys(keys, c), reduce_keys_lexsort(keys, c)
            assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


@pytest.mark.parametrize("words", [1, 2, 3])
def test_group_rows_first_occurrences_and_sums(words):
    rng = np.random.default_rng(words)
    keys = rng.integers(0, 3, size=(400, words)).astype(np.uint64)
    x = rng.random(400)
    order, starts = group_rows(keys)
    rows = [tuple(r) for r in keys.tolist()]
    distinct = sorted(set(rows))
    assert [rows[i] for i in order[starts]] == distinct  # sorted, one per distinct row
    assert [int(i) for i in order[starts]] == [rows.index(r) for r in distinct]  # first occurrences
    sums = np.add.reduceat(x[order], starts)
    assert np.allclose(sums, [x[[i for i, r in enumerate(rows) if r == d]].sum() for d in distinct])


def test_order_by_count_is_a_stable_descending_sort():
    rng = np.random.default_rng(2)
    for counts in (rng.integers(1, 6, size=1000), np.array([2**62, 1, 2**62, 5])):  # packed / fallback
        assert np.array_equal(order_by_count(counts), np.argsort(-counts, kind="stable"))
    assert order_by_count(np.empty(0, dtype=np.int64)).shape == (0,)


def test_pack_unpack_roundtrip():
    rng = np.random.default_rng(1)
    for bits, n in [(17, 3), (17, 4), (17, 6), (1, 8), (32, 5)]:
        layout = KeyLayout(n, bits)
        grams = rng.integers(0, 2**bits, size=(100, n))
        assert np.array_equal(layout.unpack(layout.pack(grams)), grams)
        # row order of the packed words is the lexicographic order of the id tuples
        order = np.lexsort(layout.pack(grams).T[::-1])
        assert [tuple(r) for r in grams[order].tolist()] == sorted(tuple(r) for r in grams.tolist())


def test_document_boundaries():
    stats = count_ngrams([np.array([1, 2]), np.array([3, 4, 5]), np.array([], dtype=np.int64), np.array([6])],
                         3, 10, buffer_tokens=3)
    assert as_dict(stats, 2) == {(1, 2): 1, (3, 4): 1, (4, 5): 1}  # no (2, 3) nor (5, 6)
    assert as_dict(stats, 3) == {(3, 4, 5): 1}
    assert stats.documents == 4 and stats.tokens == 6
    short = count_ngrams([np.array([1, 2])], 4, 10)
    assert short.distinct(3) == short.distinct(4) == 0 and short.ngrams[4].shape == (0, 4)


def test_bad_ids_and_orders():
    with pytest.raises(InputError, match="id 10 is outside the canonical vocabulary 0..9"):
        count_ngrams([np.array([1, 10])], 2, 10)
    with pytest.raises(InputError, match="outside"):
        count_ngrams([np.array([-1])], 2, 10)
    with pytest.raises(InputError, match="1-D integer"):
        count_ngrams([np.array([1.5])], 2, 10)
    with pytest.raises(ConfigError):
        NgramCounter(0, vocab_size=10)
    with pytest.raises(ConfigError):
        NgramCounter(9, vocab_size=10)


def test_statistics_against_brute_force():
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 50, count=200)
    stats = count_ngrams(docs, 3, 50)
    ref = naive_counts(docs, 3)
    for n in (1, 2, 3):
        values = sorted(ref[n].values(), reverse=True)
        assert stats.total(n) == sum(values) and stats.distinct(n) == len(values)
        coc = stats.count_of_counts(n, max_c=4)
        assert coc.tolist() == [0] + [values.count(c) for c in (1, 2, 3, 4)] + [sum(v > 4 for v in values)]
        ks = [0, 1, 5, len(values), len(values) + 10]
        assert np.allclose(stats.coverage(n, ks), [sum(values[:k]) / sum(values) for k in ks])
        assert stats.coverage(n, 3) == pytest.approx(sum(values[:3]) / sum(values))
        grams, counts = stats.top(n, 4)
        assert counts.tolist() == values[:4] and grams.shape == (min(4, len(values)), n)
    assert stats.summary()["orders"]["2"]["singletons"] == list(ref[2].values()).count(1)
    with pytest.raises(ConfigError, match="order 4"):
        stats.total(4)


def test_merge_of_random_partitions_equals_one_run():
    rng = np.random.default_rng(4)
    docs = random_docs(rng, 30, count=90)
    whole = count_ngrams(docs, 3, 30)
    parts = [count_ngrams(docs[i::4], 3, 30, buffer_tokens=25) for i in range(4)]
    merged = merge_stats(parts)
    assert (merged.documents, merged.tokens) == (whole.documents, whole.tokens)
    for n in (1, 2, 3):
        assert np.array_equal(merged.ngrams[n], whole.ngrams[n])
        assert np.array_equal(merged.counts[n], whole.counts[n])
    with pytest.raises(ArtifactError, match="cannot merge"):
        merge_stats([whole, count_ngrams(docs, 2, 30)])


def test_corpus_shards_merged_equal_one_run(tmp_path):
    """Shards 0/3, 1/3, 2/3 of a real corpus, tokenized with DeepSeek, merge to the one-run counts."""
    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.corpus.stream import iter_tokenized
    from engram_cli.vocab.tokenizer import load_tokenizer

    tok = load_tokenizer("deepseek")
    lines = [f"Engram looks up {w} n-grams in table {i % 7} of layer {i % 3}." for i, w in
             enumerate(["short", "long", "frequent", "rare", "common"] * 12)]
    (tmp_path / "c.txt").write_text("\n".join(lines), encoding="utf-8")

    def count(shard):
        spec = CorpusSpec([str(tmp_path / "c.txt")], doc_mode="line", shard=shard)
        counter = NgramCounter(4, vocab_size=tok.vocab_size, buffer_tokens=200, spill_bytes=0)
        for batch in iter_tokenized(spec, tok.tokenizer, batch_size=7):
            counter.add_many(batch)
        return counter.finish()

    whole = count(None)
    merged = merge_stats([count((i, 3)) for i in range(3)])
    assert merged.documents == whole.documents == len(lines)
    for n in range(1, 5):
        assert np.array_equal(merged.ngrams[n], whole.ngrams[n]) and np.array_equal(merged.counts[n], whole.counts[n])


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    stats = count_ngrams(random_docs(rng, 1000), 3, 1000)
    files = stats.save(tmp_path / "s")
    assert sorted(p.name for p in files) == ["ngram_stats.json", "ngrams_1.parquet", "ngrams_2.parquet",
                                             "ngrams_3.parquet"]
    back = NgramStats.load(tmp_path / "s")
    assert (back.max_n, back.vocab_size, back.documents, back.tokens) == \
        (stats.max_n, stats.vocab_size, stats.documents, stats.tokens)
    for n in (1, 2, 3):
        assert np.array_equal(back.ngrams[n], stats.ngrams[n]) and np.array_equal(back.counts[n], stats.counts[n])
    import pyarrow.parquet as pq

    assert pq.read_schema(tmp_path / "s" / "ngrams_2.parquet").names == ["id_0", "id_1", "count"]


def test_load_refuses_damaged_stats(tmp_path):
    stats = count_ngrams([np.array([1, 2, 3, 1, 2])], 2, 5)
    stats.save(tmp_path / "s")
    (tmp_path / "s" / "ngrams_2.parquet").unlink()
    with pytest.raises(ArtifactError, match="ngrams_2.parquet is missing"):
        NgramStats.load(tmp_path / "s")
    stats.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "ngram_stats.json").read_text())
    meta["orders"]["1"]["total"] += 1
    (tmp_path / "s" / "ngram_stats.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="ngrams_1.parquet is damaged"):
        NgramStats.load(tmp_path / "s")
    with pytest.raises(ArtifactError, match="no ngram_stats.json"):
        NgramStats.load(tmp_path)
