"""The working set of a step and the prefetch stage that prepares the next one while a step runs.

Engram's memory is addressed by the tokens alone, so the rows a step reads are known as soon as its
tokens are. :func:`working_rows` turns a batch's canonical ids into each layer's hash slots
(``engram_cli.tables.hashing.hash_ngrams`` + the plan's head offsets: rows of the concatenated
table), the sorted unique rows, and every (position, head)'s local index into them;
:func:`gather_working_set` adds the gathered rows (one contiguous (k, D) array) and the optimizer's
row state. The step's forward reads only the working set (by local index), its backward yields the
dense gradient of those k rows, and the row optimizer writes the update back to the store
(``engram_cli.train.rowopt``).

:class:`Prefetcher` is that preparation as a pipeline stage on a background thread (TorchRec's
``PrefetchTrainPipelineSparseDist`` idea): :meth:`~Prefetcher.submit` step t+1's ids while step t
runs, :meth:`~Prefetcher.take` the working set when step t+1 starts. Step t's write-back may land
before or after the background thread read a row; so ``submit`` registers a write watch on every
store (``RowStore.watch``) and ``take`` re-reads, after the wait, every working-set row written
since ``submit`` — prefetching never changes results (a test holds on and off bit-identical).
``enabled=False`` prepares the working set in ``take`` itself, on the calling thread.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engram_cli.model.store import RowStore, WriteWatch
from engram_cli.tables.hashing import hash_ngrams
from engram_cli.tables.plan import TablePlan


@dataclass
class LayerWorkingSet:
    """One layer's part of a step's working set."""

    layer_id: int
    rows: np.ndarray                 # (k,) int64: the sorted unique rows of the concatenated table
    local: np.ndarray                # ids.shape + (H,) int64: index of each (position, head) into rows
    values: np.ndarray | None = None                            # (k, D) float32: the gathered rows
    state: dict[str, np.ndarray] = field(default_factory=dict)  # optimizer state, (k, width) each


def working_rows(canonical_ids: Any, plan: TablePlan, layer_id: int) -> LayerWorkingSet:
    """Rows of layer ``layer_id``'s table that ``canonical_ids`` ([B, T] or [T]) look up, without values."""
    slots = hash_ngrams(np.asarray(canonical_ids), plan, layer_id)              # (..., H)
    flat = slots + np.asarray(plan.head_offsets(layer_id), dtype=np.int64)      # rows of the one table
    rows, local = np.unique(flat.reshape(-1), return_inverse=True)
    return LayerWorkingSet(layer_id, rows.astype(np.int64), local.reshape(flat.shape).astype(np.int64))


def gather_working_set(canonical_ids: Any, plan: TablePlan, stores: dict[int, RowStore], *,
                       state: bool = True) -> dict[int, LayerWorkingSet]:
    """Every layer's working set with its rows (and, with ``state``, its optimizer state) gathered."""
    out = {}
    for layer_id, store in stores.items():
        ws = working_rows(canonical_ids, plan, layer_id)
        ws.values = store.gather(ws.rows)
        if state:
            ws.state = {name: store.gather_state(name, ws.rows) for name in store.state_names}
        out[layer_id] = ws
    return out


def patch_working_set(ws: LayerWorkingSet, store: RowStore, written: np.ndarray) -> int:
    """Re-read from ``store`` the rows of ``ws`` that are in ``written`` (sorted unique); returns how many."""
    pos = np.flatnonzero(np.isin(ws.rows, written, assume_unique=True))
    if pos.size:
        rows = ws.rows[pos]
        if ws.values is not None:
            ws.values[pos] = store.gather(rows)
        for name in ws.state:
            ws.state[name][pos] = store.gather_state(name, rows)
    return int(pos.size)


class Prefetcher:
    """Prepares the next step's working set on a background thread (module docstring)."""

    def __init__(self, plan: TablePlan, stores: dict[int, RowStore], *, state: bool = True, enabled: bool = True):
        self.plan, self.stores, self.state, self.enabled = plan, stores, state, enabled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch") if enabled else None
        self._pending: tuple[Any, Future | None, dict[int, WriteWatch]] | None = None
        self.patched_rows = 0        # rows re-read by take() so far (what prefetching had to repair)

    def submit(self, canonical_ids: Any) -> None:
        """Start preparing the working set of ``canonical_ids`` (the next step's batch)."""
        if self._pending is not None:
            raise RuntimeError("Prefetcher.submit called twice without take")
        ids = np.array(canonical_ids, copy=True)  # the caller may reuse its buffer
        if not self.enabled:
            self._pending = (ids, None, {})
            return
        watches = {layer: store.watch() for layer, store in self.stores.items()}
        future = self._pool.submit(gather_working_set, ids, self.plan, self.stores, state=self.state)
        self._pending = (ids, future, watches)

    def ready(self) -> None:
        """Wait until the background preparation is done (tests use it to force an order)."""
        if self._pending is not None and self._pending[1] is not None:
            self._pending[1].result()

    def take(self) -> dict[int, LayerWorkingSet]:
        """The working set of the batch last submitted, exact as of now (rows written since submit re-read)."""
        if self._pending is None:
            raise RuntimeError("Prefetcher.take called without submit")
        ids, future, watches = self._pending
        self._pending = None
        if future is None:
            return gather_working_set(ids, self.plan, self.stores, state=self.state)
        try:
            sets = future.result()
        finally:
            for layer, w in watches.items():
                self.stores[layer].unwatch(w)
        for layer, ws in sets.items():
            self.patched_rows += patch_working_set(ws, self.stores[layer], watches[layer].rows())
        return sets

    def close(self) -> None:
        if self._pending is not None and self._pending[1] is not None:
            self._pending[1].cancel()
            for layer, w in self._pending[2].items():
                self.stores[layer].unwatch(w)
        self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
