"""The run directory of ``engram train`` (an ``engram.run`` artifact) and its bookkeeping files.

::

    manifest.json     format, config, inputs' fingerprints, plan source, budget, files, summary
    config.json       the resolved configuration ([model], [train], [data] + how it was run)
    metrics.jsonl     one JSON object per logged step
    table_plan.json   only when --allocation derived a new plan
    ckpt/             checkpoints (see engram_cli.checkpoint)

Unlike the other stages' artifacts, a run directory is written in place while training (its
manifest says ``"status": "training"`` until the end); every file in it is written atomically
or, for ``metrics.jsonl``, line by line. Only rank 0 writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from engram_cli.artifacts import MANIFEST, atomic_write_json, manifest_header, sha256_file
from engram_cli.errors import ArtifactError
from engram_cli.hashing import PLAN_FILE
from engram_cli.runs import CONFIG_FILE, CONFIG_FORMAT, RUN_FORMAT, plan_fingerprint

METRICS_FILE = "metrics.jsonl"


def prepare_out(out: Path, resume: bool, force: bool) -> None:
    """Refuse what must be refused before anything is written (every rank checks the same)."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} exists and is not a directory", "choose another --out path")
    exists = out.is_dir() and any(out.iterdir())
    if resume:
        if not exists:
            raise ArtifactError(f"there is no run to resume in {out}", "start it without --resume")
        return
    if exists and not force:
        raise ArtifactError(f"run directory {out} already exists",
                            "continue it with --resume, replace it with --force, or choose another --out")
    if exists and force:
        m = out / MANIFEST
        fmt = None
        if m.is_file():
            try:
                fmt = json.loads(m.read_text(encoding="utf-8")).get("format")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                fmt = None
        if fmt != RUN_FORMAT:
            raise ArtifactError(f"{out} is not an engram run directory; --force will not delete it",
                                "choose another --out")


def open_out(out: Path, *, resume: bool, config_doc: dict, plan=None) -> None:
    """Create (or, on a new run, replace) the run directory; write config.json and, when the run
    derived its own plan, table_plan.json. Rank 0 only."""
    from engram_cli import checkpoint as ckpt_mod

    if not resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_mod.remove_stale_temp(out)
    atomic_write_json(out / CONFIG_FILE, config_doc)
    if plan is not None:
        plan.save(out / PLAN_FILE)


def read_config_doc(out: Path) -> dict[str, Any]:
    """A run's config.json (for --resume)."""
    try:
        return json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{out}/{CONFIG_FILE} is missing or unreadable: cannot resume this run",
                            "start it over with --force") from None


def config_doc(settings, *, tables: Path, corpus: list[str], allocation: float | None, device: str,
               tokenizer: str, vocab: str, cache_dir: Path) -> dict[str, Any]:
    """config.json: the resolved ``settings`` (a :class:`~engram_cli.train.settings.Settings`)
    and, under ``run``, the inputs and options it was run with (what --resume reuses)."""
    return {"format": CONFIG_FORMAT, **settings.to_dict(),
            "run": {"tables": str(Path(tables).resolve()), "corpus": list(corpus), "allocation": allocation,
                    "device": device, "tokenizer": tokenizer, "vocab": vocab, "cache_dir": str(cache_dir)}}


def plan_record(plan, source: str, allocation: float | None) -> dict[str, Any]:
    """The manifest's ``plan`` entry: where the model's table plan came from and its fingerprint.

    ``source`` is ``tables`` (the tables' plan as it is), ``derived`` (by --allocation; saved in
    the run as table_plan.json) or ``none (pure MoE)``.
    """
    return {"source": source, "allocation": allocation,
            "file": PLAN_FILE if source == "derived" else None,
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
            p = out / rel
            try:
                files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            except OSError:  # pruned meanwhile
                files.pop(rel)
                continue
            if rel == METRICS_FILE:  # a log that grows after this manifest is written
                files[rel]["append_only"] = True
        return files


class MetricsWriter:
    """``metrics.jsonl``: appended line by line (rank 0); on resume cut back to the checkpoint step."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if keep_until is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = []
            if self.path.is_file():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        if json.loads(line)["step"] <= keep_until:
                            kept.append(line)
                    except (json.JSONDecodeError, KeyError, TypeError):
                        break  # a line cut by a crash ends what can be trusted
            self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled and not self._f.closed:
            self._f.close()
