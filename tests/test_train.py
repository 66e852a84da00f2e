"""engram train: exact resume, learning, the cache, optimizer groups, the CLI end to end, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.core.errors import ArtifactError, ConfigError, InputError, TrainingError
from engram_cli.train import (
    Settings,
    TrainConfig,
    TrainSettings,
    load_settings,
    lr_factor,
    make_optimizers,
    parse_set,
    train,
)

from cli_asserts import one_red_line

ROOT = Path(__file__).resolve().parents[1]
SOTU = sorted(str(p) for p in (ROOT / "sample_data" / "sotu").glob("*.txt"))
runner = CliRunner()

#: a model small enough that a step takes milliseconds; 3000 tokens of two speeches
SETS = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.moe_num_experts=4",
        "model.moe_top_k=2", "model.moe_expert_hidden=32", "train.steps=6", "train.batch_size=4",
        "train.log_interval=1", "train.eval_interval=3", "train.eval_batches=2", "train.checkpoint_interval=3",
        "train.warmup_steps=2", "train.lr=1e-2", "data.max_tokens=3000", "data.val_chunk_tokens=128",
        "data.val_fraction=0.1", "data.min_count=1"]
CORPUS = SOTU[:2]
RUN_FILES = {"manifest.json", "config.json", "metrics.jsonl", "loss_curve.png", "ckpt/latest.json"} | {
    f"ckpt/step_000006/{f}" for f in ("model.safetensors", "optimizer.safetensors", "optimizer.json",
                                      "rng.safetensors", "subvocab.safetensors", "table_plan.json", "state.json")}


@pytest.fixture(scope="module")
def tables(tiny_tables) -> Path:
    return tiny_tables


def run(out: Path, tables: Path, *extra: str, progress=None, **kw):
    cfg = TrainConfig(out=out, tables=tables, sources=CORPUS, overrides=[*SETS, *extra],
                      cache_dir=out.parent / "cache", **kw)
    return train(cfg, progress=progress)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


def invoke(*args: str):
    return runner.invoke(app, ["train", *args])


# ---------------------------------------------------------------------------------------------
# resume, learning, cache


@pytest.mark.parametrize("store", ["memory", "mmap", "module"])
def test_resume_continues_exactly(tmp_path, tables, store):
    full = run(tmp_path / "full", tables, f"train.table_store={store}")

    def crash_after_step_4(task, completed, total=None, **info):
        if task == "train" and completed == 4:
            raise KeyboardInterrupt  # the process dies after step 4; the last checkpoint is step 3

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", tables, f"train.table_store={store}", progress=crash_after_step_4)
    assert [m["step"] for m in metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    resumed = train(TrainConfig(out=tmp_path / "cut", resume=True, cache_dir=tmp_path / "cache"))
    assert resumed.start_step == 3 and resumed.steps == 6

    keys = ("step", "loss", "aux_loss", "lr", "grad_norm", "val_loss")
    a = [tuple(m.get(k) for k in keys) for m in metrics(tmp_path / "full")]
    b = [tuple(m.get(k) for k in keys) for m in metrics(tmp_path / "cut")]
    assert a == b and len(a) == 6  # bit-for-bit the same losses, learning rates and gradient norms
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "full/ckpt/step_000006/model.safetensors")
    wb = load_file(tmp_path / "cut/ckpt/step_000006/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert full.val_loss == resumed.val_loss


def test_loss_decreases_below_unigram_entropy(tmp_path, tables):
    r = run(tmp_path / "run", tables, "train.steps=60", "train.eval_interval=60", "train.checkpoint_interval=60")
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert np.mean(losses[-10:]) < losses[0] - 1.0
    assert r.train_loss < r.unigram_entropy  # on the training text, below the unigram baseline
    assert r.val_loss < losses[0]


def test_second_run_reuses_the_token_cache(tmp_path, tables, monkeypatch):
    first = run(tmp_path / "a", tables, "train.steps=1")
    assert first.data["cache_hit"] is False
    import engram_cli.corpus.cache

    def no_tokenizing(*a, **k):
        raise AssertionError("the cached stream must be used")

    monkeypatch.setattr(engram_cli.corpus.cache, "iter_tokenized", no_tokenizing)
    second = run(tmp_path / "b", tables, "train.steps=1")
    assert second.data["cache_hit"] is True and second.data["cache"] == first.data["cache"]
    assert second.train_loss == first.train_loss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tables, monkeypatch):
    from engram_cli.model.transformer import EngramModel
    from engram_cli.train import checkpoint

    forward = EngramModel.forward
    calls = {"train": 0}

    def poisoned(self, *a, **k):
        o = forward(self, *a, **k)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 5:
                o.loss, o.lm_loss = o.loss * float("nan"), o.lm_loss * float("nan")
        return o

    monkeypatch.setattr(EngramModel, "forward", poisoned)
    with pytest.raises(TrainingError, match="NaN/inf at step 5; the last good checkpoint is step 3") as e:
        run(tmp_path / "run", tables)
    assert "lower the learning rate" in e.value.hint
    assert checkpoint.read_checkpoint(tmp_path / "run").step == 3
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["summary"]["status"] == "failed" and m["summary"]["last_checkpoint"] == 3


# ---------------------------------------------------------------------------------------------
# optimizers and schedule


def _small_model():
    from engram_cli.model.config import ModelConfig
    from engram_cli.model.transformer import EngramModel
    from engram_cli.tables.plan import make_plan

    plan = make_plan(canonical_vocab_size=500, canonical_pad_id=0, original_vocab_size=600, layer_ids=(1,),
                     n_head_per_ngram=2, embed_dim_per_head=4, target_sizes=(101, 103))
    torch.manual_seed(0)
    return EngramModel(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, block_size=16,
                                   moe_num_experts=4, moe_expert_hidden=16), plan)


def test_optimizer_groups_and_sparse_update():
    model = _small_model()
    ts = TrainSettings(lr=1e-3, weight_decay=0.1)
    opts = make_optimizers(model, ts)
    adamw, sparse = opts["adamw"], opts["sparse_adam"]
    assert isinstance(sparse, torch.optim.SparseAdam) and isinstance(adamw, torch.optim.AdamW)
    tables = model.engram_table_parameters()
    assert [id(p) for p in sparse.param_groups[0]["params"]] == [id(p) for p in tables]
    assert sparse.param_groups[0]["lr"] == pytest.approx(5e-3) and "weight_decay" not in sparse.param_groups[0]
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert in_adamw == {id(p) for p in model.dense_parameters()} and not in_adamw & {id(p) for p in tables}

    idx = torch.randint(0, 64, (2, 16))
    canon = torch.randint(0, 500, (2, 16))
    before = tables[0].detach().clone()
    out = model(idx, canonical_ids=canon, targets=idx)
    out.loss.backward()
    assert tables[0].grad.is_sparse
    for o in opts.values():
        o.step()
    touched = (model.engram_slots(canon)[1] + model.blocks[1].engram.tables.offsets).unique()
    changed = torch.nonzero((tables[0].detach() != before).any(dim=1)).flatten()
    assert torch.equal(changed, touched)  # exactly the looked-up rows moved


def test_lr_schedule_warmup_then_cosine():
    ts = TrainSettings(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, ts) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert f[-1] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# configuration


def test_config_file_sets_and_errors(tmp_path):
    s = load_settings(ROOT / "configs" / "tiny.toml")
    assert s.model.n_layer == 4 and s.train.engram_lr_mult == 5.0 and s.data.min_count == 2
    s = load_settings(ROOT / "configs" / "tiny.toml", ["n_layer=6", "train.lr=1e-3", "data.max_tokens=none",
                                                        "doc_mode=line", "train.lr=2e-3"])
    assert s.model.n_layer == 6 and s.train.lr == 2e-3 and s.data.max_tokens is None and s.data.doc_mode == "line"
    assert parse_set("data.eos_token=<|end|>") == ("data.eos_token", "<|end|>")
    for bad, match in [("train.lrr=1", "unknown config key 'train.lrr'"), ("nope=1", "unknown config key"),
                       ("optim.lr=1", "unknown config section"), ("train.steps=1.5", "must be a int"),
                       ("model.vocab_size=10", "cannot be set"), ("lr", "key=value"),
                       ("model.block_size=2048", "val_chunk_tokens"), ("train.steps=0", ">= 1")]:
        with pytest.raises(ConfigError, match=match):
            load_settings(None, [bad])
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[optim]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[optim\]"):
        load_settings(bad_toml)
    with pytest.raises(InputError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_settings_load_without_tomllib(monkeypatch):
    """Python 3.10 has no tomllib: the config file and the --set values are read with tomli."""
    import tomli

    calls = []
    loads = tomli.loads
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` fails, as on Python 3.10
    monkeypatch.setattr(tomli, "loads", lambda text, **k: calls.append(text) or loads(text, **k))
    s = load_settings(ROOT / "configs" / "tiny.toml", ["train.lr=1e-3", "data.eos_token=<|end|>"])
    assert s.model.n_layer == 4 and s.train.lr == 1e-3 and s.data.eos_token == "<|end|>"
    assert len(calls) == 3  # the file and both --set values (the second is not TOML: a bare string)


def test_data_settings_build_the_corpus_spec():
    d = load_settings(None, ["data.text_column=body", "data.doc_mode=line", "data.max_tokens=500"]).data
    spec = d.corpus_spec(["a.txt", "b.jsonl"])
    assert (spec.sources, spec.text_column, spec.doc_mode, spec.max_tokens) == (["a.txt", "b.jsonl"], "body", "line", 500)
    with pytest.raises(ConfigError, match="data.doc_mode must be file or line, got 'bogus'"):
        load_settings(None, ["data.doc_mode=bogus"])


def test_run_config_json_reloads_as_config(tmp_path, tables):
    run(tmp_path / "run", tables, "train.steps=1")
    s = load_settings(tmp_path / "run" / "config.json")
    assert s.to_dict() == load_settings(None, [*SETS, "train.steps=1"]).to_dict()


# ---------------------------------------------------------------------------------------------
# the CLI end to end


def test_cli_end_to_end_with_allocation(tmp_path, tables):
    out = tmp_path / "run"
    args = [*CORPUS, "--tables", str(tables), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            *[x for s in SETS for x in ("--set", s)], "--set", "train.keep_checkpoints=1"]
    r = invoke(*args, "--allocation", "0.5", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    deltas = {f"table_deltas/step_00000{n}/layer_{layer}.delta.{ext}" for n in (3, 6) for layer in (1,)
              for ext in ("json", "safetensors")}  # a memory store run's deltas: never pruned
    assert files(out) == RUN_FILES | {"table_plan.json"} | deltas  # the derived plan; step 3 was pruned (keep 1)
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == ["run"]
    assert result["steps"] == 6 and result["val_loss"] < result["unigram_entropy"] + 3
    assert result["plan"]["source"] == "derived" and result["budget"]["moe_num_experts"] == 3

    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "engram.run" and m["summary"]["status"] == "finished"
    assert m["plan"]["source"] == "derived" and m["plan"]["file"] == "table_plan.json"
    for key in ("total", "activated", "engram_tables", "experts_routed", "dense"):
        assert m["budget"][key] == result["budget"][key] > 0
    ins = m["inputs"]
    assert {"tables", "vocab", "tokenizer", "corpus"} <= ins.keys()
    assert len(ins["tables"]["manifest_sha256"]) == len(ins["vocab"]["sha256"]) == len(ins["tokenizer"]["sha256"]) == 64
    assert ins["corpus"]["corpus_sha256"]
    assert set(m["files"]) == files(out) - {"manifest.json"}
    from engram_cli.core.artifacts import read_manifest

    read_manifest(out, "engram.run", verify_hashes=True)

    # the model loads back for inference with its sub-vocabulary and derived plan
    from engram_cli.tables.plan import TablePlan
    from engram_cli.train.runs import load_run

    loaded = load_run(out)
    assert loaded.step == 6 and loaded.plan == TablePlan.load(out / "table_plan.json")
    assert loaded.model.config.vocab_size == loaded.subvocab.size == result["data"]["model_vocab_size"]

    # rendered (not --json): the summary table and the budget
    r2 = invoke(*args, "--allocation", "0.5", "--force", "--quiet")
    assert r2.exit_code == 0, r2.output
    assert "validation loss" in r2.stdout and "unigram entropy" in r2.stdout and "Parameter budget" in r2.stdout


def test_cli_resume_and_refusals(tmp_path, tables):
    out = tmp_path / "run"
    base = [*CORPUS, "--tables", str(tables), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            *[x for s in SETS for x in ("--set", s)]]
    r = invoke(*base, "--set", "train.steps=3", "--quiet")
    assert r.exit_code == 0, r.output
    one_red_line(invoke(*base), "already exists", "--resume")
    # resuming with the run's own config and inputs, training further
    r = invoke("--out", str(out), "--resume", "--set", "train.steps=5", "--json", "--cache-dir", str(tmp_path / "cache"))
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert (result["start_step"], result["steps"]) == (3, 5)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]
    one_red_line(invoke("--out", str(out), "--resume", "--set", "train.lr=5e-2", "--cache-dir", str(tmp_path / "cache")),
                 "different configuration", "train.lr")
    one_red_line(invoke(*SOTU[2:4], "--tables", str(tables), "--out", str(out), "--resume",
                        "--cache-dir", str(tmp_path / "cache")), "another corpus")
    # a damaged checkpoint is refused with one line
    model_file = out / "ckpt" / "step_000005" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-10] ^= 0xFF
    model_file.write_bytes(bytes(data))
    one_red_line(invoke("--out", str(out), "--resume", "--cache-dir", str(tmp_path / "cache")),
                 "corrupt", "step_000005")
    one_red_line(invoke("--out", str(tmp_path / "none"), "--resume"), "no run to resume")


@pytest.mark.parametrize("extra,needles", [
    (["--allocation", "1.5"], ["allocation", "[0, 1]"]),
    (["--set", "model.moe_top_k=8"], ["moe_top_k (8) is larger than moe_num_experts (4)"]),
    (["--set", "model.n_head=3"], ["not divisible by n_head"]),
    (["--set", "model.n_layer=1"], ["outside the model's blocks"]),
    (["--set", "train.lrr=1"], ["unknown config key 'train.lrr'"]),
    (["--set", "data.doc_mode=bogus"], ["data.doc_mode must be file or line"]),
    (["--device", "tpu"], ["--device must be auto, cpu or cuda"]),
])
def test_cli_bad_input_one_line(tmp_path, tables, extra, needles):
    r = invoke(*CORPUS, "--tables", str(tables), "--out", str(tmp_path / "run"), "--cache-dir",
               str(tmp_path / "cache"), *[x for s in SETS for x in ("--set", s)], *extra)
    one_red_line(r, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cli_cuda_unavailable(tmp_path, tables):
    one_red_line(invoke(*CORPUS, "--tables", str(tables), "--out", str(tmp_path / "run"), "--device", "cuda"),
                 "CUDA is not available")


def test_tables_of_another_tokenizer_are_refused(tmp_path, tables):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    r = invoke(*CORPUS, "--tables", str(tables), "--out", str(tmp_path / "run"), "--tokenizer", str(path),
               *[x for s in SETS for x in ("--set", s)])
    one_red_line(r, "is not the one the tables", "were built with")


def test_force_refuses_a_directory_that_is_not_a_run(tmp_path, tables):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not an engram artifact.*--force replaces only .engram.run."):
        run(tmp_path / "precious", tables, force=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_settings_to_dict_has_no_vocab_size():
    assert "vocab_size" not in Settings().to_dict()["model"]


# ---------------------------------------------------------------------------------------------
# CPU threads (reproducibility)


def test_threads_are_applied_recorded_and_resumable(tmp_path, tables):
    import torch

    before = torch.get_num_threads()
    try:
        run(tmp_path / "one", tables, "train.threads=1", "train.steps=2")
        config = json.loads((tmp_path / "one" / "config.json").read_text())
        assert config["train"]["threads"] == 1 and config["run"]["cpu_threads"] == 1
        # a run recorded before the setting existed resumes as it ran (threads 0: torch's default)
        from engram_cli.train.settings import Settings, check_resume_settings

        old = {k: v for k, v in config.items() if k in ("model", "train", "data", "plan")}
        old["train"] = {k: v for k, v in old["train"].items() if k != "threads"}
        new = Settings.from_dict(old)
        assert new.train.threads == 0
        check_resume_settings(old, new, tmp_path / "old")  # no difference reported
        with pytest.raises(ConfigError, match="train.threads"):
            check_resume_settings(old, Settings.from_dict(config), tmp_path / "old")
    finally:
        torch.set_num_threads(before)


def test_threads_out_of_range_is_one_line(tmp_path, tables):
    with pytest.raises(ConfigError, match="train.threads"):
        run(tmp_path / "r", tables, "train.threads=-1")
