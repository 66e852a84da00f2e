"""Training checkpoints: safetensors + JSON only (no pickle), written atomically, validated on load.

A run directory keeps its checkpoints under ``ckpt/``::

    ckpt/step_000200/
        model.safetensors       the model's state_dict (weights as trained, float32)
        optimizer.safetensors   AdamW and SparseAdam state tensors (see below)
        optimizer.json          their non-tensor parts: param groups, step counters, tensor layout
        rng.safetensors         torch CPU generator state (uint8), CUDA states when used, numpy's MT19937 key
        subvocab.safetensors    ``original_ids``: model id i <-> original id (engram_cli.train.data.SubVocab)
        table_plan.json         the plan the model's tables follow (absent for a pure-MoE model)
        state.json              written last: step, data position, config, input fingerprints,
                                numpy/python RNG states, sha256 and size of every file above
    ckpt/latest.json            {"step": 200, "dir": "step_000200"}: the newest complete checkpoint

Writing (docs/artifacts.md, "The commit protocol"): every file goes into
``ckpt/.step_000200.tmp-<pid>-XXXXXXXX/``, all are fsynced, the directory is swapped in as
``step_000200`` (``artifacts.swap_in``: an older run's checkpoint at the same step is replaced),
and only then is ``latest.json`` replaced (``artifacts.atomic_write_json``). The oldest checkpoints
beyond ``keep`` are discarded after the pointer moves (each renamed aside, then deleted). A kill at
any point leaves ``latest.json`` naming a complete checkpoint; what it left half-done is finished
by the next writer (:func:`recover_checkpoints`) or reader (:func:`read_checkpoint`).

Optimizer states: ``optimizer.state_dict()`` is split into its tensors (key
``<optimizer>.<param index>.<name>``) and the rest (JSON). SparseAdam's ``exp_avg`` and
``exp_avg_sq`` are as large as the Engram tables but are exactly zero in every row no step has
touched, so for that optimizer 2-D state tensors are stored as the nonzero rows only
(``.rows`` int64 + ``.values``) and rebuilt with zeros elsewhere — exact, and several times
smaller for a short run over big tables.

Loading checks the format, every file's sha256 and that the safetensors parse; anything wrong is
one :class:`~engram_cli.core.errors.ArtifactError` naming the checkpoint and the fix. Readers of a run
directory (inference, resume) go through :func:`engram_cli.train.runs.load_run`, which reads the
checkpoint with :func:`read_checkpoint` and checks that it belongs to the run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engram_cli import __version__
from engram_cli.core.artifacts import (
    atomic_write_json,
    check_schema,
    discard,
    fsync_tree,
    inside,
    make_temp_dir,
    recover_for_reader,
    recover_output,
    remove_tree,
    sha256_file,
    swap_in,
)
from engram_cli.core.errors import ArtifactError
from engram_cli.tables.plan import TablePlan

CKPT_DIR = "ckpt"
LATEST = "latest.json"
CKPT_FORMAT = "engram.checkpoint"
CKPT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
RNG_FILE = "rng.safetensors"
SUBVOCAB_FILE = "subvocab.safetensors"
PLAN_FILE = "table_plan.json"
STATE_FILE = "state.json"

_FIX = "resume from another checkpoint (delete this one), or start over with --force"
#: what every state.json holds (what this module writes; the trainer's own fields are checked by
#: engram_cli.train.runs.load_run)
_STATE_FIELDS = {"files": dict, "rng": dict}


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ---------------------------------------------------------------------------------------------
# optimizer and RNG states <-> tensors + JSON


def optimizer_state_to_tensors(state_dict: dict, prefix: str, sparse_rows: bool = False
                               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and a JSON-ready rest.

    With ``sparse_rows`` 2-D state tensors keep only their nonzero rows (``<key>.rows``,
    ``<key>.values``; the shape goes to JSON).
    """
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, entries in state_dict["state"].items():
        meta: dict[str, Any] = {}
        for name, value in entries.items():
            key = f"{prefix}.{pid}.{name}"
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
                if sparse_rows and value.dim() == 2:
                    rows = torch.nonzero(value.abs().sum(dim=1) > 0).flatten()  # (R,)
                    tensors[f"{key}.rows"] = rows.to(torch.int64).contiguous()
                    tensors[f"{key}.values"] = value[rows].contiguous()
                    meta[name] = {"tensor": key, "sparse_rows": True, "shape": list(value.shape),
                                  "dtype": str(value.dtype).removeprefix("torch.")}
                else:
                    tensors[key] = value.contiguous()
                    meta[name] = {"tensor": key}
            else:
                meta[name] = {"value": value}
        state_meta[str(pid)] = meta
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"state": state_meta, "param_groups": groups}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    """Inverse of :func:`optimizer_state_to_tensors`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for pid, entries in meta["state"].items():
        out: dict[str, Any] = {}
        for name, m in entries.items():
            if "value" in m:
                out[name] = m["value"]
            elif m.get("sparse_rows"):
                full = torch.zeros(m["shape"], dtype=getattr(torch, m["dtype"]))
                full[tensors[f"{m['tensor']}.rows"]] = tensors[f"{m['tensor']}.values"]
                out[name] = full
            else:
                out[name] = tensors[m["tensor"]]
        state[int(pid)] = out
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state(cuda: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch CPU (and CUDA) generator states as uint8 tensors; numpy's and python's in JSON
    (numpy's 624-word key as a tensor)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_key"] = torch.from_numpy(key.astype(np.int64))
    version, words, gauss_next = random.getstate()
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(words), "gauss_next": gauss_next},
            "cuda_devices": sum(k.startswith("torch_cuda.") for k in tensors)}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    n_cuda = meta.get("cuda_devices", 0)
    if n_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"torch_cuda.{i}"] for i in range(min(n_cuda, torch.cuda.device_count()))])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy_key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ---------------------------------------------------------------------------------------------
# saving


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizers: dict[str, torch.optim.Optimizer], sparse_optimizers: tuple[str, ...] = (),
                    subvocab_ids: np.ndarray, plan: Any | None, state: dict[str, Any], keep: int = 2,
                    cuda: bool = False) -> Path:
    """Write ``ckpt/step_<step>`` atomically, point ``ckpt/latest.json`` at it, prune to ``keep``.

    ``state`` is recorded in ``state.json`` (config, fingerprints, data position, metrics...);
    the step, format, RNG states and file hashes are added here. Returns the checkpoint path.
    """
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name
    tmp = make_temp_dir(final)
    try:
        _save_tensors(model.state_dict(), tmp / MODEL_FILE, {"format": CKPT_FORMAT, "step": str(step)})
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_meta: dict[str, Any] = {}
        for oname, opt in optimizers.items():
            t, m = optimizer_state_to_tensors(opt.state_dict(), oname, sparse_rows=oname in sparse_optimizers)
            opt_tensors.update(t)
            opt_meta[oname] = m
        _save_tensors(opt_tensors, tmp / OPTIM_FILE)
        (tmp / OPTIM_META).write_text(json.dumps(opt_meta) + "\n", encoding="utf-8")
        rng_tensors, rng_meta = rng_state(cuda)
        _save_tensors(rng_tensors, tmp / RNG_FILE)
        _save_tensors({"original_ids": torch.from_numpy(np.asarray(subvocab_ids, dtype=np.int64))}, tmp / SUBVOCAB_FILE)
        if plan is not None:
            plan.save(tmp / PLAN_FILE)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        doc = {"format": CKPT_FORMAT, "format_version": CKPT_VERSION, "engram_version": __version__,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step, **state, "rng": rng_meta,
               "files": files}
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        swap_in(tmp, final)  # replaces an older run's checkpoint at this step (resumed from before it)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(root / LATEST, {"format": "engram.checkpoint_pointer", "step": step, "dir": name})
    prune(run_dir, keep)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint directories (``step_NNNNNN``), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
                out.append((int(p.name[5:]), p))
    return sorted(out)


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Discard all but the newest ``keep`` checkpoints (never the one ``latest.json`` names)."""
    latest = latest_step(run_dir)
    ckpts = list_checkpoints(run_dir)
    for step, path in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        if step != latest:
            discard(path)


