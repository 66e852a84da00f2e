"""The run directory of ``engram train`` (an ``engram.run`` artifact) and its bookkeeping files.

::

    manifest.json     format, config, inputs' fingerprints, plan source, budget, files, summary
    config.json       the resolved configuration ([model], [train], [data] + how it was run)
    metrics.jsonl     one JSON object per logged step
    loss_curve.png    training and validation loss against tokens (written at the end)
    table_plan.json   only when --allocation or [plan] settings made the run's own plan
    tensorboard/      only with --log tensorboard: the same metrics as TensorBoard event files
    ckpt/             checkpoints (see engram_cli.train.checkpoint)
    table_deltas/     store runs: per checkpoint step_<N>/layer_<L>.delta.{json,safetensors}, the
                      table rows changed since the previous checkpoint (engram_cli.train.deltas;
                      never pruned: resume and readers replay the chain)
    tables/           mmap runs: the row stores (engram_cli.model.store's layout); changed by every
                      step, so the manifest lists only their headers (layer_<L>.json)

Unlike the other stages' artifacts, a run directory is written in place while training (its
manifest says ``"status": "training"`` until the end); every file in it is written atomically
or, for ``metrics.jsonl``, line by line. Only rank 0 writes. :class:`RunLog` is the open run
directory a trainer writes to: its metrics, TensorBoard log and manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from engram_cli.core.artifacts import (
    MANIFEST,
    artifact_format,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    check_output_path,
    manifest_header,
    sha256_file,
    swap_in,
)
from engram_cli.core.errors import ArtifactError, ConfigError
from engram_cli.tables.plan import PLAN_FILE
from engram_cli.train import checkpoint as ckpt_mod
from engram_cli.train.deltas import DELTAS_DIR
from engram_cli.train.runs import CONFIG_FILE, CONFIG_FORMAT, RUN_FORMAT, TABLES_DIR, plan_fingerprint

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: what --log accepts
LOG_KINDS = ("tensorboard",)


def prepare_out(out: Path, resume: bool, force: bool) -> None:
    """Refuse what must be refused before anything is written (every rank checks the same):
    the path rules of every output (``artifacts.check_output_path``); ``--force`` replaces only
    an engram run; ``--resume`` needs one."""
    check_output_path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} exists and is not a directory", "choose another --out path")
    exists = out.is_dir() and any(out.iterdir())
    if resume:
        if not exists:
            raise ArtifactError(f"there is no run to resume in {out}", "start it without --resume")
        return
    if exists and not force:
        if started_without_checkpoint(out):
            return  # a new run stopped before its first checkpoint: nothing to resume, replaced like --force
        raise ArtifactError(f"run directory {out} already exists",
                            "continue it with --resume, replace it with --force, or choose another --out")
    check_output_dir(out, force, RUN_FORMAT)


#: what a run directory holds before its first checkpoint
_STARTED = {MANIFEST, CONFIG_FILE, METRICS_FILE, PLAN_FILE, TENSORBOARD_DIR, ckpt_mod.CKPT_DIR,
            TABLES_DIR, DELTAS_DIR}  # (a store run: its mmap stores, its delta chain)


def started_without_checkpoint(out: Path) -> bool:
    """Whether ``out`` is a run killed (or stopped) before it committed a checkpoint: its
    config.json or manifest is engram's, it holds nothing else a run does not write, and no
    ``ckpt/latest.json`` (the commit point of a checkpoint: a step directory without it is one
    the kill cut short)."""
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    if not names <= _STARTED or ckpt_mod.latest_step(out) is not None:
        return False
    if artifact_format(out) == RUN_FORMAT:
        return True
    try:
        return json.loads((out / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == CONFIG_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def open_out(out: Path, *, resume: bool, config_doc: dict, plan=None) -> Path:
    """The directory the run writes to, with config.json and (when the run derived its own plan)
    table_plan.json in it. Rank 0 only.

    It is ``out`` itself, except when a new run replaces a previous one (``--force``): then it is
    a hidden sibling (``.<name>.tmp-<pid>-run``) that ``artifacts.swap_in`` moves onto ``out`` at the
    first checkpoint, so a new run that fails, is interrupted or killed before it has anything
    to resume from leaves the previous run as it was.
    """

    work = out
    if not resume and out.exists() and any(out.iterdir()):
        work = out.with_name(f".{out.name}.tmp-{os.getpid()}-run")
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_mod.recover_checkpoints(work)
    atomic_write_json(work / CONFIG_FILE, config_doc)
    if plan is not None:
        plan.save(work / PLAN_FILE)
    return work


def config_doc(settings, *, tables: Path, corpus: list[str], allocation: float | None, device: str,
               tokenizer: str, vocab: str, cache_dir: Path) -> dict[str, Any]:
    """config.json: the resolved ``settings`` (a :class:`~engram_cli.train.settings.Settings`)
    and, under ``run``, the inputs and options it was run with (what --resume reuses)."""
    return {"format": CONFIG_FORMAT, **settings.to_dict(),
            "run": {"tables": str(Path(tables).resolve()), "corpus": list(corpus), "allocation": allocation,
                    "device": device, "tokenizer": tokenizer, "vocab": vocab, "cache_dir": str(cache_dir),
                    "cpu_threads": torch.get_num_threads()}}  # what the run computed with (train.threads)


def plan_record(plan, source: str, allocation: float | None, changes: dict | None = None) -> dict[str, Any]:
    """The manifest's ``plan`` entry: where the model's table plan came from and its fingerprint.

    ``source`` is ``tables`` (the tables' plan as it is), ``replanned`` (the tables' plan with the
    ``[plan]`` settings ``changes``), ``derived`` (sized by --allocation, from the tables' or the
    replanned plan) or ``none (pure MoE)``; replanned and derived plans are saved in the run as
    table_plan.json.
    """
    return {"source": source, "allocation": allocation, "changes": dict(changes or {}),
            "file": PLAN_FILE if source in ("derived", "replanned") else None,
            "sha256": plan_fingerprint(plan),
            "layer_ids": list(plan.layer_ids) if plan is not None else [],
            "total_slots": plan.total_slots_all if plan is not None else 0,
            "target_sizes": list(plan.target_sizes) if plan is not None else []}


class RunManifest:
    """``manifest.json`` of the run, rewritten atomically by :meth:`write` at every milestone
    (start, checkpoints, the end or a failure); a no-op on ranks other than 0."""

    def __init__(self, out: Path, *, config: dict, inputs: dict, plan: dict, budget: dict, enabled: bool):
        self.out, self.enabled = out, enabled
        self.config, self.inputs, self.plan, self.budget = config, inputs, plan, budget

    def write(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        manifest = {**manifest_header(RUN_FORMAT), "config": self.config, "inputs": self.inputs,
                    "plan": self.plan, "budget": self.budget, "files": self._files(), "summary": summary}
        atomic_write_json(self.out / MANIFEST, manifest)

    def _files(self) -> dict[str, dict[str, Any]]:
        """Every file of the run (hidden ones aside) with its size and sha256; checkpoint files
        reuse the hashes their state.json recorded."""
        out = self.out
        files: dict[str, Any] = {}
        for p in sorted(out.rglob("*")):
            if not p.is_file() or p.name == MANIFEST:
                continue
            rel = p.relative_to(out)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if rel.parts[0] == TABLES_DIR and not (len(rel.parts) == 2 and rel.suffix == ".json"):
                continue  # an mmap store's data: rewritten by every step (the checkpoints record its deltas)
            files[rel.as_posix()] = None
        for rel in list(files):
            parts = rel.split("/")
            if len(parts) == 3 and parts[0] == "ckpt" and parts[2] != "state.json":
                try:
                    recorded = json.loads((out / "ckpt" / parts[1] / "state.json").read_text(encoding="utf-8"))["files"]
                    files[rel] = recorded[parts[2]]
                    continue
                except (OSError, KeyError, json.JSONDecodeError):
                    pass
            if len(parts) == 3 and parts[0] == DELTAS_DIR and parts[2].endswith(".delta.safetensors"):
                try:  # its record holds its size and sha256 (written once, never changed)
                    rec = json.loads((out / (rel.removesuffix(".safetensors") + ".json")).read_text(encoding="utf-8"))
                    files[rel] = {"bytes": int(rec["bytes"]), "sha256": str(rec["sha256"])}
                    continue
                except (OSError, KeyError, ValueError, TypeError):
                    pass
            p = out / rel
            try:
                files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            except OSError:  # pruned meanwhile
                files.pop(rel)
                continue
            if rel == METRICS_FILE or rel.startswith(f"{TENSORBOARD_DIR}/"):  # logs that grow after this manifest
                files[rel]["append_only"] = True
        for rel, meta in files.items():  # the checkpoints' own commits change these after this manifest
            if rel == f"{ckpt_mod.CKPT_DIR}/{ckpt_mod.LATEST}":
                meta["pointer"] = True      # moved by the next checkpoint before the manifest is rewritten
            elif rel.startswith(f"{ckpt_mod.CKPT_DIR}/"):
                meta["prunable"] = True     # discarded by a later checkpoint's pruning
        return files


def read_metrics(path: Path, until: int | None = None) -> tuple[list[dict], int]:
    """The valid rows of a ``metrics.jsonl`` (up to step ``until``) and how many lines were
    damaged (not a JSON object with an integer ``step``: a line cut by a crash, an edit). Damaged
    lines are skipped, never the valid rows after them."""
    rows, bad = [], 0
    if not path.is_file():
        return rows, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and isinstance(row.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            bad += 1
        elif until is None or row["step"] <= until:
            rows.append(row)
    return rows, bad


def atomic_write_json_lines(path: Path, rows: list[dict]) -> None:

    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


class MetricsWriter:
    """``metrics.jsonl``: appended line by line (rank 0); on resume cut back to the checkpoint step."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled = path, enabled
        self.dropped = 0  # damaged lines left out on resume
        if not enabled:
            return
        if keep_until is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept, self.dropped = read_metrics(self.path, keep_until)
            atomic_write_json_lines(self.path, kept)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled and not self._f.closed:
            self._f.close()


