"""Presets of published table configurations and --plan-only (engram_cli.tables.presets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.core.errors import ConfigError
from engram_cli.tables.build import BuildTablesConfig, build_tables
from engram_cli.tables.plan import TablePlan, make_plan, row_bytes
from engram_cli.tables.presets import PRESETS, resolve_plan_options
from engram_cli.tables.sizing import target_size_for_memory_budget

from cli_asserts import one_red_line

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def preset_plan(name: str, vocab) -> TablePlan:
    o = PRESETS[name].plan_options()
    targets = None if o["target_size"] is None else (o["target_size"],) * (o["max_ngram_size"] - 1)
    return make_plan(canonical_vocab_size=vocab.canonical_vocab_size, canonical_pad_id=int(vocab.table[o["pad_id"]]),
                     original_vocab_size=vocab.original_vocab_size, pad_id=o["pad_id"], layer_ids=o["layer_ids"],
                     max_ngram_size=o["max_ngram_size"], n_head_per_ngram=o["n_head_per_ngram"],
                     target_sizes=targets, seed=o["seed"], embed_dim_per_head=o["embed_dim_per_head"])


def test_v41_flash_reproduces_the_published_table_sizes(vocab):
    plan = preset_plan("deepseek-v4.1-flash", vocab)
    assert plan.total_slots(1) == 384_006_168 and plan.total_slots(14) == 384_016_682
    assert plan.total_heads == 24 and plan.embed_dim_per_head == 256
    assert row_bytes("fp8-e4m3-ue8m0", 256) == 264  # 256 fp8 values + 8 ue8m0 scales
    gib = plan.memory_bytes("fp8-e4m3-ue8m0") / 2**30
    assert 188 < gib < 190


def test_v3_demo_is_the_default(vocab):
    assert make_plan(canonical_vocab_size=vocab.canonical_vocab_size, canonical_pad_id=int(vocab.table[2]),
                     original_vocab_size=vocab.original_vocab_size) == preset_plan("deepseek-v3-demo", vocab)
    assert resolve_plan_options(None, {}) == PRESETS["deepseek-v3-demo"].plan_options()
    assert BuildTablesConfig(vocab=".", out="x", plan_only=True).layer_ids == (1, 15)


def test_given_options_must_agree_with_the_preset():
    assert resolve_plan_options("deepseek-v4.1-flash", {"layer_ids": [1, 14], "seed": None})["layer_ids"] == (1, 14)
    with pytest.raises(ConfigError, match="sets --heads-per-ngram 8, but --heads-per-ngram 4 was given"):
        resolve_plan_options("deepseek-v4.1-flash", {"n_head_per_ngram": 4})
    with pytest.raises(ConfigError, match="unknown preset 'v5'"):
        resolve_plan_options("v5", {})
    assert resolve_plan_options(None, {"n_head_per_ngram": 4})["n_head_per_ngram"] == 4  # no preset: free


def test_memory_budget_in_scaled_fp8():
    m = target_size_for_memory_budget(10 * 2**30, n_layers=2, n_orders=3, n_heads=8, embed_dim_per_head=256,
                                      dtype="fp8-e4m3-ue8m0")
    assert 48 * m * 264 <= 10 * 2**30 < 48 * (m + 2000) * 264


def test_plan_only_cli_writes_the_plan_and_memory(tmp_path, vocab_dir):
    out = tmp_path / "plan"
    r = runner.invoke(app, ["build-tables", "--preset", "deepseek-v4.1-flash", "--plan-only", "--vocab",
                            str(vocab_dir), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kind"] == "plan" and doc["published_rows"]["14"] == {"plan": 384_016_682, "published": 384_016_682}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "table_plan.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "engram.plan" and manifest["config"]["preset"] == "deepseek-v4.1-flash"
    assert manifest["summary"]["memory_bytes"]["fp8-e4m3-ue8m0"] == 768_022_850 * 264
    assert TablePlan.load(out / "table_plan.json").preset == "deepseek-v4.1-flash"


def test_plan_only_says_what_training_takes_and_when_mmap_is_advised(tmp_path, vocab_dir, monkeypatch):
    from engram_cli.tables import build

    args = ["build-tables", "--preset", "deepseek-v4.1-flash", "--plan-only", "--vocab", str(vocab_dir)]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--json"])
    tm = json.loads(r.stdout)["train_memory"]
    rows, D = 768_022_850, 256
    assert tm["train_bytes"] == {"adam": rows * 3 * D * 4, "rowwise-adagrad": rows * (D * 4 + 4)}
    monkeypatch.setattr(build, "ram_available", lambda: 2**40)  # 1 TiB free: 2.1 TiB with Adam is more than half
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "training (float32 + optimizer state): adam 2.1 TiB" in r.stdout and "(1.0 TiB RAM available)" in r.stdout
    assert "train with --table-store mmap" in r.stdout
    monkeypatch.setattr(build, "ram_available", lambda: 2**43)  # 8 TiB: fits
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "c")])
    assert r.exit_code == 0 and "training (float32" in r.stdout and "--table-store mmap" not in r.stdout


@pytest.mark.parametrize("args,needles", [
    (["--preset", "v9"], ["unknown preset 'v9'"]),
    (["--preset", "deepseek-v4.1-flash", "--max-ngram-size", "3"], ["sets --max-ngram-size 4", "drop --preset"]),
    (["--preset", "deepseek-v4.1-flash", "--memory-budget", "1GB"], ["fixes the table size"]),
    (["--target-collision-rate", "0.1"], ["needs the corpus's n-gram counts"]),
    (["corpus.txt"], ["--plan-only reads no corpus"]),
])
def test_plan_only_bad_input(tmp_path, vocab_dir, args, needles):
    one_red_line(runner.invoke(app, ["build-tables", "--plan-only", "--vocab", str(vocab_dir), "--out",
                                     str(tmp_path / "p"), *args]), *needles)
    assert not (tmp_path / "p").exists()


def test_a_full_build_records_the_preset(tmp_path, vocab_dir):
    from engram_cli.corpus.spec import CorpusSpec

    with pytest.raises(ConfigError, match="sets --target-size"):
        BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "t", preset="deepseek-v3-demo", target_size=1009)
    r = build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "t", corpus=CorpusSpec([str(ROOT / "sample_data" / "sentences.txt")]),
                                       preset="deepseek-v3-demo"))
    assert r.plan.preset == "deepseek-v3-demo" and r.published_rows == {}
