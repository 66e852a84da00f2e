"""Running a sweep's runs: what each run directory needs, one run at a time in this process or
several at once in their own processes, and the record every run leaves for the summary.

A run directory is in one of five states (:func:`run_state`): ``new`` (absent or empty),
``finished`` (its manifest says so: never trained again, once it passes :func:`verify_run`), ``failed`` (the loss became NaN/inf: not
retried, it would fail the same way), ``resume`` (interrupted with a checkpoint: continued with
``--resume``, bit for bit the uninterrupted run) or ``restart`` (interrupted before its first
checkpoint: removed and started again).

Parallel runs (``--jobs N``) each get a fresh ``python -m engram_cli.sweep.worker`` process
with ``torch.set_num_threads`` of its share of the cores (a fresh interpreter, not
multiprocessing, so that no caller's ``__main__`` is run again). They report progress and their
record as JSON lines. The first run starts alone and the others only once it trains, so that a
cold token cache is built once. SIGINT/SIGTERM stop every run the way ``engram train`` stops
(the run records where it stopped); a worker whose sweep process died (SIGKILL, out of memory)
stops itself the same way.
"""

from __future__ import annotations

import json
import os
import queue as queue_mod
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import engram_cli
import engram_cli.core.errors as errors
from engram_cli.core.artifacts import MANIFEST, read_manifest
from engram_cli.core.errors import ArtifactError, EngramError, Interrupted, TrainingError
from engram_cli.core.progress import ProgressFn
from engram_cli.eval import EvalConfig, evaluate
from engram_cli.train import SECTIONS, PlanSettings, Settings, TrainConfig, train
from engram_cli.train.checkpoint import latest_step, read_checkpoint
from engram_cli.train.distributed import resolve_device
from engram_cli.train.runs import RUN_FORMAT

NEW, FINISHED, FAILED, RESUME, RESTART = "new", "finished", "failed", "resume", "restart"


@dataclass
class Job:
    """One run to bring to an end: train, resume or restart it, and score it."""

    name: str                          # the run's name (its directory's)
    run_dir: Path
    action: str                        # NEW, RESUME, RESTART, or FINISHED / FAILED (nothing to train)
    train: TrainConfig                 # how to train it from scratch (RESUME continues from the run itself)
    base: dict[str, Any]               # what the record starts from: run, point, seed, values
    evaluate: bool                     # score it with `engram eval` when finished
    eval_windows: int | None
    previous_eval: dict | None = None  # its scores from an earlier call of this sweep


# ---------------------------------------------------------------------------------------------
# a run directory


def read_run_manifest(run_dir: Path) -> dict | None:
    try:
        doc = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("summary"), dict) else None


def run_state(run_dir: Path) -> str:
    """What ``run_dir`` needs: NEW, FINISHED, FAILED, RESUME or RESTART (module docstring)."""

    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return NEW
    manifest = read_run_manifest(run_dir)
    status = manifest["summary"].get("status") if manifest is not None else None
    if status in (FINISHED, FAILED):
        return status
    return RESUME if manifest is not None and latest_step(run_dir) is not None else RESTART


def verify_run(run_dir: Path) -> str | None:
    """The hash check ``engram eval`` makes when it loads a run (``load_run``: every file its
    manifest lists, and its latest checkpoint's files, against their sha256): None when the run
    passes, else what failed."""
    try:
        read_manifest(run_dir, RUN_FORMAT)
        read_checkpoint(run_dir, verify=True)
    except ArtifactError as e:
        return e.message
    return None


def check_run_matches(run_dir: Path, expected: dict[str, Any], allocation: float | None) -> None:
    """A run found in the sweep must have been trained with the settings its point asks for."""
    manifest = read_run_manifest(run_dir) or {}
    config = manifest.get("config", {})
    found = {s: dict(config.get(s) or {}) for s in SECTIONS}
    found["plan"] = {**asdict(PlanSettings()), **found["plan"]}
    diffs = [f"{s}.{k} {found[s].get(k)!r} (expected {v!r})" for s in SECTIONS for k, v in expected[s].items()
             if found[s].get(k) != v]
    if config.get("run", {}).get("allocation") != allocation:
        diffs.append(f"allocation {config.get('run', {}).get('allocation')!r} (expected {allocation!r})")
    if diffs:
        raise ArtifactError(f"run {run_dir} was trained with other settings than its sweep point: {'; '.join(diffs[:3])}",
                            "start the sweep over with --force, or choose another --out")


