"""Row optimizers for the Engram tables in a row store (``engram_cli.model.store``).

A step touches a *working set* of each layer's table: the sorted unique rows its tokens hashed to,
their gathered values (k, D) and the dense gradient of those rows (k, D) — every lookup of a row in
the step already summed into its gradient row (the "exact" of FBGEMM's names: one update per
distinct row). A row optimizer maps (values, state, gradient) to new values and new state; its
state lives in the store beside the rows (:meth:`RowOptimizer.state_spec`), zero at the start.
The update is a pure function of its inputs (NumPy arrays in, NumPy arrays out): the step count and learning rate come from the
trainer (the step count is global: the number of optimizer steps taken, 1 for the first).

``adam`` (:class:`RowAdam`) is exactly ``torch.optim.SparseAdam``'s arithmetic in float32, in its
order of operations (torch 2.x ``torch/optim/_functional.py::sparse_adam``), so that a run moved
to the store changes no bit (``tests/test_store.py`` checks it against SparseAdam on an
``nn.Embedding``)::

    m' = m + (g - m) * (1 - beta1)          v' = v + (g*g - v) * (1 - beta2)
    w' = w + (-lr * sqrt(1 - beta2**t) / (1 - beta1**t)) * (m' / (sqrt(v') + eps))

(the step size in float64, then every product in float32, with torch's CPU kernels: its
vectorized float32 ``sqrt`` is not always NumPy's correctly rounded one, and SparseAdam uses
it). State: ``m`` and ``v``, D floats each:
**2 x D x 4 bytes per row** (512 bytes at D = 64).

``rowwise-adagrad`` (:class:`RowwiseAdagrad`) is FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` without
weight decay (``fbgemm_gpu/codegen/embedding_backward_code_generator.py``, ``rowwise_adagrad``):
one accumulator per row, the running sum of the mean squared gradient over the row's D values::

    s' = s + sum_d(g_d ** 2) / D
    w' = w - (lr / (sqrt(s') + eps)) * g

(float32 throughout: ``sum_d`` is NumPy's pairwise sum over the row). State: ``sum_sq``, one
float: **4 bytes per row**. (nanochat's Engram PR keeps the same one scalar per row.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engram_cli.core.errors import ConfigError
from engram_cli.model.store import RowStore

ROW_OPTIMIZERS = ("adam", "rowwise-adagrad")


class RowOptimizer:
    """The interface: ``state_spec``, ``update``; :meth:`apply` runs one step on a store's rows."""

    name = ""

    def state_spec(self, dim: int) -> tuple[tuple[str, int], ...]:
        """The (name, width) of each state array the store keeps per row."""
        raise NotImplementedError

    def state_bytes_per_row(self, dim: int) -> int:
        return 4 * sum(width for _, width in self.state_spec(dim))

    def update(self, values: np.ndarray, state: dict[str, np.ndarray], grad: np.ndarray, *, lr: float,
               step: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """New (values, state) of a working set's rows; ``step`` is the 1-based optimizer step."""
        raise NotImplementedError

    def apply(self, store: RowStore, rows: np.ndarray, grad: np.ndarray, *, lr: float, step: int,
              values: np.ndarray | None = None, state: dict[str, np.ndarray] | None = None) -> None:
        """One step on ``rows`` (sorted unique) of ``store``: gather (unless the working set's
        ``values``/``state`` are given), update, scatter rows and state back."""
        if rows.size == 0:
            return
        if values is None:
            values = store.gather(rows)
        if state is None:
            state = {name: store.gather_state(name, rows) for name, _ in self.state_spec(store.dim)}
        new_values, new_state = self.update(values, state, grad, lr=lr, step=step)
        for name, arr in new_state.items():
            store.scatter_state(name, rows, arr)
        store.scatter(rows, new_values)


@dataclass(frozen=True)
class RowAdam(RowOptimizer):
    """SparseAdam on the working set (module docstring)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    name = "adam"

    def state_spec(self, dim: int) -> tuple[tuple[str, int], ...]:
        return (("m", dim), ("v", dim))

    def update(self, values, state, grad, *, lr, step):
        import torch  # lazy: torch's own float32 kernels (its vectorized sqrt is not NumPy's correctly rounded one)

        t = torch.from_numpy
        g = t(np.ascontiguousarray(grad, dtype=np.float32))
        m, v = t(np.ascontiguousarray(state["m"])), t(np.ascontiguousarray(state["v"]))
        m_upd = g.sub(m).mul_(1 - self.beta1)          # SparseAdam's exp_avg_update_values
        v_upd = g.pow(2).sub_(v).mul_(1 - self.beta2)  # ... exp_avg_sq_update_values
        m_new, v_new = m + m_upd, v + v_upd            # exp_avg.add_(sparse), exp_avg_sq.add_(sparse)
        numer = m_upd.add_(m)                          # == m_new, computed as SparseAdam does
        denom = v_upd.add_(v).sqrt_().add_(self.eps)
        step_size = lr * math.sqrt(1 - self.beta2 ** step) / (1 - self.beta1 ** step)
        new_values = t(np.ascontiguousarray(values, dtype=np.float32)) + (-step_size * numer.div_(denom))
        return new_values.numpy(), {"m": m_new.numpy(), "v": v_new.numpy()}


@dataclass(frozen=True)
class RowwiseAdagrad(RowOptimizer):
    """FBGEMM's EXACT_ROWWISE_ADAGRAD on the working set (module docstring); ``step`` is unused."""

    eps: float = 1e-8
    name = "rowwise-adagrad"

    def state_spec(self, dim: int) -> tuple[tuple[str, int], ...]:
        return (("sum_sq", 1),)

    def update(self, values, state, grad, *, lr, step):
        g = np.asarray(grad, dtype=np.float32)
        s_new = state["sum_sq"] + (g * g).sum(axis=1, keepdims=True, dtype=np.float32) / np.float32(g.shape[1])
        multiplier = np.float32(lr) / (np.sqrt(s_new) + np.float32(self.eps))
        return values - multiplier * g, {"sum_sq": s_new}


def make_row_optimizer(name: str, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> RowOptimizer:
    """The row optimizer ``name`` (one of :data:`ROW_OPTIMIZERS`)."""
    if name == "adam":
        return RowAdam(beta1, beta2, eps)
    if name == "rowwise-adagrad":
        return RowwiseAdagrad(eps)
    raise ConfigError(f"unknown table optimizer {name!r}", f"use one of: {', '.join(ROW_OPTIMIZERS)}")
