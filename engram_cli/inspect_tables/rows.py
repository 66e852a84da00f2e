"""The rows of a run's Engram tables, read in blocks, beside their initial values and the optimizer's
record of which rows training updated.

Three providers, each the one place its question is answered, for both kinds of run — a row-store
run (``train.table_store`` memory|mmap: its tables in ``engram_cli.model.store`` row stores) and a
"module" run (its tables in ``model.safetensors``):

* :class:`TableRows`: a layer's trained rows, read in blocks — from the run's row store at the
  checkpoint (``engram_cli.train.runs.run_stores``: an mmap store mapped, else the delta chain
  replayed), or as slices of ``model.safetensors`` through safetensors' ``safe_open`` (never the
  whole table);
* :func:`initial_rows`: the rows as the trainer initialized them. A store run: the store's keyed
  init (``engram_cli.model.store.initial_rows``: a function of seed, layer and row). A module
  run: the trainer seeds torch with the run's seed and builds the model
  (``EngramModel._init_weights``: normal(0, init_std)); this rebuilds the model exactly so, once
  per run, and slices its tables. ``tests/test_inspect_tables.py`` checks exactness: every row the
  optimizer never updated has moved by exactly 0;
* :func:`updated_rows`: the rows the optimizer ever stepped. A store run: the rows of its delta
  chain up to the checkpoint (a delta holds every row written since the previous one). A module
  run: from SparseAdam's ``exp_avg`` state in the checkpoint (stored as its nonzero rows,
  ``engram_cli.train.checkpoint``): a row whose first moment is zero was never in a step's gradient.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from engram_cli.core.errors import ArtifactError
from engram_cli.model import store as store_mod
from engram_cli.model.transformer import EngramModel
from engram_cli.train.checkpoint import MODEL_FILE, OPTIM_FILE, OPTIM_META
from engram_cli.train.deltas import chain_paths, read_delta
from engram_cli.train.runs import LoadedRun, run_stores, store_record

SPARSE_OPTIMIZER = "sparse_adam"  # the trainer's name of the tables' optimizer (engram_cli.train.optim)
_FIX = "pass --step of another checkpoint, or retrain with `engram train`"


def table_key(layer_id: int) -> str:
    """The state-dict key of one Engram layer's concatenated table (all heads, ``sum(p_j)`` rows)."""
    return f"blocks.{layer_id}.engram.tables.embedding.weight"