def run_record(job: Job) -> dict[str, Any]:
    """The record of a finished or failed run, from its manifest (what the summary is made of)."""
    manifest = read_run_manifest(job.run_dir) or {"summary": {}}
    s = manifest["summary"]
    keys = ("steps", "start_step", "train_loss", "val_loss", "best_val_loss", "unigram_entropy",
            "val_unigram_cross_entropy", "tokens_seen", "seconds", "tokens_per_second", "error")
    return {**job.base, "status": s.get("status"), "run_dir": str(job.run_dir), **{k: s.get(k) for k in keys},
            "budget": manifest.get("budget"), "plan": manifest.get("plan"), "eval": None}


def eval_record(job: Job, progress: ProgressFn | None) -> dict[str, Any]:
    """The run scored on its held-out split by ``engram eval``'s library: loss, bits per byte and
    the loss by training count of the target's n-gram."""

    device = str(resolve_device(job.train.device)).split(":")[0]
    r = evaluate(EvalConfig(runs=[job.run_dir], max_windows=job.eval_windows, device=device), progress).runs[0]
    num = lambda v: None if v is None or v != v else float(v)  # noqa: E731  (NaN: an empty bucket)
    return {"loss": r.loss, "loss_ci95": list(r.loss_ci95), "bits_per_byte": r.bits_per_byte, "tokens": r.tokens,
            "buckets": {b.bucket: {"tokens": b.tokens, "loss": num(b.loss)} for b in r.buckets if b.kind == "count"}}


