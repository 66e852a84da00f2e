"""Bad input, per stage, as a careless or hostile user gives it: every case ends with exit 1, ONE
line on stderr, no traceback, and whatever was on disk before unchanged (compared by hash)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engram_cli.cli import app

from cli_asserts import one_red_line

ROOT = Path(__file__).resolve().parents[1]
ZH = str(ROOT / "sample_data" / "zh_classics.jsonl")
runner = CliRunner()


def tree_hash(path: Path) -> str:
    """sha256 over every file's relative path and bytes below ``path`` (or of the file itself);
    the token cache (a ``cache`` directory, shared by runs by design) is left out."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and "cache" not in p.relative_to(path).parts)
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def refused(tmp_path: Path, args: list[str], *needles: str) -> None:
    """The command fails cleanly and nothing under tmp_path changed."""
    before = tree_hash(tmp_path)
    one_red_line(runner.invoke(app, args), *needles)
    assert tree_hash(tmp_path) == before


@pytest.fixture()
def user_dir(tmp_path) -> Path:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.txt").write_text("years of work")
    return d


@pytest.fixture()
def vocab_copy(tmp_path, vocab_dir) -> Path:
    return Path(shutil.copytree(vocab_dir, tmp_path / "vocab"))


@pytest.fixture()
def tables_copy(tmp_path, tiny_tables) -> Path:
    return Path(shutil.copytree(tiny_tables, tmp_path / "tables"))


# ---------------------------------------------------------------- normalize-vocab


def test_vocab_force_over_a_user_directory(tmp_path, user_dir):
    refused(tmp_path, ["normalize-vocab", "-o", str(user_dir), "--force"], "not an engram artifact", "thesis.txt")


def test_vocab_force_over_another_kind(tmp_path, tables_copy):
    refused(tmp_path, ["normalize-vocab", "-o", str(tables_copy), "--force"], "'engram.tables' artifact",
            "replaces only 'engram.vocab'")


@pytest.mark.parametrize("out,needle", [(".", "names no directory"), ("afile", "is not a directory"),
                                        ("afile/sub", "is a file, not a directory")])
