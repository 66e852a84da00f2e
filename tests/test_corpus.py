"""Corpus readers (every format), the bad-input policy, sharding, max_tokens and fingerprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engram_cli.core.errors import ConfigError, InputError
from engram_cli.corpus.spec import CorpusSpec, CorpusStats, parse_shard, resolve_sources
from engram_cli.corpus.stream import corpus_fingerprint, iter_documents, iter_tokenized


def docs_of(*sources, **options) -> list[str]:
    return list(iter_documents(CorpusSpec([str(s) for s in sources], **options)))


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "b.txt").write_text("second file\nits second line\n", encoding="utf-8")
    (d / "a.md").write_text("first file\n\n  \nlast line", encoding="utf-8")
    (d / "notes.csv").write_text("ignored,in,directories\n", encoding="utf-8")
    (d / ".hidden.txt").write_text("hidden files are ignored\n", encoding="utf-8")
    sub = d / "sub"
    sub.mkdir()
    (sub / "c.txt").write_text("nested\n", encoding="utf-8")
    return d


# -- formats -----------------------------------------------------------------------------------


def test_text_file_and_line_modes(text_dir):
    assert docs_of(text_dir) == ["first file\n\n  \nlast line", "second file\nits second line\n", "nested\n"]
    assert docs_of(text_dir, doc_mode="line") == ["first file", "last line", "second file",
                                                  "its second line", "nested"]


def test_bom_and_crlf(tmp_path):
    p = tmp_path / "win.txt"
    p.write_bytes("\ufeffone\r\ntwo\r\n".encode("utf-8"))
    assert docs_of(p, doc_mode="line") == ["one", "two"]
    assert docs_of(p) == ["one\r\ntwo\r\n"]


def test_globs_sorted_and_sources_in_given_order(text_dir):
    assert docs_of(text_dir / "*.txt", text_dir / "a.md", doc_mode="line")[:3] == \
        ["second file", "its second line", "first file"]
    assert docs_of(str(text_dir / "**" / "*.txt")) == ["second file\nits second line\n", "nested\n"]
    # a file reached twice is read once
    assert len(docs_of(text_dir / "b.txt", text_dir / "*.txt")) == 1


def test_jsonl_and_json_array(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"text": "alpha", "id": 1}, {"text": None}, {"text": ""}, {"text": "beta"}])
    assert docs_of(p) == ["alpha", "beta"]
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"body": "x y"}, {"body": "z"}]), encoding="utf-8")
    assert docs_of(arr, text_column="body") == ["x y", "z"]


def test_parquet_in_record_batches(tmp_path):
    p = tmp_path / "d.parquet"
    texts = [f"row {i}" for i in range(2500)] + [None]
    pq.write_table(pa.table({"content": texts, "n": list(range(2501))}), p, row_group_size=700)
    assert docs_of(p, text_column="content") == texts[:-1]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one", "two", ""], "label": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert docs_of(tmp_path / "ds") == ["one", "two"]
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"text": ["v"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert docs_of(tmp_path / "dd", hf_split="validation") == ["v"]
    with pytest.raises(InputError, match="no split 'test'.*train, validation"):
        docs_of(tmp_path / "dd", hf_split="test")
    # inside a walked directory, a saved dataset is one source
    (tmp_path / "mix").mkdir()
    shutil.copytree(tmp_path / "ds", tmp_path / "mix" / "ds")
    (tmp_path / "mix" / "a.txt").write_text("text file", encoding="utf-8")
    assert [s.kind for s in resolve_sources(CorpusSpec([str(tmp_path / "mix")]))] == ["text", "hf_disk"]


def test_hub_dataset_error_path(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputError, match="cannot open hub dataset hf:org/name:cfg") as e:
        docs_of("hf:org/name:cfg")
    assert "save_to_disk" in e.value.hint


# -- bad input ---------------------------------------------------------------------------------


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(InputError, match="nowhere.txt does not exist"):
        iter_documents(CorpusSpec([str(tmp_path / "nowhere.txt")]))  # raised at once, not on next()
    with pytest.raises(InputError, match="no file matches"):
        docs_of(tmp_path / "*.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported file type '.csv'"):
        docs_of(tmp_path / "x.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="holds no corpus files"):
        docs_of(tmp_path / "empty_dir")


def test_missing_column_names_the_columns(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"title": "t", "body": "b", "n": 3}])
    with pytest.raises(InputError) as e:
        docs_of(p)
    assert "no column 'text' (columns: title, body, n)" in e.value.message
    assert e.value.hint.startswith("pass --text-column title")
    q = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x"], "n": [1]}), q)
    with pytest.raises(InputError, match=r"no column 'text' \(columns: content, n\)") as e:
        docs_of(q)
    assert e.value.hint == "pass --text-column content"
    with pytest.raises(InputError, match="holds int64, not text"):
        docs_of(q, text_column="n")


def test_non_utf8_file_skipped_and_counted_or_refused(tmp_path):
    (tmp_path / "good.txt").write_text("fine\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\nsecond\n".encode("latin-1"))
    (tmp_path / "z.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    for mode in ("file", "line"):
        stats = CorpusStats()
        docs = list(iter_documents(CorpusSpec([str(tmp_path)], doc_mode=mode), stats))
        assert docs == (["fine\n"] if mode == "file" else ["fine"])  # nothing of a bad file leaks
        assert [(p.split("/")[-1], r.split(" (")[0]) for p, r in stats.skipped_files] == \
            [("latin1.txt", "not valid UTF-8"), ("z.jsonl", "not valid UTF-8")]
        assert stats.files == 1
    with pytest.raises(InputError, match="latin1.txt: not valid UTF-8 \\(byte 3\\)"):
        docs_of(tmp_path, skip_bad_files=False)


def test_bad_json_records_counted_or_refused(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\nnot json\n[1, 2]\n{"text": 5}\n{"text": "b"}\n', encoding="utf-8")
    stats = CorpusStats()
    assert list(iter_documents(CorpusSpec([str(p)]), stats)) == ["a", "b"]
    assert stats.bad_records == 3 and stats.bad_record_examples[0][0].endswith("d.jsonl:2")
    with pytest.raises(InputError, match="d.jsonl:2: not valid JSON"):
        docs_of(p, skip_bad_files=False)


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match="corpus is empty"):
        docs_of(tmp_path / "blank.txt")
    with pytest.raises(InputError, match="corpus is empty for shard 3/4: the corpus has only 2 documents"):
        (tmp_path / "two.txt").write_text("a\nb\n", encoding="utf-8")
        docs_of(tmp_path / "two.txt", doc_mode="line", shard=(3, 4))


def test_spec_validation():
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1", "a/b", "-1/3"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    with pytest.raises(ConfigError):
        CorpusSpec(["x"], doc_mode="page")
    with pytest.raises(ConfigError):
        CorpusSpec(["x"], shard=(3, 3))
    with pytest.raises(ConfigError):
        CorpusSpec([])


# -- sharding, tokenization, fingerprints --------------------------------------------------------


def test_shards_partition_the_documents_deterministically(tmp_path):
    lines = [f"line {i}" for i in range(50)]
    (tmp_path / "a.txt").write_text("\n".join(lines[:20]) + "\n\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in lines[20:]])
    full = docs_of(tmp_path, doc_mode="line")
    assert full == lines
    shards = [docs_of(tmp_path, doc_mode="line", shard=(i, 3)) for i in range(3)]
    for i, shard in enumerate(shards):
        assert shard == full[i::3]
        assert shard == docs_of(tmp_path, doc_mode="line", shard=(i, 3))
    stats = CorpusStats()
    list(iter_documents(CorpusSpec([str(tmp_path)], doc_mode="line", shard=(1, 3)), stats))
    assert (stats.documents, stats.documents_seen) == (17, 50)


@pytest.fixture(scope="module")
def tokenizer():
    from engram_cli.vocab.tokenizer import load_tokenizer

    return load_tokenizer("deepseek").tokenizer


def test_iter_tokenized_matches_the_tokenizer(tmp_path, tokenizer):
    texts = [f"The {i}th sentence of a small corpus, with 数字 {i * 7}." for i in range(40)]
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    calls = []
    stats = CorpusStats()
    batches = list(iter_tokenized(CorpusSpec([str(tmp_path)]), tokenizer, stats=stats, batch_size=16,
                                  progress=lambda task, done, total=None, **info: calls.append((task, done, total, info))))
    assert [len(b) for b in batches] == [16, 16, 8]
    got = [a for b in batches for a in b]
    assert all(a.dtype == np.int32 for a in got)
    assert [a.tolist() for a in got] == [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert stats.tokens == sum(map(len, got)) and stats.documents == 40
    assert calls[-1] == ("tokenize", stats.tokens, None, {"documents": 40, "tokens": stats.tokens, "skipped_files": 0})


def test_max_tokens_truncates_and_stops_reading(tmp_path, tokenizer):
    texts = [f"document number {i} says hello to the world" for i in range(100)]
    (tmp_path / "d.txt").write_text("\n".join(texts), encoding="utf-8")
    full = [a for b in iter_tokenized(CorpusSpec([str(tmp_path)], doc_mode="line"), tokenizer, batch_size=8) for a in b]
    flat = np.concatenate(full)
    for limit in (1, len(full[0]), 25, 61):
        stats = CorpusStats()
        spec = CorpusSpec([str(tmp_path)], doc_mode="line", max_tokens=limit)
        got = [a for b in iter_tokenized(spec, tokenizer, stats=stats, batch_size=8) for a in b]
        assert sum(map(len, got)) == limit == stats.tokens
        assert np.array_equal(np.concatenate(got), flat[:limit])
        assert [len(a) for a in got[:-1]] == [len(a) for a in full[:len(got) - 1]]  # only the last is cut
        assert stats.documents == len(got) and stats.documents_seen <= 16  # read at most two batches


def test_corpus_fingerprint(tmp_path):
    src = tmp_path / "one"
    src.mkdir()
    (src / "a.txt").write_text("alpha\n", encoding="utf-8")
    (src / "b.jsonl").write_text('{"text": "beta"}\n', encoding="utf-8")
    fp = corpus_fingerprint(CorpusSpec([str(src)], shard=(0, 2)))
    assert [(f["path"].split("/")[-1], f["bytes"]) for f in fp["files"]] == [("a.txt", 6), ("b.jsonl", 17)]
    assert len(fp["files"][0]["sha256"]) == 64 and fp["shard"] == [0, 2]
    moved = shutil.copytree(src, tmp_path / "elsewhere")
    assert corpus_fingerprint(CorpusSpec([str(moved)]))["corpus_sha256"] == fp["corpus_sha256"]
    assert corpus_fingerprint(CorpusSpec([str(moved)], doc_mode="line"))["corpus_sha256"] != fp["corpus_sha256"]
    (moved / "a.txt").write_text("alpha!\n", encoding="utf-8")
    assert corpus_fingerprint(CorpusSpec([str(moved)]))["corpus_sha256"] != fp["corpus_sha256"]
    assert corpus_fingerprint(CorpusSpec(["hf:org/name"]))["hub"] == [{"name": "org/name", "config": None, "split": "train"}]


def test_long_documents_are_tokenized_in_exact_pieces(tmp_path, deepseek, monkeypatch):
    """A huge document goes through the tokenizer in pieces (bounded memory) with the same ids."""
    import engram_cli.corpus.stream as corpus

    root = Path(__file__).resolve().parents[1] / "sample_data"
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((root / "sotu").glob("*.txt"))[:3])
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    (tmp_path / "one_line.txt").write_text(text.replace("\n", " "), encoding="utf-8")
    seen = []
    real = deepseek.tokenizer

    class Spy:
        def encode_batch(self, texts, add_special_tokens=False):
            seen.append(sum(map(len, texts)))
            return real.encode_batch(texts, add_special_tokens=add_special_tokens)

    monkeypatch.setattr(corpus, "PIECE_CHARS", 3000)
    for name in ("big.txt", "one_line.txt"):
        seen.clear()
        got = [a for b in iter_tokenized(CorpusSpec([str(tmp_path / name)]), Spy(), batch_bytes=10_000) for a in b]
        doc = (tmp_path / name).read_text(encoding="utf-8")
        assert len(got) == 1 and got[0].tolist() == real.encode(doc, add_special_tokens=False).ids
        assert len(seen) > 5 and max(seen) <= 10_000  # never the whole document at once


def test_encode_batch_fast_gives_the_ids_of_encode_batch(deepseek):
    """iter_tokenized uses encode_batch_fast (no offsets) when the tokenizer has it: same ids."""
    root = Path(__file__).resolve().parents[1] / "sample_data"
    spec = CorpusSpec([str(root / "zh_classics.jsonl"), *sorted(str(p) for p in (root / "sotu").glob("*.txt"))[:2]])
    real = deepseek.tokenizer
    assert hasattr(real, "encode_batch_fast")

    class Plain:  # a tokenizer without the fast call
        def encode_batch(self, texts, add_special_tokens=False):
            return real.encode_batch(texts, add_special_tokens=add_special_tokens)

    fast = [a.tolist() for b in iter_tokenized(spec, real, batch_size=64) for a in b]
    plain = [a.tolist() for b in iter_tokenized(spec, Plain(), batch_size=64) for a in b]
    assert fast == plain and len(fast) > 800


def test_a_tokenizer_that_cannot_encode_is_one_error(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"known": 0}))  # no unk_token: unknown words fail to encode
    tok.pre_tokenizer = Whitespace()
    (tmp_path / "a.txt").write_text("known unknown", encoding="utf-8")
    with pytest.raises(InputError, match="tokenizer cannot encode this corpus.*unk_token"):
        list(iter_tokenized(CorpusSpec([str(tmp_path)]), tok))
