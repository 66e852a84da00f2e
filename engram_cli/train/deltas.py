"""Delta checkpoints of a row store: only the rows changed since the previous checkpoint.

A checkpoint of a large table writes, per Engram layer, the rows scattered since the last
``RowStore.mark_clean`` (``RowStore.dirty_rows``) with their optimizer state — so its bytes and
time grow with the rows a run touched, not with the table. Resume replays the chain: a base
(a fresh store, i.e. the lazy initialization, or a full snapshot) and then every delta in order.

Format ``engram.rowstore_delta`` version 1, two files per layer, ``P = layer_<L>.delta``:

``P.safetensors`` (written with ``safetensors.numpy``)
    ``rows``: (k,) int64, sorted unique; ``values``: (k, D) float32, the rows' current values;
    ``state.<name>``: (k, width) float32 for each optimizer state array of the store.
``P.json``
    ``format``, ``format_version``, ``layer_id``, ``plan_fingerprint``, ``rows`` (the table's),
    ``dim``, ``state`` ({name: width}), ``step`` (the checkpoint's step), ``since`` (the step of
    the checkpoint this delta follows; null after a fresh store), ``changed_rows`` (k), ``file``,
    ``bytes`` and ``sha256`` of ``P.safetensors``.

Both are written atomically (temp file + rename, ``engram_cli.core.artifacts``); the directory
they go into is the checkpoint's (its own atomicity is the checkpoint module's). :func:`replay`
verifies each delta's size and sha256, that it belongs to the store's table (layer, plan, shape,
state) and that the chain has no gap (each ``since`` is the previous ``step``) before it writes a
row; anything else is one ArtifactError.

After a killed run, :func:`rollback` returns the live store itself to its last checkpoint without
rebuilding it: only the blocks its persisted DIRTY flags name are reset and re-played.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as stn

from engram_cli.core.artifacts import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes, sha256_file
from engram_cli.core.errors import ArtifactError
from engram_cli.model.store import RowStore, initial_rows

DELTA_FORMAT = "engram.rowstore_delta"
DELTA_VERSION = 1
DELTAS_DIR = "table_deltas"   # in a run: table_deltas/step_<N>/, never pruned (resume replays the chain)
_FIX = "resume from an earlier checkpoint, or retrain the run with `engram train --force`"


@dataclass(frozen=True)
class DeltaRecord:
    """What :func:`write_delta` wrote (the JSON record, parsed)."""

    path: Path            # the JSON record
    step: int
    since: int | None
    changed_rows: int
    bytes: int


def delta_paths(directory: str | os.PathLike, layer_id: int) -> tuple[Path, Path]:
    """(record JSON, data safetensors) of layer ``layer_id``'s delta in ``directory``."""
    p = Path(directory) / f"layer_{layer_id}.delta"
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".safetensors")


