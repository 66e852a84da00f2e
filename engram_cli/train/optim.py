"""The two optimizers of an Engram model and the learning-rate schedule applied to them.

AdamW updates the dense parameters (weight decay on matrices only); SparseAdam updates the Engram
tables at ``engram_lr_mult`` (5x) the learning rate, without weight decay (paper Section 4 /
Appendix A). Both follow :func:`~engram_cli.train.settings.lr_factor`: linear warmup, then cosine
decay. :class:`Optimizers` holds both for the trainer: the schedule, zeroing, the gradients'
average over the ranks and clipping, and the update — the one place where the tables' rows are
updated.
"""

from __future__ import annotations

import torch

from engram_cli.train.distributed import Dist, allreduce_gradients
from engram_cli.train.settings import TrainSettings, lr_factor


def make_optimizers(model, ts: TrainSettings) -> dict:
    """``{"adamw": ..., "sparse_adam": ...}`` (the second only when the model has Engram tables).

    AdamW takes the dense parameters in two groups: matrices (dim >= 2: linear, embedding,
    expert and conv weights) with ``weight_decay``, vectors (norm gains) without. SparseAdam takes
    the Engram tables at ``lr * engram_lr_mult`` and has no weight decay (the paper's setting;
    decaying every row each step would also make the update dense). The trainer rescales every
    group's ``lr`` with :func:`apply_schedule` before each step.
    """

    dense = model.dense_parameters()
    betas = (ts.beta1, ts.beta2)
    adamw = torch.optim.AdamW([{"params": [p for p in dense if p.dim() >= 2], "weight_decay": ts.weight_decay},
                               {"params": [p for p in dense if p.dim() < 2], "weight_decay": 0.0}],
                              lr=ts.lr, betas=betas, eps=ts.eps)
    optimizers = {"adamw": adamw}
    tables = model.engram_table_parameters()
    if tables:
        optimizers["sparse_adam"] = torch.optim.SparseAdam(tables, lr=ts.lr * ts.engram_lr_mult, betas=betas, eps=ts.eps)
    return optimizers


def apply_schedule(optimizers: dict, ts: TrainSettings, step: int, row_tables: bool = False) -> dict[str, float | None]:
    """Set every group's ``lr`` for the step with 0-based index ``step``; returns
    ``{"lr": ..., "engram_lr": ...}`` as metrics.jsonl records them (``engram_lr`` None without
    tables; ``row_tables``: the tables live in row stores, updated at ``engram_lr`` by a row optimizer)."""
    f = lr_factor(step, ts)
    lr = ts.lr * f
    for g in optimizers["adamw"].param_groups:
        g["lr"] = lr
    engram_lr = None
    if "sparse_adam" in optimizers or row_tables:
        engram_lr = ts.lr * ts.engram_lr_mult * f
        for g in optimizers["sparse_adam"].param_groups if "sparse_adam" in optimizers else ():
            g["lr"] = engram_lr
    return {"lr": lr, "engram_lr": engram_lr}


class Optimizers:
    """AdamW on the dense weights and, with Engram tables, SparseAdam on the table rows a step
    looked up ("module" runs) or the row optimizer on the step's working set of the row stores
    (``row_tables``, a :class:`~engram_cli.train.tablestore.TableStores`)."""

    def __init__(self, model, ts: TrainSettings, row_tables=None):
        self.ts = ts
        self.model = model
        self.dense = model.dense_parameters()              # AdamW's, clipped
        self.tables = model.engram_table_parameters()      # SparseAdam's (sparse gradients); [] without Engram
        self.by_name = make_optimizers(model, ts)          # {"adamw", "sparse_adam"?}: what checkpoints store
        self.row_tables = row_tables                       # TableStores of a store run, else None
        self._engram_lr: float | None = None
        self._row_grads: dict = {}

    def schedule(self, step_index: int) -> dict[str, float | None]:
        """Set the learning rates of the step with 0-based index ``step_index`` (:func:`apply_schedule`)."""
        lr = apply_schedule(self.by_name, self.ts, step_index, row_tables=self.row_tables is not None)
        self._engram_lr = lr["engram_lr"]
        return lr

    def zero_grad(self) -> None:
        for opt in self.by_name.values():
            opt.zero_grad(set_to_none=True)

    def reduce_and_clip(self, d: Dist) -> float:
        """Average the gradients over the ranks, clip the dense ones (``grad_clip`` > 0); returns
        the dense gradients' global L2 norm before clipping."""
        if self.row_tables is not None:  # the working sets' gradients, averaged over the ranks; unbound
            self._row_grads = self.row_tables.grads(self.model)
        if d.world_size > 1:
            allreduce_gradients(self.dense, self.tables, d.world_size)
        if self.ts.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.dense, self.ts.grad_clip))
        return float(torch.norm(torch.stack([p.grad.norm() for p in self.dense if p.grad is not None])))

    def step(self, step: int | None = None) -> None:
        """The update of optimizer step ``step`` (1-based): AdamW on the dense weights, then
        SparseAdam on the looked-up table rows, or the row optimizer on the row stores' working set."""
        self.by_name["adamw"].step()
        if "sparse_adam" in self.by_name:
            self.by_name["sparse_adam"].step()
        if self.row_tables is not None:
            self.row_tables.step(self._row_grads, self._engram_lr, step)
            self._row_grads = {}
