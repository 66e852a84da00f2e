"""engram train loses nothing: --force keeps the old run until the new one has a checkpoint, one
writer per run directory, interrupts say what is intact, damaged metrics lines are skipped."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import CORPUS, SETS

from engram_cli.core.artifacts import output_lock
from engram_cli.core.errors import ArtifactError, Interrupted, TrainingError
from engram_cli.train import TrainConfig, train

pytestmark = pytest.mark.slow


def run(out: Path, tables: Path, *extra: str, progress=None, **kw):
    cfg = TrainConfig(out=out, tables=tables, sources=CORPUS, overrides=[*SETS, *extra],
                      cache_dir=out.parent / "cache", **kw)
    return train(cfg, progress=progress)


def tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(x for x in d.rglob("*") if x.is_file()):
        h.update(p.relative_to(d).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def at_step(n: int, exc: BaseException):
    def progress(task, completed, total=None, **info):
        if task == "train" and completed == n:
            raise exc
    return progress


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_tables) -> Path:
    out = tmp_path_factory.mktemp("safety") / "run"
    run(out, tiny_tables)
    return out


@pytest.mark.parametrize("exc", [TrainingError("loss became NaN/inf at step 2"), Interrupted(signal.SIGINT)])
def test_force_keeps_the_old_run_until_the_first_checkpoint(tmp_path, tiny_tables, finished, exc):
    old = tmp_path / "run"
    import shutil

    shutil.copytree(finished, old)
    before = tree_hash(old)
    with pytest.raises(type(exc)) as e:
        run(old, tiny_tables, "train.seed=1", force=True, progress=at_step(2, exc))
    assert tree_hash(old) == before  # the new run had no checkpoint: nothing of the old one is lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # and its work dir is gone
    if isinstance(exc, Interrupted):
        assert "at step 2; no checkpoint was written yet" in e.value.message
        assert f"the previous run in {old} is unchanged" in e.value.hint


def test_force_replaces_the_old_run_at_the_first_checkpoint(tmp_path, tiny_tables, finished):
    import shutil

    shutil.copytree(finished, tmp_path / "run")
    with pytest.raises(Interrupted) as e:  # checkpoints at steps 3 and 6; stop at 5
        run(tmp_path / "run", tiny_tables, "train.seed=1", force=True, progress=at_step(5, Interrupted(signal.SIGTERM)))
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["summary"]["status"] == "interrupted" and m["summary"]["signal"] == "SIGTERM"
    assert m["summary"]["last_checkpoint"] == 3 and m["config"]["train"]["seed"] == 1
    assert "latest checkpoint step 3" in e.value.message and "--resume" in e.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]
    result = run(tmp_path / "run", tiny_tables, resume=True)  # and it continues from there
    assert result.start_step == 3 and result.steps == 6


def test_a_second_writer_of_a_run_is_refused(tmp_path, tiny_tables):
    with output_lock(tmp_path / "run"):
        p = subprocess.run([sys.executable, "-m", "engram_cli", "train", *CORPUS, "--tables", str(tiny_tables),
                            "--out", str(tmp_path / "run"), *[x for s in SETS for x in ("--set", s)]],
                           capture_output=True, text=True)
    assert p.returncode == 1 and "being written by another engram process" in p.stderr
    assert not (tmp_path / "run").exists()


def test_sigkill_before_the_first_checkpoint_of_a_force_run(tmp_path, tiny_tables, finished):
    """A real process killed mid-run: the old run survives, and the next writer cleans up."""
    import shutil

    shutil.copytree(finished, tmp_path / "run")
    before = tree_hash(tmp_path / "run")
    script = ("import time, sys\nfrom engram_cli.train import trainer as T\n"
              "orig = T.Trainer.train_step\n"
              "def slow(self, i):\n    if i == 1:\n        print('ready', flush=True); time.sleep(60)\n"
              "    return orig(self, i)\n"
              "T.Trainer.train_step = slow\nfrom engram_cli.cli import main\nmain()\n")
    p = subprocess.Popen([sys.executable, "-c", script, "train", *CORPUS, "--tables", str(tiny_tables), "--out",
                          str(tmp_path / "run"), "--force", "--cache-dir", str(tmp_path / "cache"),
                          *[x for s in [*SETS, "train.seed=2"] for x in ("--set", s)]],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait()
    assert tree_hash(tmp_path / "run") == before
    assert any(x.name.startswith(".run.tmp-") for x in tmp_path.iterdir())  # the dead run's work dir
    with output_lock(tmp_path / "run"):  # the next writer removes what the dead one left
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]


def test_damaged_metrics_lines_are_skipped_on_resume(tmp_path, tiny_tables):
    with pytest.raises(Interrupted):
        run(tmp_path / "run", tiny_tables, progress=at_step(5, Interrupted(signal.SIGINT)))
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(1, '{"step": 1.5, "loss": "garbage"')  # a damaged line between valid ones
    path.write_text("\n".join(lines) + "\n")
    result = run(tmp_path / "run", tiny_tables, resume=True)
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows after the damaged line are kept (they were cut before)
    assert any("1 damaged line(s) of metrics.jsonl" in w for w in result.warnings)


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(ArtifactError, match="no run to resume"):
        run(tmp_path / "nothing", Path("x"), resume=True)
