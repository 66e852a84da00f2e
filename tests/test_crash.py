"""Crash consistency: every writer killed (SIGKILL) at every step of its commit leaves the old
artifact or the new one, complete, where readers look; readers accept it; rerunning completes it.

The steps are the ``crash_point("NAME", target)`` calls of engram_cli (core/artifacts.py: the
fsyncs, renames, the swap, removals): they are found by reading the source, so a new commit step
is covered without touching this file, and the test fails when no writer reaches one. Each writer
is first run with ``ENGRAM_CRASH_TRACE`` to list the steps it reaches (``POINT@TARGET``), then
once per step in a forked child with ``ENGRAM_CRASH_AT=POINT@TARGET`` (the child kills itself
there). The other issue-19 refusals (--device, --plan-only --shard, the row width, a read-only
--cache-dir) and the recoveries of damaged runs are at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_RUN_CORPUS, TINY_RUN_SETS
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.core.artifacts import CRASH_ENV, CRASH_TRACE_ENV, interrupted_commit, read_manifest
from engram_cli.core.errors import ArtifactError
from engram_cli.train.checkpoint import latest_step, list_checkpoints
from engram_cli.train.run import started_without_checkpoint
from engram_cli.train.runs import load_run

from cli_asserts import one_red_line

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def points_in_code() -> set[str]:
    """Every commit step named in the library: ``crash_point("NAME"`` calls."""
    found = set()
    for path in (ROOT / "engram_cli").rglob("*.py"):
        found |= set(re.findall(r"""crash_point\(\s*["']([\w.-]+)["']""", path.read_text(encoding="utf-8")))
    return found


def invoke(args: list[str]):
    return runner.invoke(app, [str(a) for a in args])


def in_child(args: list[str], env: dict[str, str], timeout: float = 120) -> int | None:
    """Run the CLI with ``args`` in a forked child under ``env``; its exit code, or None when it
    was killed by SIGKILL (the crash point it was told to stop at)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.environ.update(env)
            import torch  # lazy: only to keep the child on one thread after the fork

            torch.set_num_threads(1)
            r = invoke(args)
            code = r.exit_code
            if code:
                sys.stderr.write(f"{args[0]} exited {code}: {r.output[-600:]}\n")
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{args[0]} hung (crash env {env})")
        time.sleep(0.02)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return None
    return os.WEXITSTATUS(status)


@dataclass
class Writer:
    """One command that commits an artifact: how to set it up, run it, read it and rerun it."""

    name: str
    setup: Callable[[Path], Path]            # (work dir) -> the output path, with any previous version there
    args: Callable[[Path], list[str]]        # (output) -> the command's arguments
    check: Callable[[Path], None]            # (output) -> raises unless a reader accepts what is there
    rerun: Callable[[Path], list[str]] | None = None  # (output) -> what a user runs next (default: args)
    absent_ok: bool = True                   # a new artifact: before the commit nothing is the old state


@pytest.fixture(scope="module")
def shared(tmp_path_factory, vocab_dir, tiny_tables, train_tiny_run) -> dict[str, Path]:
    """The inputs every writer reads, built once: vocab, tables, a finished tiny run, a filled token cache."""
    base = tmp_path_factory.mktemp("crash")
    run = train_tiny_run(base / "run")  # its cache: base/cache
    return {"vocab": vocab_dir, "tables": tiny_tables, "run": run, "cache": base / "cache"}


def _train_args(shared, *extra, device: str = "cpu", cache: Path | None = None):
    return ["train", *TINY_RUN_CORPUS, "--tables", shared["tables"], "--cache-dir", cache or shared["cache"],
            *[x for s in TINY_RUN_SETS for x in ("--set", s)], "--set", "train.steps=3",
            "--set", "train.keep_checkpoints=1", "--device", device, *extra]


def _check_run(out: Path) -> None:
    """A run directory a reader accepts (recovering a cut-short --force swap); or none, or one
    killed before its first checkpoint (the next `engram train` replaces it without --force)."""
    if not out.exists() and not interrupted_commit(out):
        return
    if out.exists() and started_without_checkpoint(out):
        return
    assert load_run(out, with_model=False).step == latest_step(out)


def _copy(src: Path):
    def setup(work: Path) -> Path:
        shutil.copytree(src, work / src.name)
        return work / src.name
    return setup


def writers(shared) -> list[Writer]:
    vocab, tables, run = shared["vocab"], shared["tables"], shared["run"]
    tables_args = ["build-tables", *TINY_RUN_CORPUS, "--vocab", vocab, "--layers", "1", "--heads-per-ngram", "2",
                   "--embed-dim-per-head", "8", "--target-size", "1009", "--max-tokens", "3000"]

    def reader(fmt: str):
        def check(out: Path) -> None:
            if out.exists() or interrupted_commit(out):  # a version beside the path: the reader must recover it
                read_manifest(out, fmt)
        return check

    vocab_check, tables_check = reader("engram.vocab"), reader("engram.tables")

    def resume_or_again(extra=()):
        def rerun(out):
            return [*_train_args(shared, "--out", out), "--resume"] if out.exists() and latest_step(out) is not None \
                else [*_train_args(shared, "--out", out), *extra]
        return rerun

    return [
        Writer("normalize-vocab", lambda w: w / "vocab", lambda o: ["normalize-vocab", "--out", o], vocab_check),
        Writer("normalize-vocab --force", _copy(vocab), lambda o: ["normalize-vocab", "--out", o, "--no-lowercase",
                                                                   "--force"], vocab_check, absent_ok=False),
        Writer("build-tables", lambda w: w / "tables",
               lambda o: [*tables_args, "--out", o], tables_check),
        Writer("build-tables --force", _copy(tables), lambda o: [*tables_args, "--out", o, "--seed", "1", "--force"],
               tables_check, absent_ok=False),
        Writer("train", lambda w: w / "run", lambda o: _train_args(shared, "--out", o, cache=o.parent / "cache"),
               _check_run, rerun=resume_or_again()),  # its own token cache: the cache entry's commit is killed too
        Writer("train --force", _copy(run), lambda o: [*_train_args(shared, "--out", o, "--set", "train.seed=1"),
                                                       "--force"], _check_run, rerun=resume_or_again(["--force"]),
               absent_ok=False),
        Writer("inspect-gates", lambda w: w / "gates",
               lambda o: ["inspect-gates", "-m", run, "hello world, hello", "--out", o, "--device", "cpu"],
               reader("engram.gates")),
        Writer("eval", lambda w: w / "eval", lambda o: ["eval", run, "--out", o, "--max-windows", "2"],
               reader("engram.eval")),
    ]


def trace(writer: Writer, work: Path) -> list[str]:  # noqa: D401
    """The commit steps ``writer`` reaches, in order (first occurrence of each ``POINT@TARGET``)."""
    work.mkdir()
    out = writer.setup(work)
    log = work.parent / "trace.txt"
    assert in_child(writer.args(out), {CRASH_TRACE_ENV: str(log)}) == 0, f"{writer.name} failed untouched"
    writer.check(out)
    return list(dict.fromkeys(log.read_text().split()))


def leftovers(out: Path) -> list[str]:
    """What a commit may leave beside ``out`` (and in a run's ckpt/) that recovery must clear."""
    names = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")
             and not p.name.endswith(".lock")]
    if (out / "ckpt").is_dir():
        names += [p.name for p in (out / "ckpt").iterdir() if p.name.startswith(".")]
    return names


WRITERS = ["normalize-vocab", "normalize-vocab --force", "build-tables", "build-tables --force", "train",
           "train --force", "inspect-gates", "eval"]


def kill_steps(steps: list[str]) -> list[str]:
    """The steps to kill a writer at: every rename, swap and removal on each of its targets, and
    the first fsync of each kind (a SIGKILL just before an fsync leaves the same files as one
    just after the step before it; ``ENGRAM_CRASH_EVERY=1`` kills at every fsync as well)."""
    if os.environ.get("ENGRAM_CRASH_EVERY"):
        return steps
    seen: set[str] = set()
    chosen = []
    for step in steps:
        point = step.split("@")[0]
        if point.startswith("fsync."):
            if point in seen:
                continue
            seen.add(point)
        chosen.append(step)
    return chosen


@pytest.fixture(scope="module")
def traces(shared, tmp_path_factory) -> dict[str, list[str]]:
    """Each writer's commit steps, traced once (lazily) per module."""
    found: dict[str, list[str]] = {}

    def get(name: str) -> list[str]:
        if name not in found:
            writer = next(w for w in writers(shared) if w.name == name)
            base = tmp_path_factory.mktemp(re.sub(r"\W+", "_", name))
            found[name] = trace(writer, base / "k999")  # named like the kill runs' k0, k1... (crash_label: kN)
        return found[name]
    return get


@pytest.mark.slow
def test_every_commit_step_in_the_code_is_reached_by_a_writer(traces):
    reached = {step.split("@")[0] for name in WRITERS for step in traces(name)}
    code = points_in_code()
    assert {"swap.staged", "swap.set-aside", "swap.renamed", "rename.done", "fsync.file", "fsync.dir"} <= code
    assert not code - reached, f"commit steps no writer reaches (add a writer here): {sorted(code - reached)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", WRITERS)
def test_a_writer_killed_at_every_commit_step_leaves_old_or_new(tmp_path, shared, traces, name):
    """The harness: kill ``name`` at each step it reaches; a reader then accepts what is at the
    path (the old or the new version, complete, after recovering a cut-short swap); the command a
    user runs next completes it and no leftovers remain."""
    writer = next(w for w in writers(shared) if w.name == name)
    steps = kill_steps(traces(name))
    assert steps, f"{name} reached no commit step"
    failures: list[str] = []
    for i, step in enumerate(steps):
        work = tmp_path / f"k{i}"
        work.mkdir()
        out = writer.setup(work)
        code = in_child(writer.args(out), {CRASH_ENV: step})
        where = f"{name} killed at {step}"
        try:
            assert code is None, f"{where}: not killed (exit {code})"
            if not writer.absent_ok:
                assert out.exists() or leftovers(out), f"{where}: the previous version is gone"
            writer.check(out)                        # a reader finds old or new, complete (recovering)
            assert out.exists() or writer.absent_ok, f"{where}: nothing at {out}"
            r = invoke((writer.rerun or writer.args)(out))
            assert r.exit_code == 0 or "already exists" in r.output, f"{where}, rerun: {r.output[-400:]}"
            writer.check(out)
            assert out.exists() and not leftovers(out), f"{where}: left {leftovers(out)}"
        except (AssertionError, ArtifactError) as e:
            failures.append(f"{where}: {e}")
        shutil.rmtree(work, ignore_errors=True)
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# the cases of issue 19, one test each


@pytest.fixture
def run_copy(shared, tmp_path) -> Path:
    return Path(shutil.copytree(shared["run"], tmp_path / "run"))


def _resume(run: Path, shared, steps: int = 3):
    return invoke(["train", "--out", run, "--resume", "--set", f"train.steps={steps}", "--cache-dir", shared["cache"]])


@pytest.mark.slow
def test_a_kill_after_the_pointer_moved_before_pruning_leaves_the_run_usable(run_copy, shared):
    # what step 3's checkpoint leaves when killed before pruning: step 3 and latest.json written,
    # the manifest still the one of step 2 (naming latest.json's old bytes and step 1)
    code = in_child(["train", "--out", run_copy, "--resume", "--set", "train.steps=3", "--cache-dir", shared["cache"]],
                    {CRASH_ENV: "discard.renamed"})
    assert code is None and latest_step(run_copy) == 3
    assert load_run(run_copy, with_model=False).step == 3
    r = invoke(["inspect-gates", "-m", run_copy, "hello world"])
    assert r.exit_code == 0, r.output
    r = invoke(["eval", run_copy, "--max-windows", "2"])
    assert r.exit_code == 0, r.output
    r = _resume(run_copy, shared, 4)
    assert r.exit_code == 0, r.output
    assert [s for s, _ in list_checkpoints(run_copy)][-1] == 4


def test_readers_recover_an_artifact_left_beside_its_path(tmp_path, shared):
    vocab = Path(shutil.copytree(shared["vocab"], tmp_path / "vocab"))
    os.replace(vocab, tmp_path / ".vocab.old-99999")       # a --force writer killed after its first rename
    manifest = read_manifest(vocab, "engram.vocab")        # the reader puts it back, no "does not exist"
    assert manifest["format"] == "engram.vocab" and sorted(p.name for p in tmp_path.iterdir()) == ["vocab"]

    staged = tmp_path / ".vocab.new-99999"                 # killed with the new version staged: rolled forward
    shutil.copytree(vocab, staged)
    (staged / "marker").write_text("new")
    edit = json.loads((staged / "manifest.json").read_text())
    edit["files"]["marker"] = {"bytes": 3, "sha256": __import__("hashlib").sha256(b"new").hexdigest()}
    (staged / "manifest.json").write_text(json.dumps(edit))
    read_manifest(vocab, "engram.vocab")
    assert (vocab / "marker").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["vocab"]


def test_a_run_with_an_older_checkpoint_deleted_or_its_metrics_truncated_resumes(run_copy, shared):
    shutil.rmtree(run_copy / "ckpt" / "step_000001")       # deleted by hand
    metrics = run_copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0][:10])  # cut inside its first line
    assert load_run(run_copy, with_model=False).step == 2
    r = _resume(run_copy, shared, 3)
    assert r.exit_code == 0, r.output
    assert latest_step(run_copy) == 3


