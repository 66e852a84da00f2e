"""The batches as tensors on the training device: what the loop reads each step.

:class:`BatchFeed` turns :class:`~engram_cli.train.data.Batches` (NumPy windows, a pure function of
(seed, step)) into (model ids, canonical ids, targets) tensors on the device, and holds the fixed
validation batches there. It is the one seam between the data and the model: a prefetching data
path (reading the step's Engram rows ahead, say) replaces or wraps it without touching the loop.
"""

from __future__ import annotations

import torch

from engram_cli.train.data import Batch, Batches

#: one batch on the device: model ids, canonical ids of the inputs, next-token targets; (B, T) int64 each
Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class BatchFeed:
    """This rank's slice of each step's global batch, and the validation batches, on ``device``."""

    def __init__(self, batches: Batches, device, eval_batches: int):
        self.batches = batches
        self.device = device
        self.val: list[Tensors] = [_on(b, device) for b in batches.val_batches(eval_batches)]  # fixed, held-out

    @property
    def train_windows(self) -> int:
        """How many training windows the batches draw from (recorded in checkpoints)."""
        return self.batches.train_windows

    def train_batch(self, step_index: int) -> Tensors:
        """The batch of the step with 0-based index ``step_index`` (this rank's slice)."""
        return _on(self.batches.train_batch(step_index), self.device, non_blocking=True)


def _on(b: Batch, device, non_blocking: bool = False) -> Tensors:
    x, c, y = (torch.from_numpy(a).to(device, non_blocking=non_blocking) for a in (b.idx, b.canonical, b.targets))
    return x, c, y