#: what a killed writer may leave in ckpt/: ``.step_NNNNNN.{tmp,new,old,trash}-<pid>...``
_LEFT = re.compile(r"^\.(step_\d+)\.(?:tmp|new|old|trash)-")


def recover_checkpoints(run_dir: str | os.PathLike) -> None:
    """Finish what a killed checkpoint writer left in ``ckpt/`` (the writer holds the run's lock):
    a swap cut short is completed or undone (``artifacts.recover_output``), temp directories and
    set-aside copies are removed, and so are the temp files of a ``latest.json`` never renamed."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if not p.exists():
            continue  # removed by the recovery of an earlier entry
        m = _LEFT.match(p.name)
        if m:
            recover_output(root / m.group(1))
        elif p.name.startswith((".tmp-", ".old-", f".{LATEST}.")):  # (.tmp-/.old-: older engram's names)
            remove_tree(p)


# ---------------------------------------------------------------------------------------------
# loading


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """The step ``ckpt/latest.json`` points at, or None when the run has no checkpoint yet."""
    path = Path(run_dir) / CKPT_DIR / LATEST
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return int(d["step"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path} is corrupt (not a checkpoint pointer)",
                            f"point it at a checkpoint in {path.parent} or start over with --force") from None


@dataclass
class Checkpoint:
    """A validated checkpoint directory; its parts are read on demand."""

    path: Path
    step: int
    state: dict[str, Any]  # state.json

    def _load(self, name: str) -> dict[str, torch.Tensor]:

        try:
            return load_file(str(self.path / name))
        except Exception as e:  # a damaged header or truncated data
            raise ArtifactError(f"checkpoint {self.path} is corrupt: {name} cannot be read "
                                f"({str(e).splitlines()[0][:80]})", _FIX) from e

    def model_state(self) -> dict[str, torch.Tensor]:
        return self._load(MODEL_FILE)

    def subvocab_ids(self) -> np.ndarray:
        return self._load(SUBVOCAB_FILE)["original_ids"].numpy()

    def plan(self):

        p = self.path / PLAN_FILE
        return TablePlan.load(p) if p.is_file() else None

    def restore_optimizers(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        tensors = self._load(OPTIM_FILE)
        try:
            meta = json.loads((self.path / OPTIM_META).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"checkpoint {self.path} is corrupt: {OPTIM_META} cannot be read", _FIX) from e
        if sorted(meta) != sorted(optimizers):
            raise ArtifactError(f"checkpoint {self.path} holds optimizers {sorted(meta)}, the run has "
                                f"{sorted(optimizers)}", _FIX)
        for name, opt in optimizers.items():
            try:
                opt.load_state_dict(optimizer_state_from_tensors(tensors, meta[name]))
            except (KeyError, ValueError, RuntimeError) as e:
                raise ArtifactError(f"checkpoint {self.path}: the {name} state does not fit this model "
                                    f"({str(e).splitlines()[0][:80]})", _FIX) from e

    def restore_rng(self) -> None:
        set_rng_state(self._load(RNG_FILE), self.state["rng"])


def read_checkpoint(run_dir: str | os.PathLike, step: int | None = None, verify: bool = True) -> Checkpoint:
    """The checkpoint at ``step`` (default: the one ``latest.json`` names), validated.

    Raises :class:`ArtifactError` when there is none, or when a file is missing, altered
    (``verify``: sha256 against ``state.json``) or unreadable.
    """
    run_dir = Path(run_dir)
    if step is None:
        step = latest_step(run_dir)
        if step is None:
            raise ArtifactError(f"{run_dir} has no checkpoint ({CKPT_DIR}/{LATEST} is missing)",
                                "train it with `engram train` (or start it over with --force)")
    path = run_dir / CKPT_DIR / step_dir_name(step)
    recover_for_reader(path, lock=run_dir)  # a writer killed while swapping it in
    if not path.is_dir():
        have = ", ".join(str(s) for s, _ in list_checkpoints(run_dir)) or "none"
        raise ArtifactError(f"{run_dir} has no checkpoint at step {step} (checkpoints: {have})",
                            "pass one of the listed steps")
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"checkpoint {path} is incomplete or corrupt: {STATE_FILE} is missing or unreadable",
                            _FIX) from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise ArtifactError(f"checkpoint {path}: {STATE_FILE} is not an engram checkpoint", _FIX)
    if state.get("format_version") != CKPT_VERSION:
        raise ArtifactError(f"checkpoint {path} has format version {state.get('format_version')}, "
                            f"this engram reads {CKPT_VERSION}", "start the run over with --force")
    if state.get("step") != step:
        raise ArtifactError(f"checkpoint {path} records step {state.get('step')}, expected {step}", _FIX)
    check_schema(state, f"checkpoint {path}/{STATE_FILE}", _STATE_FIELDS, _FIX)
    for name, meta in state["files"].items():
        p = inside(path, name)
        check_schema(meta, f"checkpoint {path}/{STATE_FILE} entry {name!r}", {"bytes": int, "sha256": str}, _FIX)
        if not p.is_file():
            raise ArtifactError(f"checkpoint {path} is incomplete: {name} is missing", _FIX)
        if p.stat().st_size != meta.get("bytes") or (verify and sha256_file(p) != meta.get("sha256")):
            raise ArtifactError(f"checkpoint {path} is corrupt: {name} changed after it was written "
                                "(size or sha256 mismatch)", _FIX)
    for name in (MODEL_FILE, OPTIM_FILE, OPTIM_META, RNG_FILE, SUBVOCAB_FILE):
        if name not in state.get("files", {}):
            raise ArtifactError(f"checkpoint {path} is incomplete: {name} is not recorded", _FIX)
    return Checkpoint(path=path, step=step, state=state)
