"""The token cache across stages: build-tables fills it in its one tokenizer pass, train reads it.

build-tables writes the entry while it counts, under exactly the key train computes for the same
corpus, tokenizer, vocab, max_tokens and separator; train right after it is a cache hit; a second
build-tables counts from the entry; the counts never change; shards and interrupted runs leave no
entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN_CORPUS, TINY_RUN_SETS
from typer.testing import CliRunner

import engram_cli.corpus.cache
import engram_cli.tables.build
from engram_cli.cli import app
from engram_cli.corpus.cache import (
    TokenCacheWriter,
    cache_key,
    find_token_cache,
    iter_cached_documents,
    load_or_build_token_cache,
    splits_into_documents,
)
from engram_cli.corpus.spec import CorpusSpec, CorpusStats
from engram_cli.corpus.stream import corpus_fingerprint, iter_tokenized
from engram_cli.tables.build import BuildTablesConfig, build_tables
from engram_cli.tables.counting import NgramCounter

from cli_asserts import one_red_line

runner = CliRunner()
MAX_TOKENS = 3000  # TINY_RUN_SETS' data.max_tokens: the key must agree


def tables_config(out: Path, vocab_dir: Path, **kw) -> BuildTablesConfig:
    kw.setdefault("corpus", CorpusSpec(list(TINY_RUN_CORPUS), max_tokens=MAX_TOKENS))
    return BuildTablesConfig(vocab=vocab_dir, out=out, layer_ids=(1,), n_head_per_ngram=2, embed_dim_per_head=8,
                             target_size=1009, **kw)


def entries(cache_dir: Path) -> list[str]:
    """Everything under the cache directory: complete entries and any temp directory."""
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def forbid_tokenizing(monkeypatch) -> None:
    def no_tokenizing(*a, **k):
        raise AssertionError("the corpus was tokenized again")

    monkeypatch.setattr(engram_cli.corpus.cache, "iter_tokenized", no_tokenizing)
    monkeypatch.setattr(engram_cli.tables.build, "iter_tokenized", no_tokenizing)


def artifact_bytes(d: Path) -> dict[str, bytes]:
    """Every file of a tables artifact; of the manifest, what does not name the run (its time, its
    --out and cache options, the cache entry it wrote or read)."""
    out = {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    m = json.loads(out.pop("manifest.json"))
    m["summary"].pop("token_cache")
    out["manifest.json"] = json.dumps({k: m[k] for k in ("format", "inputs", "files", "summary")},
                                      sort_keys=True).encode()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, vocab_dir):
    """build-tables on the tiny run corpus into ``<tmp>/tables`` (its cache: ``<tmp>/.engram-cache``)."""
    root = tmp_path_factory.mktemp("built")
    r = build_tables(tables_config(root / "tables", vocab_dir))
    return root, r


def test_build_tables_fills_the_cache_train_reads(built, vocab, deepseek):
    root, r = built
    c = r.token_cache
    assert c is not None and c["hit"] is False and Path(c["dir"]) == (root / ".engram-cache").resolve()
    assert entries(root / ".engram-cache") == [c["entry"]]  # one complete entry, no temp directory
    m = json.loads((root / "tables" / "manifest.json").read_text())
    assert m["summary"]["token_cache"] == c
    # the key is the one train computes from its own inputs (corpus, tokenizer, vocab, max_tokens, EOS)
    spec = CorpusSpec(list(TINY_RUN_CORPUS), max_tokens=MAX_TOKENS)
    assert c["key"] == cache_key(corpus_fingerprint(spec), deepseek.fingerprint, vocab.fingerprint, MAX_TOKENS, 1)


def test_stream_equals_the_one_train_builds(built, tmp_path, vocab, deepseek):
    root, r = built
    entry = Path(r.token_cache["dir"]) / r.token_cache["entry"]
    spec = CorpusSpec(list(TINY_RUN_CORPUS), max_tokens=MAX_TOKENS)
    fresh = load_or_build_token_cache(spec, deepseek, vocab, tmp_path / "elsewhere", eos_id=1)
    assert not fresh.hit and fresh.key == r.token_cache["key"] and fresh.path.name == entry.name
    assert (entry / "stream.npy").read_bytes() == (fresh.path / "stream.npy").read_bytes()
    ours, theirs = (json.loads((p / "meta.json").read_text()) for p in (entry, fresh.path))
    assert ours["tokens"] == theirs["tokens"] and ours["documents"] == theirs["documents"]


def test_train_after_build_tables_does_not_tokenize(built, monkeypatch):
    from engram_cli.train import TrainConfig, train

    root, r = built
    forbid_tokenizing(monkeypatch)
    result = train(TrainConfig(out=root / "run", tables=root / "tables", sources=list(TINY_RUN_CORPUS),
                               overrides=[*TINY_RUN_SETS, "train.steps=1"]))
    assert result.data["cache_hit"] is True
    assert Path(result.data["cache"]) == Path(r.token_cache["dir"]) / r.token_cache["entry"]


def test_train_elsewhere_reads_the_tables_cache(built, tmp_path, monkeypatch):
    """A run whose --out is not beside the tables (a sweep's runs) finds the entry the tables record."""
    from engram_cli.train import TrainConfig, train

    root, r = built
    forbid_tokenizing(monkeypatch)
    result = train(TrainConfig(out=tmp_path / "sweep" / "runs" / "a", tables=root / "tables",
                               sources=list(TINY_RUN_CORPUS), overrides=[*TINY_RUN_SETS, "train.steps=1"]))
    assert result.data["cache_hit"] is True
    assert not (tmp_path / "sweep" / "runs" / ".engram-cache").exists()
    run_config = json.loads((tmp_path / "sweep" / "runs" / "a" / "manifest.json").read_text())["config"]
    assert Path(run_config["run"]["cache_dir"]) == Path(r.token_cache["dir"])  # eval finds it there too


def test_second_build_counts_from_the_cache_and_counts_are_unchanged(built, tmp_path, vocab_dir, monkeypatch):
    root, first = built
    # the reference: the old path, tokenizing with no cache at all
    plain = build_tables(tables_config(tmp_path / "plain" / "tables", vocab_dir, cache_tokens=False))
    assert plain.token_cache is None and not (tmp_path / "plain" / ".engram-cache").exists()
    forbid_tokenizing(monkeypatch)
    again = build_tables(tables_config(tmp_path / "again", vocab_dir, cache_dir=root / ".engram-cache"))
    assert again.token_cache["hit"] is True and again.token_cache["key"] == first.token_cache["key"]
    assert (again.documents, again.tokens, again.orders) == (first.documents, first.tokens, first.orders)
    ref = artifact_bytes(tmp_path / "plain" / "tables")
    assert artifact_bytes(root / "tables") == ref
    assert artifact_bytes(tmp_path / "again") == ref


def test_cached_stream_splits_back_into_its_documents(tmp_path, deepseek, vocab):
    """iter_cached_documents gives the tokenizer's documents back, whatever the chunk size."""
    spec = CorpusSpec(list(TINY_RUN_CORPUS), doc_mode="line", max_tokens=2000)
    docs = [a for b in iter_tokenized(spec, deepseek.tokenizer) for a in b]
    cache = load_or_build_token_cache(spec, deepseek, vocab, tmp_path, eos_id=1)
    assert splits_into_documents(cache)
    for chunk in (7, 100, 1 << 20):
        got = [(ids, lengths) for ids, lengths in iter_cached_documents(cache, chunk_tokens=chunk)]
        lengths = np.concatenate([x[1] for x in got])
        assert lengths.tolist() == [len(d) for d in docs]
        np.testing.assert_array_equal(np.concatenate([x[0] for x in got]), np.concatenate(docs))


def test_end_of_document_id_inside_a_document_is_not_read_from_the_cache(tmp_path, vocab_dir, vocab, deepseek):
    """A document whose text holds the separator token cannot be split back: build-tables tokenizes."""
    eos_text = deepseek.tokenizer.id_to_token(1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(f"first part {eos_text} second part of one document", encoding="utf-8")
    (corpus / "b.txt").write_text("another document", encoding="utf-8")
    spec = CorpusSpec([str(corpus)])
    first = build_tables(tables_config(tmp_path / "t1", vocab_dir, corpus=spec))
    cache = find_token_cache(first.token_cache["dir"], first.token_cache["key"])
    assert cache is not None and not splits_into_documents(cache)
    again = build_tables(tables_config(tmp_path / "t2", vocab_dir, corpus=spec))
    assert again.token_cache["hit"] is False and again.token_cache["entry"] == first.token_cache["entry"]
    assert artifact_bytes(tmp_path / "t1") == artifact_bytes(tmp_path / "t2")


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_build_tables_leaves_no_cache_entry(tmp_path, vocab_dir, monkeypatch, error):
    add_batch = NgramCounter.add_batch
    calls = {"n": 0}

    def interrupted(self, ids, lengths):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error("stop")
        return add_batch(self, ids, lengths)

    monkeypatch.setattr(NgramCounter, "add_batch", interrupted)
    with pytest.raises(error):
        build_tables(tables_config(tmp_path / "tables", vocab_dir, batch_size=1,
                                   corpus=CorpusSpec(list(TINY_RUN_CORPUS), doc_mode="line", max_tokens=MAX_TOKENS)))
    assert calls["n"] == 2
    assert entries(tmp_path / ".engram-cache") == []  # no entry, no temp directory
    assert not (tmp_path / "tables").exists()


def test_writer_left_without_commit_leaves_nothing(tmp_path):
    with TokenCacheWriter(tmp_path / "c", "k" * 64, 1, "tok") as w:
        w.add([np.array([5, 6], dtype=np.int32)])
    assert entries(tmp_path / "c") == []
    with TokenCacheWriter(tmp_path / "c", "k" * 64, 1, "tok") as w:
        w.add([np.array([5, 6], dtype=np.int32), np.zeros(0, np.int32)])
        cache = w.commit(CorpusStats(documents=2, tokens=2))
    assert np.asarray(cache.stream).tolist() == [5, 6, 1] and cache.documents == 1
    assert entries(tmp_path / "c") == [cache.path.name]


def test_shards_neither_write_nor_read_the_cache(tmp_path, vocab_dir):
    shards = []
    for i in range(2):
        spec = CorpusSpec(list(TINY_RUN_CORPUS), shard=(i, 2))
        r = build_tables(tables_config(tmp_path / f"shard_{i}", vocab_dir, corpus=spec))
        assert r.token_cache is None
        shards.append(tmp_path / f"shard_{i}")
    merged = build_tables(tables_config(tmp_path / "tables", vocab_dir, corpus=None, from_shards=shards))
    assert merged.token_cache is None
    assert json.loads((tmp_path / "tables" / "manifest.json").read_text())["summary"]["token_cache"] is None
    assert not (tmp_path / ".engram-cache").exists()


def test_cli_cache_dir_and_its_bad_input(tmp_path, vocab_dir):
    args = ["build-tables", *TINY_RUN_CORPUS, "--max-tokens", "500", "--vocab", str(vocab_dir),
            "--layers", "1", "--heads-per-ngram", "2", "--embed-dim-per-head", "8", "--target-size", "1009"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "t"), "--cache-dir", str(tmp_path / "c"), "--json"])
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)["token_cache"]
    assert c["hit"] is False and entries(tmp_path / "c") == [c["entry"]]
    (tmp_path / "file").write_text("x")
    one_red_line(runner.invoke(app, [*args, "--out", str(tmp_path / "u"), "--cache-dir", str(tmp_path / "file")]),
                 "is a file, not a directory", "--cache-dir")
    assert not (tmp_path / "u").exists()


def test_writer_stream_is_what_np_save_writes(tmp_path):
    """The writer puts its header first and fixes it at commit: the file is np.save's, byte for byte,
    whether the batches come as documents or concatenated with their lengths."""
    import io

    docs = [np.array([5, 6, 7], np.int32), np.array([], np.int32), np.array([8], np.int32)]
    with TokenCacheWriter(tmp_path / "c", "a" * 64, 1, "tok") as w:
        w.add(docs)
        w.add_concatenated(np.array([9, 10, 11], np.int64), np.array([2, 0, 1]))
        w.add([])
        cache = w.commit(CorpusStats())
    expected = np.array([5, 6, 7, 1, 8, 1, 9, 10, 1, 11, 1], np.int32)
    buf = io.BytesIO()
    np.save(buf, expected)
    assert (cache.path / "stream.npy").read_bytes() == buf.getvalue()
    assert cache.stream.shape[0] == expected.shape[0]
    assert cache.documents == 4