class TableRows:
    """A run's trained table rows, read on demand from the checkpoint's ``model.safetensors``.

    >>> with TableRows(run) as t:                       # doctest: +SKIP
    ...     block = t.read(1, 0, 65536)                  # (65536, D) float32, rows 0..65535 of layer 1
    """

    def __init__(self, run: LoadedRun):
        self.path = Path(run.checkpoint.path) / MODEL_FILE
        self._file = None
        self._run = run
        self._stores = None      # a store run's RowStores (layer -> store)

    def __enter__(self) -> TableRows:
        if self._run.store_backed:
            self._stores = run_stores(self._run)
            return self
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as e:  # a damaged header or truncated file  # noqa: BLE001
            raise ArtifactError(f"{self.path} cannot be read ({str(e).splitlines()[0][:80]})", _FIX) from e
        return self

    def __exit__(self, *exc) -> None:
        self._file = None

    def shape(self, layer_id: int) -> tuple[int, int]:
        if self._stores is not None:
            s = self._store(layer_id)
            return (s.rows, s.dim)
        return tuple(self._slice(layer_id).get_shape())

    def read(self, layer_id: int, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the layer's table: float32 (stop - start, D)."""
        if self._stores is not None:
            s = self._store(layer_id)
            return s.gather(np.arange(max(0, start), min(stop, s.rows), dtype=np.int64))
        return self._slice(layer_id)[start:stop].float().numpy()

    def _store(self, layer_id: int):
        if layer_id not in self._stores:
            raise ArtifactError(f"run {self._run.name} has no Engram table for layer {layer_id}", _FIX)
        return self._stores[layer_id]

    def _slice(self, layer_id: int):
        try:
            return self._file.get_slice(table_key(layer_id))
        except Exception as e:  # noqa: BLE001  the key is missing: not this run's model
            raise ArtifactError(f"{self.path} holds no Engram table for layer {layer_id}", _FIX) from e


#: the last run's rebuilt initial tables: (run identity) -> {layer id: (rows, D) float32 tensor}
_INITIAL: dict[tuple, dict[int, torch.Tensor]] = {}


def initial_rows(run: LoadedRun, layer_id: int, row_slice: slice) -> np.ndarray:
    """Rows ``row_slice`` of layer ``layer_id``'s table as the trainer initialized them, float32 (R, D).

    The trainer calls ``torch.manual_seed(seed)`` and builds ``EngramModel(model_config, plan)`` on
    the CPU before anything else draws from torch's generator; the same two calls here give the same
    tables bit for bit. The model is rebuilt once per run (the tables of the last run asked about
    are kept) and the caller's torch generator state is left as it was. A store run's rows start
    from the store's keyed init (``engram_cli.model.store.initial_rows``: seed, layer, row).
    """
    seed = int(run.config.get("train", {}).get("seed", 0))
    if run.store_backed:
        rows = np.arange(run.plan.total_slots(layer_id), dtype=np.int64)[row_slice]
        dim = run.plan.embed_dim_per_head
        return store_mod.initial_rows(seed, layer_id, rows, dim, float(run.model_config.init_std),
                                      store_mod.page_rows(dim))  # the block size of a run's stores (runs.store_specs)
    key = (str(Path(run.run_dir).resolve()), run.manifest.get("plan", {}).get("sha256"), seed)
    if key not in _INITIAL:
        _INITIAL.clear()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = EngramModel(run.model_config, run.plan)
        _INITIAL[key] = {layer: w.detach() for layer, w in zip(model.engram_layer_ids, model.engram_table_parameters())}
    return _INITIAL[key][layer_id][row_slice].float().numpy()


def updated_rows(run: LoadedRun, layer_id: int, n_rows: int) -> np.ndarray:
    """(n_rows,) bool: the rows of the layer's table that the optimizer ever updated (a store run:
    the rows of its delta chain; a module run: SparseAdam's nonzero exp_avg)."""
    if run.store_backed:
        mask = np.zeros(n_rows, dtype=bool)
        store = run_stores(run)[layer_id]
        for record in chain_paths(run.run_dir, store_record(run.checkpoint)["chain"], layer_id):
            mask[read_delta(record, store)[1]["rows"]] = True
        return mask
    ckpt = Path(run.checkpoint.path)
    try:
        meta = json.loads((ckpt / OPTIM_META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"checkpoint {ckpt} is corrupt: {OPTIM_META} cannot be read", _FIX) from e
    pid = str(list(run.layer_ids).index(layer_id))  # SparseAdam's parameters: the tables, by layer
    entry = meta.get(SPARSE_OPTIMIZER, {}).get("state", {}).get(pid, {}).get("exp_avg")
    mask = np.zeros(n_rows, dtype=bool)
    if entry is None:  # no step has run: no row was updated
        return mask
    try:
        with safe_open(str(ckpt / OPTIM_FILE), framework="pt") as f:
            if entry.get("sparse_rows"):
                rows = f.get_tensor(f"{entry['tensor']}.rows").numpy()
                mask[rows] = True
            else:  # stored dense: its nonzero rows, in blocks
                sl = f.get_slice(entry["tensor"])
                for a in range(0, n_rows, 1 << 16):
                    mask[a:a + (1 << 16)] = sl[a:a + (1 << 16)].abs().sum(dim=1).numpy() > 0
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"checkpoint {ckpt}: the {SPARSE_OPTIMIZER} state of layer {layer_id} does not fit "
                            f"its table ({str(e).splitlines()[0][:80]})", _FIX) from e
    return mask
