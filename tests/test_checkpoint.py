"""Checkpoints: safetensors + JSON round trips, atomic writes, pruning, corruption detection."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_cli.core.errors import ArtifactError
from engram_cli.model.config import ModelConfig
from engram_cli.model.transformer import EngramModel
from engram_cli.tables.plan import make_plan
from engram_cli.train import TrainSettings, checkpoint, make_optimizers

PLAN = make_plan(canonical_vocab_size=500, canonical_pad_id=0, original_vocab_size=600, layer_ids=(1,),
                 n_head_per_ngram=2, embed_dim_per_head=4, target_sizes=(101, 103))
SUBVOCAB = np.array([0, 1, 5, 7, 42], dtype=np.int64)


def model_and_optimizers(seed: int = 0):
    torch.manual_seed(seed)
    model = EngramModel(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, block_size=16,
                                    moe_num_experts=4, moe_expert_hidden=16), PLAN)
    return model, make_optimizers(model, TrainSettings(lr=1e-2))


def train_steps(model, opts, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 64, (2, 16), generator=g)
        canon = torch.randint(0, 500, (2, 16), generator=g)
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        model(idx, canonical_ids=canon, targets=idx).loss.backward()
        for o in opts.values():
            o.step()


def save(run: Path, step: int, model, opts, keep: int = 3) -> Path:
    return checkpoint.save_checkpoint(run, step, model=model, optimizers=opts, sparse_optimizers=("sparse_adam",),
                                      subvocab_ids=SUBVOCAB, plan=PLAN, state={"note": "test"}, keep=keep)


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_optimizer_state_round_trip_is_exact_and_sparse():
    model, opts = model_and_optimizers()
    train_steps(model, opts, 3)
    for name, opt in opts.items():
        sd = opt.state_dict()
        tensors, meta = checkpoint.optimizer_state_to_tensors(sd, name, sparse_rows=name == "sparse_adam")
        meta = json.loads(json.dumps(meta))  # what optimizer.json holds
        back = checkpoint.optimizer_state_from_tensors(tensors, meta)
        assert back["param_groups"] == sd["param_groups"]
        assert sd["state"].keys() == back["state"].keys()
        for pid in sd["state"]:
            assert same_state(sd["state"][pid], back["state"][pid])
    # SparseAdam's moments are stored as the touched rows only
    tensors, _ = checkpoint.optimizer_state_to_tensors(opts["sparse_adam"].state_dict(), "s", sparse_rows=True)
    rows = tensors["s.0.exp_avg_sq.rows"]
    assert 0 < rows.numel() < PLAN.total_slots_all and "s.0.exp_avg_sq" not in tensors


def test_save_load_and_continue_identically(tmp_path):
    model, opts = model_and_optimizers()
    train_steps(model, opts, 2)
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    path = save(tmp_path, 2, model, opts)
    assert path == tmp_path / "ckpt" / "step_000002"
    expected_rng = (torch.rand(3), np.random.rand(3), random.random())
    train_steps(model, opts, 2, seed=5)

    fresh, fresh_opts = model_and_optimizers(seed=99)
    ck = checkpoint.read_checkpoint(tmp_path)
    assert ck.step == 2 and ck.state["note"] == "test"
    fresh.load_state_dict(ck.model_state())
    ck.restore_optimizers(fresh_opts)
    ck.restore_rng()
    assert torch.equal(torch.rand(3), expected_rng[0]) and np.array_equal(np.random.rand(3), expected_rng[1])
    assert random.random() == expected_rng[2]
    assert ck.plan() == PLAN and np.array_equal(ck.subvocab_ids(), SUBVOCAB)
    train_steps(fresh, fresh_opts, 2, seed=5)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    from safetensors import safe_open

    model, opts = model_and_optimizers()
    train_steps(model, opts, 1)
    path = save(tmp_path, 1, model, opts)
    for p in path.iterdir():
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            assert p.suffix == ".safetensors"
            with safe_open(str(p), "pt") as f:
                assert list(f.keys())
    assert "torch.save" not in Path(checkpoint.__file__).read_text()
    assert "pickle" not in Path(checkpoint.__file__).read_text().replace("no pickle", "")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    model, opts = model_and_optimizers()
    train_steps(model, opts, 1)
    save(tmp_path, 3, model, opts)
    train_steps(model, opts, 1)
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def dies_on_the_second_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"half a file")
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", dies_on_the_second_file)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 6, model, opts)
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.json", "step_000003"]
    ck = checkpoint.read_checkpoint(tmp_path)
    assert ck.step == 3
    fresh, fresh_opts = model_and_optimizers(seed=5)
    fresh.load_state_dict(ck.model_state())
    ck.restore_optimizers(fresh_opts)


def test_a_killed_writer_leaves_a_temp_dir_that_is_ignored_then_removed(tmp_path):
    model, opts = model_and_optimizers()
    save(tmp_path, 3, model, opts)
    junk = tmp_path / "ckpt" / ".step_000006.tmp-4242-abcdefgh"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [3]
    assert checkpoint.read_checkpoint(tmp_path).step == 3
    checkpoint.recover_checkpoints(tmp_path)
    assert not junk.exists()


def test_keep_last_k(tmp_path):
    model, opts = model_and_optimizers()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opts, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [3, 4]
    assert checkpoint.latest_step(tmp_path) == 4
    ck = checkpoint.read_checkpoint(tmp_path, 3)
    assert ck.step == 3
    with pytest.raises(ArtifactError, match="no checkpoint at step 1 .checkpoints: 3, 4"):
        checkpoint.read_checkpoint(tmp_path, 1)


@pytest.mark.parametrize("damage,match", [
    (lambda p: p.joinpath("model.safetensors").write_bytes(p.joinpath("model.safetensors").read_bytes()[:-7]),
     "corrupt: model.safetensors changed"),
    (lambda p: p.joinpath("optimizer.safetensors").unlink(), "incomplete: optimizer.safetensors is missing"),
    (lambda p: p.joinpath("state.json").write_text("{"), "incomplete or corrupt: state.json"),
    (lambda p: p.parent.joinpath("latest.json").write_text("nonsense"), "latest.json is corrupt"),
])
def test_damaged_checkpoints_are_refused(tmp_path, damage, match):
    model, opts = model_and_optimizers()
    path = save(tmp_path, 2, model, opts)
    damage(path)
    with pytest.raises(ArtifactError, match=match):
        checkpoint.read_checkpoint(tmp_path)


def test_unreadable_safetensors_is_one_clear_error(tmp_path):
    model, opts = model_and_optimizers()
    path = save(tmp_path, 2, model, opts)
    size = (path / "rng.safetensors").stat().st_size
    (path / "rng.safetensors").write_bytes(b"\xff" * size)  # same size: only the hash would tell
    with pytest.raises(ArtifactError, match="changed after it was written"):
        checkpoint.read_checkpoint(tmp_path)
    ck = checkpoint.read_checkpoint(tmp_path, verify=False)  # (inference skips hashing for speed)
    with pytest.raises(ArtifactError, match="corrupt: rng.safetensors cannot be read"):
        ck.restore_rng()