def check_log(log: str | None) -> None:
    """``--log``: None or one of LOG_KINDS, whose package must be importable (checked before any work)."""
    if log is None:
        return
    if log not in LOG_KINDS:
        raise ConfigError(f"unknown --log {log!r}", f"use one of: {', '.join(LOG_KINDS)}")
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  lazy: the `tensorboard` extra, only with --log
    except ImportError:
        raise ConfigError("--log tensorboard needs the `tensorboard` extra, which is not installed",
                          "run `pip install 'engram-cli[tensorboard]'`") from None


class TensorBoardLog:
    """The metrics lines also written as TensorBoard scalars under ``<run>/tensorboard/`` (rank 0,
    ``--log tensorboard``): ``train/loss``, ``train/aux_loss``, ``train/lr``, ``train/engram_lr``,
    ``train/grad_norm``, ``train/tokens_per_second`` and ``val/loss``, against the step."""

    def __init__(self, out: Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # lazy: the `tensorboard` extra, only with --log

            self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))

    def write(self, row: dict) -> None:
        if self.writer is None:
            return
        for key in ("loss", "aux_loss", "lr", "engram_lr", "grad_norm", "tokens_per_second"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])
        if row.get("val_loss") is not None:
            self.writer.add_scalar("val/loss", row["val_loss"], row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class RunLog:
    """The run directory while the run trains: ``metrics.jsonl``, the TensorBoard log and
    ``manifest.json`` (each a no-op on ranks other than 0).

    ``work`` is where the run writes: ``out`` itself, or, for a ``--force`` run until its first
    checkpoint, the hidden sibling of :func:`open_out`; :meth:`adopt` moves it onto ``out``.
    """

    def __init__(self, out: Path, work: Path, metrics: MetricsWriter, tensorboard: TensorBoardLog,
                 manifest: RunManifest):
        self.out = out                    # the run directory
        self.work = work                  # where the run writes now (``out``, or a --force run's sibling)
        self.metrics = metrics
        self.tensorboard = tensorboard
        self.manifest = manifest

    @classmethod
    def open(cls, out: Path, *, main: bool, resume: bool, config_doc: dict, plan, start_step: int,
             log: str | None, inputs: dict, plan_info: dict, budget: dict) -> RunLog:
        """config.json (and ``plan``, a run's own plan, as table_plan.json) in the run directory,
        the metrics file (cut back to ``start_step`` on resume), the TensorBoard log, the manifest."""
        work = out
        if main:
            work = open_out(out, resume=resume, config_doc=config_doc, plan=plan)
        metrics = MetricsWriter(work / METRICS_FILE, main, start_step if resume else None)
        tensorboard = TensorBoardLog(work, enabled=main and log == "tensorboard")
        manifest = RunManifest(work, config=config_doc, inputs=inputs, plan=plan_info, budget=budget, enabled=main)
        return cls(out, work, metrics, tensorboard, manifest)

    @property
    def replacing(self) -> bool:
        """A --force run that has not replaced the previous run yet (no checkpoint so far)."""
        return self.work != self.out

    def write(self, row: dict) -> None:
        """One metrics line (and its TensorBoard scalars)."""
        self.metrics.write(row)
        self.tensorboard.write(row)

    def record(self, summary: dict[str, Any]) -> None:
        """The manifest, with ``summary`` (the status and figures of the moment)."""
        self.manifest.write(summary)

    def adopt(self, path: Path) -> Path:
        """After a checkpoint at ``path``: a --force run replaces the previous run now
        (``artifacts.swap_in``); returns where the checkpoint is then."""
        if not self.replacing:
            return path
        swap_in(self.work, self.out)
        path = self.out / path.relative_to(self.work)
        self.work = self.manifest.out = self.out
        self.metrics.path = self.out / METRICS_FILE
        return path

    def close(self) -> None:
        self.metrics.close()
        self.tensorboard.close()

    def discard(self) -> None:
        """A --force run stopped before its first checkpoint: its files go, the previous run stays."""
        shutil.rmtree(self.work, ignore_errors=True)