def test_vocab_impossible_outputs(tmp_path, monkeypatch, out, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    refused(tmp_path, ["normalize-vocab", "-o", out, "--force"], needle)


# ---------------------------------------------------------------- build-tables


def test_tables_vocab_path_is_a_file(tmp_path):
    (tmp_path / "v").write_text("not a directory")
    refused(tmp_path, ["build-tables", ZH, "--vocab", str(tmp_path / "v"), "-o", str(tmp_path / "t")],
            "is a file, not an artifact directory")


def test_tables_vocab_edited_in_place(tmp_path, vocab_copy):
    path = vocab_copy / "vocab_map.npy"
    table = np.load(path)
    table[[10, 11]] = table[[11, 10]]  # still in range, same size
    np.save(path, table)
    refused(tmp_path, ["build-tables", ZH, "--vocab", str(vocab_copy), "-o", str(tmp_path / "t")],
            "modified after it was written")


@pytest.mark.parametrize("field,value,needle", [("files", [], "'files' is a list"),
                                                ("summary", "x", "'summary' is a str"),
                                                ("inputs", None, "'inputs' is a NoneType")])
def test_tables_vocab_manifest_of_the_wrong_schema(tmp_path, vocab_copy, field, value, needle):
    m = json.loads((vocab_copy / "manifest.json").read_text())
    m[field] = value
    (vocab_copy / "manifest.json").write_text(json.dumps(m))
    refused(tmp_path, ["build-tables", ZH, "--vocab", str(vocab_copy), "-o", str(tmp_path / "t")], needle)


def test_tables_manifest_path_outside_the_artifact(tmp_path, vocab_copy):
    m = json.loads((vocab_copy / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    (vocab_copy / "manifest.json").write_text(json.dumps(m))
    refused(tmp_path, ["build-tables", ZH, "--vocab", str(vocab_copy), "-o", str(tmp_path / "t")],
            "outside the artifact")


def test_tables_force_over_a_user_directory(tmp_path, vocab_dir, user_dir):
    refused(tmp_path, ["build-tables", ZH, "--vocab", str(vocab_dir), "-o", str(user_dir), "--force",
                       "--target-size", "1009"], "not an engram artifact")


def test_tables_force_over_a_shard_artifact(tmp_path, vocab_dir):
    shard = tmp_path / "s"
    r = runner.invoke(app, ["build-tables", ZH, "--vocab", str(vocab_dir), "-o", str(shard), "--shard", "0/2",
                            "--max-tokens", "500", "--quiet"])
    assert r.exit_code == 0, r.output
    refused(tmp_path, ["build-tables", ZH, "--vocab", str(vocab_dir), "-o", str(shard), "--force",
                       "--target-size", "1009"], "'engram.ngram_shard' artifact")


@pytest.mark.parametrize("args,needle", [
    (["--seed", str(10**23)], "seed must be in"),
    (["--embed-dim-per-head", "1e20"], "--embed-dim-per-head"),
    (["--layers", "1,1"], "list each layer once"),
    (["--layers", "x"], "not a list of layer ids"),
    (["--dtype", "fp4"], "unknown table dtype"),
    (["--doc-mode", "page"], "unknown document mode"),
    (["--shard", "1/x"], "not of the form I/N"),
    (["--max-ngram-size", "9"], "between 2 and 6"),
])
def test_tables_bad_options(tmp_path, vocab_dir, args, needle):
    refused(tmp_path, ["build-tables", ZH, "--vocab", str(vocab_dir), "-o", str(tmp_path / "t"), *args], needle)


def test_tables_bad_jsonl_records_are_counted(tmp_path, vocab_dir):
    lines = ['{"text": "good one"}', "{not json", '{"text": 5}', '["a list"]', '{"text": "good two"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    r = runner.invoke(app, ["build-tables", str(tmp_path / "d.jsonl"), "--vocab", str(vocab_dir), "-o",
                            str(tmp_path / "t"), "--json", "--target-size", "1009", "--layers", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bad_records"] == 3 and json.loads(r.stdout)["documents"] == 2
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["summary"]["bad_records"] == 3


def test_tables_a_second_writer_is_refused(tmp_path, vocab_dir):
    from engram_cli.core.artifacts import output_lock

    with output_lock(tmp_path / "t"):  # a writer of the same output, in this process
        import subprocess
        import sys

        p = subprocess.run([sys.executable, "-m", "engram_cli", "build-tables", ZH, "--vocab", str(vocab_dir),
                            "-o", str(tmp_path / "t"), "--target-size", "1009"], capture_output=True, text=True)
    assert p.returncode == 1 and "being written by another engram process" in p.stderr
    assert "Traceback" not in p.stderr and len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- train


def train_args(tables: Path, out: Path, *sets: str) -> list[str]:
    from test_train import CORPUS, SETS

    return ["train", *CORPUS, "--tables", str(tables), "--out", str(out), "--cache-dir", str(out.parent / "cache"), "-q",
            *[x for s in [*SETS, *sets] for x in ("--set", s)]]


@pytest.mark.parametrize("sets,needle", [
    (["train.eps=-1"], "train.eps must be positive"),
    (["train.eps=nan"], "train.eps must be a finite number"),
    (["train.engram_lr_mult=inf"], "train.engram_lr_mult must be a finite number"),
    (["train.seed=100000000000000000000000"], "train.seed must be in [0, 2^32)"),
    (["model.norm_eps=0"], "norm_eps must be a positive finite number"),
    (["train.batch_size=1000000000"], "needs about"),
    (["model.n_embd=1000000", "model.n_head=2"], "needs about"),
])
def test_train_impossible_settings(tmp_path, tiny_tables, sets, needle):
    refused(tmp_path, train_args(tiny_tables, tmp_path / "run", *sets), needle)
    assert not (tmp_path / "run").exists()


def test_train_config_that_is_a_json_list(tmp_path, tiny_tables):
    (tmp_path / "c.json").write_text("[1, 2]")
    refused(tmp_path, [*train_args(tiny_tables, tmp_path / "run"), "--config", str(tmp_path / "c.json")],
            "holds a JSON list")


def test_train_force_over_a_symlinked_run(tmp_path, tiny_tables, user_dir):
    (tmp_path / "link").symlink_to(user_dir)
    refused(tmp_path, [*train_args(tiny_tables, tmp_path / "link"), "--force"], "symbolic link")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_tables) -> Path:
    out = tmp_path_factory.mktemp("adv_run") / "run"
    r = runner.invoke(app, train_args(tiny_tables, out))
    assert r.exit_code == 0, r.output
    return out


def test_resume_with_a_state_json_without_rng(tmp_path, finished_run):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    state_path = next(run.glob("ckpt/step_*/state.json"))
    state = json.loads(state_path.read_text())
    del state["rng"]
    state_path.write_text(json.dumps(state))
    refused(tmp_path, ["train", "--out", str(run), "--resume", "--set", "train.steps=8"], "state.json is corrupt")
    manifest = json.loads((run / "manifest.json").read_text())  # and when the manifest is edited to match
    data = state_path.read_bytes()
    manifest["files"][state_path.relative_to(run).as_posix()] = {"bytes": len(data),
                                                                 "sha256": hashlib.sha256(data).hexdigest()}
    (run / "manifest.json").write_text(json.dumps(manifest))
    refused(tmp_path, ["train", "--out", str(run), "--resume", "--set", "train.steps=8"], "has no 'rng'")


def test_inspect_gates_refuses_weights_flipped_in_place(tmp_path, finished_run):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    weights = next(run.glob("ckpt/step_*/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # same size, one byte of a weight changed
    weights.write_bytes(bytes(data))
    refused(tmp_path, ["inspect-gates", "-m", str(run), "hello world"], "corrupt")