def delta_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where a run keeps the deltas of its checkpoint at ``step``: ``<run>/table_deltas/step_<N>/``."""
    return Path(run_dir) / DELTAS_DIR / f"step_{step:06d}"


def chain_paths(run_dir: str | os.PathLike, chain: list[dict[str, Any]], layer_id: int) -> list[Path]:
    """The record paths of layer ``layer_id``'s deltas along ``chain`` (a checkpoint's record:
    ``[{"step", "since", "records": {layer: sha256 of the record JSON}}, ...]``, oldest first),
    each checked against the sha256 the checkpoint recorded (the record holds its data file's)."""
    out = []
    for link in chain:
        if not isinstance(link, dict) or not isinstance(link.get("step"), int) or \
                not isinstance(link.get("records"), dict):
            raise ArtifactError(f"the table delta chain of run {run_dir} is malformed", _FIX)
        record, _ = delta_paths(delta_dir(run_dir, link["step"]), layer_id)
        want = link["records"].get(str(layer_id))
        if not record.is_file():
            raise ArtifactError(f"the table delta {record} (step {link['step']}) is missing", _FIX)
        if want is None or sha256_file(record) != want:
            raise ArtifactError(f"the table delta {record} is not the one the checkpoint recorded "
                                "(sha256 mismatch: modified after it was written)", _FIX)
        out.append(record)
    return out


def write_delta(store: RowStore, directory: str | os.PathLike, *, step: int, since: int | None) -> DeltaRecord:
    """Write the rows of ``store`` changed since its last ``mark_clean`` (and their state) into
    ``directory``. Does not mark the store clean: call ``store.mark_clean()`` once the checkpoint
    holding the delta is committed (a checkpoint that fails keeps the rows dirty for the next)."""
    rows = store.dirty_rows()
    tensors = {"rows": rows, "values": store.gather(rows)}
    for name in store.state_names:
        tensors[f"state.{name}"] = store.gather_state(name, rows)
    data = stn.save(tensors, metadata={"format": DELTA_FORMAT, "format_version": str(DELTA_VERSION)})
    record_path, data_path = delta_paths(directory, store.spec.layer_id)
    atomic_write_bytes(data_path, data)
    atomic_write_json(record_path, {
        "format": DELTA_FORMAT, "format_version": DELTA_VERSION, "layer_id": store.spec.layer_id,
        "plan_fingerprint": store.spec.plan_fingerprint, "rows": store.rows, "dim": store.dim,
        "state": dict(store.spec.state), "step": step, "since": since, "changed_rows": int(rows.size),
        "file": data_path.name, "bytes": len(data), "sha256": sha256_bytes(data)})
    return DeltaRecord(record_path, step, since, int(rows.size), len(data))


def read_delta(record_path: str | os.PathLike, store: RowStore) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A delta's record and arrays, verified against its sha256 and against ``store``'s table."""
    record_path = Path(record_path)
    rec = read_json(record_path, what="row store delta record", producer="engram train")
    if not isinstance(rec, dict) or rec.get("format") != DELTA_FORMAT:
        raise ArtifactError(f"{record_path} is not a row store delta record", _FIX)
    if rec.get("format_version") != DELTA_VERSION:
        raise ArtifactError(f"{record_path} has delta format version {rec.get('format_version')}, "
                            f"this engram reads {DELTA_VERSION}", _FIX)
    spec = store.spec
    want = {"layer_id": spec.layer_id, "plan_fingerprint": spec.plan_fingerprint, "rows": spec.rows,
            "dim": spec.dim, "state": dict(spec.state)}
    for key, value in want.items():
        if rec.get(key) != value:
            raise ArtifactError(f"the delta {record_path} belongs to another table: its {key} is {rec.get(key)!r}, "
                                f"the store's is {value!r}", _FIX)
    data_path = record_path.parent / str(rec.get("file"))
    if data_path.parent != record_path.parent or not data_path.is_file():
        raise ArtifactError(f"the delta data {data_path} is missing", _FIX)
    if data_path.stat().st_size != rec.get("bytes") or sha256_file(data_path) != rec.get("sha256"):
        raise ArtifactError(f"the delta {data_path} is corrupt: modified after it was written "
                            "(size or sha256 mismatch)", _FIX)
    try:
        arrays = stn.load_file(str(data_path))
    except Exception as e:  # safetensors raises its own error types on a malformed file
        raise ArtifactError(f"the delta {data_path} does not parse as safetensors ({type(e).__name__})", _FIX) from e
    k = rec.get("changed_rows")
    shapes = {"rows": ((k,), np.int64), "values": ((k, spec.dim), np.float32),
              **{f"state.{n}": ((k, w), np.float32) for n, w in spec.state}}
    for name, (shape, dtype) in shapes.items():
        a = arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            raise ArtifactError(f"the delta {data_path} has no {name} of shape {shape} {np.dtype(dtype).name}", _FIX)
    r = arrays["rows"]
    if k and (r[0] < 0 or r[-1] >= spec.rows or np.any(np.diff(r) <= 0)):
        raise ArtifactError(f"the delta {data_path} has rows outside the table or out of order", _FIX)
    return rec, arrays


def read_chain(store: RowStore, deltas: list[str | os.PathLike], since: int | None) -> list[dict[str, np.ndarray]]:
    """Every delta of ``deltas`` (record paths, oldest first) read and verified for ``store``, the
    first following step ``since`` and each the one before it (none missing or out of order)."""
    loaded, expect = [], since
    for path in deltas:
        rec, arrays = read_delta(path, store)
        if rec.get("since") != expect:
            raise ArtifactError(f"the delta {path} follows step {rec.get('since')}, but the chain is at step {expect} "
                                "(a delta is missing or out of order)", _FIX)
        expect = rec.get("step")
        loaded.append(arrays)
    return loaded


def replay(base: RowStore, deltas: list[str | os.PathLike], *, since: int | None = None) -> RowStore:
    """Apply ``deltas`` (record paths, oldest first) to ``base``, whose state is that of step
    ``since`` (None: a fresh store). Every delta is verified before any is applied; the store is
    marked clean afterwards (it now equals the last checkpoint). Returns ``base``."""
    for arrays in read_chain(base, deltas, since):
        rows = arrays["rows"]
        for name in base.state_names:
            base.scatter_state(name, rows, arrays[f"state.{name}"])
        base.scatter(rows, arrays["values"])
    base.mark_clean()
    return base


def rollback(store: RowStore, deltas: list[str | os.PathLike]) -> int:
    """Bring a writable store that a killed run left back to its last checkpoint, in place.

    The blocks flagged DIRTY in the store's block map (written since the last ``mark_clean``;
    persisted by the ``mmap`` backend) are reset to their initial rows and zero state, then the
    rows of the full delta chain ``deltas`` (from a fresh store, oldest first) that fall in them
    are written again. Every other block already equals the checkpoint. Returns the blocks reset.
    """
    loaded = read_chain(store, deltas, None)  # the whole chain verified before a byte changes
    spec = store.spec
    blocks = store.dirty_blocks()
    for b in blocks.tolist():
        lo, hi = b * spec.block_rows, min((b + 1) * spec.block_rows, spec.rows)
        rows = np.arange(lo, hi, dtype=np.int64)
        store.scatter(rows, initial_rows(spec.seed, spec.layer_id, rows, spec.dim, spec.init_std, spec.block_rows))
        for name, width in spec.state:
            store.scatter_state(name, rows, np.zeros((rows.size, width), np.float32))
    for arrays in loaded:
        pick = np.isin(arrays["rows"] // spec.block_rows, blocks)
        rows = arrays["rows"][pick]
        for name in store.state_names:
            store.scatter_state(name, rows, arrays[f"state.{name}"][pick])
        store.scatter(rows, arrays["values"][pick])
    store.mark_clean()
    return int(blocks.size)
