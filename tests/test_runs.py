"""runs.load_run: a run directory read and validated in one place; a checkpoint of another run,
changed inputs and a plan that is not the run's are refused with one clear ArtifactError."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engram_cli.core.errors import ArtifactError
from engram_cli.train.runs import LoadedRun, check_vocab_fit, load_run, plan_fingerprint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_tiny_run) -> Path:
    """A 2-step run with Engram at block 1; checkpoints at steps 1 and 2."""
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "run")


@pytest.fixture(scope="module")
def other_run_dir(tmp_path_factory, train_tiny_run) -> Path:
    """Another run on the same inputs, with another seed."""
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "other", "train.seed=1", "train.steps=1")


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def edit_json(path: Path, edit, run: Path | None = None) -> None:
    """Change a JSON file; with ``run``, record its new size and sha256 in the run's manifest too
    (so that only load_run's own checks can tell)."""
    from engram_cli.core.artifacts import sha256_file

    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    if run is not None:
        rel = path.relative_to(run).as_posix()
        edit_json(run / "manifest.json", lambda m: m["files"].__setitem__(
            rel, {"bytes": path.stat().st_size, "sha256": sha256_file(path)}))


def test_load_run_reads_everything_a_reader_needs(run_dir):
    run = load_run(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert isinstance(run, LoadedRun) and run.step == 2 and run.label == "run (step 2)"
    assert run.layer_ids == (1,) == run.model.engram_layer_ids and run.hc_mult == 1 and run.block_size == 32
    assert not run.model.training and run.model.config == run.model_config
    assert run.tokenizer.fingerprint == manifest["inputs"]["tokenizer"]["sha256"]
    assert run.vocab.fingerprint == manifest["inputs"]["vocab"]["sha256"]
    assert plan_fingerprint(run.plan) == manifest["plan"]["sha256"] == run.checkpoint.state["fingerprints"]["plan"]
    assert run.config == json.loads((run_dir / "config.json").read_text())
    assert run.tokenizer.tokenizer.id_to_token(run.separator_id) == "<｜end▁of▁sentence｜>"
    ids = np.array([run.separator_id, run.vocab.original_vocab_size - 1])  # a kept id, and one never seen
    assert run.to_model_ids(ids).tolist() == [int(np.searchsorted(run.subvocab.original_ids, run.separator_id)),
                                              run.unk_id]
    early = load_run(run_dir, step=1, with_model=False)
    assert early.step == 1 and early.model is None and early.checkpoint.path.name == "step_000001"


def test_a_checkpoint_of_another_run_is_refused(run_copy, other_run_dir):
    # the run's step 1 pruned (gone from disk and manifest), another run's step 1 dropped in its place
    shutil.rmtree(run_copy / "ckpt" / "step_000001")
    edit_json(run_copy / "manifest.json", lambda m: m.__setitem__(
        "files", {k: v for k, v in m["files"].items() if not k.startswith("ckpt/step_000001/")}))
    shutil.copytree(other_run_dir / "ckpt" / "step_000001", run_copy / "ckpt" / "step_000001")
    with pytest.raises(ArtifactError, match="step_000001 does not belong to run .*: its seed differs") as e:
        load_run(run_copy, step=1)
    assert "\n" not in str(e.value) and "--step" in e.value.hint
    assert load_run(run_copy, with_model=False).step == 2  # the run's own checkpoint still loads


@pytest.mark.parametrize("what,edit", [
    ("table plan", lambda s: s["fingerprints"].__setitem__("plan", "0" * 64)),
    ("corpus", lambda s: s["fingerprints"].__setitem__("corpus", "0" * 64)),
    ("parameter budget", lambda s: s["budget"].__setitem__("total", 1)),
    (r"\[model\] settings", lambda s: s["config"]["model"].__setitem__("n_embd", 64)),
    ("allocation", lambda s: s["config"]["run"].__setitem__("allocation", 0.5)),
])
def test_a_checkpoint_recording_another_identity_is_refused(run_copy, what, edit):
    edit_json(run_copy / "ckpt" / "step_000002" / "state.json", edit, run_copy)
    with pytest.raises(ArtifactError, match=f"does not belong to run .*: its {what} differs"):
        load_run(run_copy, with_model=False)


def test_a_checkpoint_holding_another_table_plan_or_subvocabulary_is_refused(run_copy):
    from engram_cli.core.artifacts import sha256_file

    ckpt = run_copy / "ckpt" / "step_000002"  # another plan, recorded consistently in the checkpoint
    plan = ckpt / "table_plan.json"
    edit_json(plan, lambda p: p.__setitem__("seed", p["seed"] + 1), run_copy)
    record = {"bytes": plan.stat().st_size, "sha256": sha256_file(plan)}
    edit_json(ckpt / "state.json", lambda s: s["files"].__setitem__("table_plan.json", record), run_copy)
    with pytest.raises(ArtifactError, match="its table plan is not the one run .* recorded"):
        load_run(run_copy)
    state = run_copy / "ckpt" / "step_000001" / "state.json"
    edit_json(state, lambda s: s["fingerprints"].__setitem__("subvocab", "0" * 64), run_copy)
    with pytest.raises(ArtifactError, match="its sub-vocabulary is not the one it was trained with"):
        load_run(run_copy, step=1, with_model=False)


def test_changed_inputs_and_missing_files_are_refused(run_copy):
    edit_json(run_copy / "manifest.json", lambda m: m["inputs"]["vocab"].__setitem__("sha256", "0" * 64))
    with pytest.raises(ArtifactError, match="trained with another vocab map"):
        load_run(run_copy)
    (run_copy / "config.json").unlink()
    edit_json(run_copy / "manifest.json", lambda m: m["files"].pop("config.json"))
    with pytest.raises(ArtifactError, match="run configuration .*config.json does not exist"):
        load_run(run_copy)
    with pytest.raises(ArtifactError, match="does not exist.*engram train"):
        load_run(run_copy / "nope")


def test_plan_or_tokenizer_that_does_not_fit_the_vocab(run_dir):
    run = load_run(run_dir, with_model=False)
    bad_plan = replace(run.plan, canonical_vocab_size=run.plan.canonical_vocab_size + 1)
    with pytest.raises(ArtifactError, match="table plan is for"):
        check_vocab_fit(run.name, bad_plan, run.tokenizer, run.vocab)
    vocab = type("V", (), {**{k: getattr(run.vocab, k) for k in ("canonical_vocab_size", "original_vocab_size",
                                                                  "table", "fingerprint")},
                           "tokenizer_fingerprint": "f" * 64})()
    with pytest.raises(ArtifactError, match="not the one its vocab map"):
        check_vocab_fit(run.name, run.plan, run.tokenizer, vocab)
