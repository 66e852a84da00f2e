"""The Engram tables of a store run while it trains: one row store per layer, each step's working
set, the row optimizer's write-back, and the delta checkpoints.

A run with ``train.table_store = "memory"`` or ``"mmap"`` keeps its tables outside the model
(``engram_cli.model.store``; the model is built ``store_backed``). :class:`TableStores` is that
part of the trainer:

* :meth:`~TableStores.open`: a store per Engram layer (``memory``: in RAM on every rank;
  ``mmap``: ``<run>/tables/``, one process only), brought to the resumed checkpoint — a memory
  store replays the checkpoint's delta chain into a fresh store, an mmap store is rolled back in
  place (``deltas.rollback``: the blocks written after the checkpoint);
* :meth:`~TableStores.bind` a step's working set: the rows the step's **global** batch addresses
  (``prefetch.working_rows`` on every rank's identical canonical ids, so all ranks hold the same
  rows), gathered into (k, D) float32 tensors that require grad, and this rank's slice of the
  local indices; the forward reads ``rows[local]``. With ``prefetch`` the next step's set is
  gathered on a background thread while the step runs (``prefetch.Prefetcher``; rows the
  write-back changes are re-read, so prefetch on and off give the same bits);
* :meth:`~TableStores.step`: each layer's dense working-set gradient, averaged over the ranks,
  goes to the row optimizer (``rowopt``) at the scheduled Engram learning rate and the global step
  count; the new rows and state are scattered back (every rank updates its own store the same way);
* :meth:`~TableStores.write_deltas`: per layer the rows changed since the previous checkpoint with
  their optimizer state (``deltas.write_delta``) into ``<run>/table_deltas/step_<N>/`` (never
  pruned); the checkpoint's ``state.json`` records the chain (:meth:`~TableStores.record`).
  :meth:`~TableStores.committed` marks the stores clean once the checkpoint is committed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_cli.core.artifacts import sha256_file
from engram_cli.core.errors import ConfigError
from engram_cli.model.store import RowStore, memory_store, open_store
from engram_cli.tables.plan import TablePlan
from engram_cli.train.checkpoint import Checkpoint
from engram_cli.train.data import Batches
from engram_cli.train.deltas import chain_paths, delta_dir, replay, rollback, write_delta
from engram_cli.train.distributed import Dist, all_reduce_sum
from engram_cli.train.prefetch import LayerWorkingSet, Prefetcher
from engram_cli.train.rowopt import RowOptimizer, make_row_optimizer
from engram_cli.train.runs import TABLES_DIR, check_store_header, header_path, store_record, store_specs
from engram_cli.train.settings import TrainSettings


def check_table_store(ts: TrainSettings, world_size: int) -> None:
    """Refuse what a store run cannot do, before anything is written."""
    if ts.table_store == "mmap" and world_size > 1:
        raise ConfigError(f"--table-store mmap trains on one process, this run has {world_size}",
                          "use --table-store memory with torchrun (every rank keeps the tables in RAM)")


class TableStores:
    """The row stores of a store run and their part of each step (module docstring)."""

    def __init__(self, *, ts: TrainSettings, plan: TablePlan, stores: dict[int, RowStore], optimizer: RowOptimizer,
                 batches: Batches, d: Dist, device, chain: list[dict[str, Any]], headers: dict[str, str]):
        self.ts, self.plan, self.stores, self.optimizer = ts, plan, stores, optimizer
        self.batches, self.d, self.device = batches, d, device
        self.chain = chain                # the delta chain up to the last checkpoint (state.json's record)
        self.headers = headers            # mmap: layer -> sha256 of the store header
        self.prefetcher = Prefetcher(plan, stores, enabled=ts.prefetch)
        self._submitted: int | None = None  # the step index whose working set the prefetcher prepares
        self._sets: dict[int, LayerWorkingSet] = {}
        self._bound: dict[int, torch.Tensor] = {}
        # CUDA: the working set goes host -> device from pinned memory on a side stream (the
        # paper's design); the pinned buffers live until the copy is done (the next bind)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pinned: list[torch.Tensor] = []
        self._pending_chain: list[dict[str, Any]] | None = None  # the chain of the checkpoint being written

    @classmethod
    def open(cls, *, ts: TrainSettings, plan: TablePlan, model_config, work: Path, resumed: Checkpoint | None,
             batches: Batches, d: Dist, device) -> TableStores:
        """The stores of a new run (fresh: the lazy init), or of a resumed run at its checkpoint."""
        optimizer = make_row_optimizer(ts.table_optimizer, beta1=ts.beta1, beta2=ts.beta2, eps=ts.eps)
        specs = store_specs(plan, model_config, ts.seed, ts.table_optimizer)
        rec = store_record(resumed) if resumed is not None else {"chain": [], "headers": {}}
        run_dir = resumed.path.parent.parent if resumed is not None else work
        chain = list(rec["chain"])
        stores: dict[int, RowStore] = {}
        headers: dict[str, str] = {}
        try:
            for layer, spec in specs.items():
                paths = chain_paths(run_dir, chain, layer)          # checked against the checkpoint first
                if ts.table_store == "memory":
                    stores[layer] = replay(memory_store(spec), paths) if paths else memory_store(spec)
                    continue
                store_dir = work / TABLES_DIR
                fresh = not header_path(store_dir, layer).is_file()
                if not fresh and resumed is not None and str(layer) in rec["headers"]:
                    check_store_header(store_dir, layer, rec, resumed)
                stores[layer] = store = open_store(store_dir, spec, writable=True, create=True)
                if fresh:                                           # a new run, or a store deleted: rebuild
                    replay(store, paths)
                else:
                    rollback(store, paths)                          # the blocks written after the checkpoint
                headers[str(layer)] = sha256_file(header_path(store_dir, layer))
        except BaseException:
            for s in stores.values():
                s.close()
            raise
        return cls(ts=ts, plan=plan, stores=stores, optimizer=optimizer, batches=batches, d=d, device=device,
                   chain=chain, headers=headers)

    # ---- a step

    def bind(self, model, step_index: int) -> None:
        """Bind the working set of step ``step_index`` (and start preparing the next one)."""
        if self._submitted != step_index:
            self.prefetcher.close()
            self.prefetcher = Prefetcher(self.plan, self.stores, enabled=self.ts.prefetch)
            self.prefetcher.submit(self.batches.train_canonical(step_index))
        self._sets = self.prefetcher.take()
        self._submitted = None
        if step_index + 1 < self.ts.steps:                  # step t+1's batch is known: gather it meanwhile
            self.prefetcher.submit(self.batches.train_canonical(step_index + 1))
            self._submitted = step_index + 1
        per = self.batches.B // self.batches.world
        lo = self.batches.rank * per
        working = {}
        if self._copy_stream is not None:  # the previous step's copies finished long ago: free their buffers
            self._copy_stream.synchronize()
            self._pinned = []
        for layer, ws in self._sets.items():
            rows = self._to_device(ws.values).requires_grad_(True)
            local = self._to_device(np.ascontiguousarray(ws.local[lo:lo + per]))
            working[layer] = (rows, local)
            self._bound[layer] = rows
        if self._copy_stream is not None:  # the compute stream waits for the copies, nothing more
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
            for rows, local in working.values():
                rows.record_stream(torch.cuda.current_stream(self.device))
                local.record_stream(torch.cuda.current_stream(self.device))
        model.bind_working_set(working)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A copy of ``array`` on the run's device: on CUDA through a pinned buffer and the side
        stream (asynchronous to the host); on the CPU a plain copy (the store may change the
        gathered array's rows later)."""
        if self._copy_stream is None:
            return torch.from_numpy(array.copy())
        host = torch.from_numpy(array).pin_memory()
        self._pinned.append(host)
        with torch.cuda.stream(self._copy_stream):
            return host.to(self.device, non_blocking=True)

    def grads(self, model) -> dict[int, np.ndarray]:
        """Unbind; each layer's working-set gradient (k, D), averaged over the ranks."""
        model.unbind_working_set()
        out = {}
        for layer, rows in self._bound.items():
            g = rows.grad if rows.grad is not None else torch.zeros_like(rows)
            if self.d.world_size > 1:
                g = g.contiguous()
                all_reduce_sum(g, self.d)
                g /= self.d.world_size
            out[layer] = g.detach().float().cpu().numpy()
        self._bound = {}
        return out

    def step(self, grads: dict[int, np.ndarray], lr: float, step: int) -> None:
        """The row optimizer on every layer's working set (``step``: 1-based, global)."""
        for layer, ws in self._sets.items():
            self.optimizer.apply(self.stores[layer], ws.rows, grads[layer], lr=lr, step=step,
                                 values=ws.values, state=ws.state)
        self._sets = {}

    def abandon(self) -> None:
        """A step that will not be applied (NaN): unbind and forget its working set."""
        self._bound, self._sets = {}, {}

    # ---- checkpoints

    def write_deltas(self, work: Path, step: int) -> dict[str, Any]:
        """Rank 0: the rows changed since the last checkpoint, per layer, into
        ``<work>/table_deltas/step_<N>/``; the mmap stores flushed. Returns the checkpoint's
        ``table_store`` record (with the new link of the chain)."""
        since = self.chain[-1]["step"] if self.chain else None
        directory = delta_dir(work, step)
        directory.mkdir(parents=True, exist_ok=True)
        records = {}
        for layer, store in self.stores.items():
            rec = write_delta(store, directory, step=step, since=since)
            records[str(layer)] = sha256_file(rec.path)
            store.flush()
        self._pending_chain = [*[c for c in self.chain if c["step"] < step],
                               {"step": step, "since": since, "records": records}]
        return self.record(self._pending_chain)

    def record(self, chain: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """What a checkpoint's ``state.json`` records of the tables (``table_store``)."""
        dim = self.plan.embed_dim_per_head
        return {"backend": self.ts.table_store, "optimizer": self.optimizer.name,
                "state": dict(self.optimizer.state_spec(dim)),
                "state_bytes_per_row": self.optimizer.state_bytes_per_row(dim),
                "headers": dict(self.headers), "chain": list(self.chain if chain is None else chain)}

    def committed(self, step: int) -> None:
        """The checkpoint at ``step`` is committed: its delta is the chain's last link; the
        stores are clean (every rank calls it)."""
        pending = self._pending_chain
        if pending is not None and pending[-1]["step"] == step:
            self.chain = pending
        self._pending_chain = None
        for store in self.stores.values():
            store.mark_clean()

    def close(self) -> None:
        self.prefetcher.close()
        for store in self.stores.values():
            store.close()