def test_a_new_run_killed_before_its_first_checkpoint_is_replaced_by_rerunning(tmp_path, shared):
    out = tmp_path / "run"
    args = [*_train_args(shared, "--out", out)]
    assert in_child(args, {CRASH_ENV: "fsync.dir@.step_N.tmp-N"}) is None  # inside the first checkpoint
    assert latest_step(out) is None
    r = invoke(args)
    assert r.exit_code == 0, r.output
    assert load_run(out, with_model=False).step == 3


@pytest.mark.parametrize("device,needle", [("cuda", "CUDA is not available"), ("cuda:7", "CUDA is not available"),
                                           ("tpu", "--device must be auto, cpu or cuda")])
@pytest.mark.parametrize("command", ["eval", "inspect-gates", "train"])
def test_device_is_checked_once_for_every_command(shared, tmp_path, command, device, needle):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA build: cuda is a valid device here")
    args = {"eval": ["eval", shared["run"], "--device", device],
            "inspect-gates": ["inspect-gates", "-m", shared["run"], "hello", "--device", device],
            "train": _train_args(shared, "--out", tmp_path / "run", device=device)}[command]
    one_red_line(invoke(args), needle)
    assert not (tmp_path / "run").exists()


def test_plan_only_refuses_shard_and_a_huge_row_width(tmp_path, shared):
    base = ["build-tables", "--plan-only", "--vocab", shared["vocab"], "--out", tmp_path / "plan"]
    one_red_line(invoke([*base, "--shard", "0/2"]), "--shard does not apply to --plan-only")
    one_red_line(invoke([*base, "--embed-dim-per-head", "99999999999999999999"]), "--embed-dim-per-head must be in")
    assert not (tmp_path / "plan").exists()


def test_a_read_only_cache_dir_is_named(tmp_path, shared, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    if os.geteuid() == 0:  # root writes through read-only permissions: the refusal the kernel would give
        import errno

        from engram_cli.corpus import cache as cache_mod

        def refused(entry):
            raise PermissionError(errno.EACCES, "Permission denied", str(entry.parent / ".x.tmp"))
        monkeypatch.setattr(cache_mod, "make_temp_dir", refused)
    cache.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        line = one_red_line(invoke(_train_args(shared, "--out", tmp_path / "run", cache=cache)), "--cache-dir")
        assert "--out" not in line and "EACCES" in line
    finally:
        cache.chmod(stat.S_IRWXU)


if __name__ == "__main__":  # pragma: no cover - list the steps
    print("\n".join(sorted(points_in_code())), file=sys.stderr)