def execute(job: Job, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Bring one run to an end (train, resume or restart it) and score it; returns its record.
    A loss that became NaN/inf is recorded as a failed run, not raised."""
    started = time.perf_counter()
    if job.action == RESTART:
        shutil.rmtree(job.run_dir)
    if job.action in (NEW, RESTART, RESUME):
        cfg = job.train if job.action != RESUME else TrainConfig(
            out=job.run_dir, resume=True, device=job.train.device, cache_dir=job.train.cache_dir, log=job.train.log)
        try:
            train(cfg, progress=progress)
        except TrainingError:
            pass  # the run's manifest says "failed" and why
    record = run_record(job)
    record["action"] = job.action
    record["eval"] = job.previous_eval
    if record["status"] == FINISHED and job.evaluate and record["eval"] is None:
        record["eval"] = eval_record(job, progress)
    record["sweep_seconds"] = time.perf_counter() - started
    return record


# ---------------------------------------------------------------------------------------------
# one process


def run_inline(jobs: list[Job], threads: int, progress: Callable[[str], ProgressFn],
               on_record: Callable[[dict], None]) -> None:
    """The jobs one after the other in this process, with ``threads`` torch threads."""

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for job in jobs:
            on_record(execute(job, progress(job.name)))
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# several processes


def job_to_json(job: Job) -> str:
    t = job.train
    train = {"out": str(t.out), "tables": str(t.tables), "sources": list(t.sources), "settings": t.settings.to_dict(),
             "allocation": t.allocation, "device": t.device, "log": t.log,
             "cache_dir": str(t.cache_dir) if t.cache_dir is not None else None}
    return json.dumps({**asdict(job), "run_dir": str(job.run_dir), "train": train})


def job_from_json(text: str) -> Job:

    d = json.loads(text)
    t = d.pop("train")
    train = TrainConfig(out=Path(t["out"]), tables=Path(t["tables"]), sources=t["sources"],
                        settings=Settings.from_dict(t["settings"]), allocation=t["allocation"], device=t["device"],
                        log=t["log"], cache_dir=Path(t["cache_dir"]) if t["cache_dir"] is not None else None)
    return Job(**{**d, "run_dir": Path(d["run_dir"]), "train": train})


class ParallelRuns:
    """Up to ``n`` jobs at once, each in a fresh ``python -m engram_cli.sweep.worker`` process
    that reads its job (JSON) on stdin and answers with JSON lines on stdout (see the module
    docstring and :mod:`engram_cli.sweep.worker`)."""

    #: the worker's command line after the interpreter (its last argument, the threads, is added)
    WORKER = ("-m", "engram_cli.sweep.worker")
    #: seconds the stopped workers get to record where they stopped before they are killed
    STOP_GRACE_S = 60.0

    def __init__(self, n: int, threads: int, progress: Callable[[str], ProgressFn],
                 on_record: Callable[[dict], None]):
        self.n, self.threads, self.progress, self.on_record = n, threads, progress, on_record
        self.messages: queue_mod.Queue = queue_mod.Queue()
        self.running: dict[str, subprocess.Popen] = {}
        self.readers: list[threading.Thread] = []
        self.warm = False  # a run got past reading its data: the token cache exists

    def run(self, jobs: list[Job]) -> None:
        pending = deque(jobs)
        try:
            while pending or self.running:
                while pending and len(self.running) < self.n and (self.warm or not self.running):
                    self._start(pending.popleft())
                self._next_message()
        except BaseException:
            self._stop_all()
            self._keep_finished()
            raise

    def _start(self, job: Job) -> None:

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(engram_cli.__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
        p = subprocess.Popen([sys.executable, *self.WORKER, str(self.threads)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8")
        p.stdin.write(job_to_json(job) + "\n")
        p.stdin.close()
        self.running[job.name] = p
        reader = threading.Thread(target=self._read, args=(job.name, p), daemon=True)
        reader.start()
        self.readers.append(reader)

    def _read(self, name: str, p: subprocess.Popen) -> None:
        """Every message line of one worker into the queue; then its end (exit code)."""
        for line in p.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # not ours: a library printed to the message pipe
            self.messages.put((name, msg))
        self.messages.put((name, {"kind": "exit", "code": p.wait()}))

    def _next_message(self) -> None:
        try:
            name, msg = self.messages.get(timeout=0.5)
        except queue_mod.Empty:
            return
        kind = msg["kind"]
        if kind == "progress":
            self.warm = self.warm or msg["task"] == "train"
            self.progress(name)(msg["task"], msg["completed"], msg["total"], **msg["info"])
            return
        if kind == "exit":
            if self.running.pop(name, None) is not None:  # it ended without a word: killed
                raise TrainingError(f"the process of run {name} died (exit code {msg['code']}; killed, out of memory?)",
                                    "rerun the same command to resume it, with fewer --jobs")
            return
        self.running.pop(name, None)
        self.warm = True
        if kind == "done":
            self.on_record(msg["record"])
        elif kind == "interrupted":
            raise Interrupted(signal.SIGTERM, msg["message"], msg["hint"])
        elif kind == "error":

            raise getattr(errors, msg["type"], EngramError)(msg["message"], msg["hint"])
        else:
            raise TrainingError(f"run {name} crashed: {msg['message']}",
                                "rerun with --jobs 1 and ENGRAM_DEBUG=1 to see where")

    def _keep_finished(self) -> None:
        """Record the runs that finished while the sweep was stopping (their ``done`` message was
        still in the queue), so that the manifest lists every finished run."""
        for reader in self.readers:
            reader.join(timeout=5)
        while True:
            try:
                _, msg = self.messages.get_nowait()
            except queue_mod.Empty:
                return
            if msg["kind"] == "done":
                self.on_record(msg["record"])

    def _stop_all(self) -> None:
        """Stop every running run (SIGTERM: it records where it stopped) and wait for them."""
        for p in self.running.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + self.STOP_GRACE_S
        for p in self.running.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.running.clear()
