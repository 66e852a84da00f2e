"""The device and the data-parallel process group of a training run.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process draws the same global batch and takes a
disjoint slice of it; :func:`allreduce_gradients` averages the gradients (one flat all-reduce of
the dense gradients, an all-gather of the sparse Engram table gradients' rows), which works on
gloo and NCCL alike. A single process is a :class:`Dist` of world size 1, and every helper here is
then a no-op or the identity.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engram_cli.core.errors import ConfigError


@dataclass
class Dist:
    """This process's place in a (possibly single-process) data-parallel run."""

    rank: int = 0                   # RANK: 0 writes the run directory and reports progress
    world_size: int = 1             # WORLD_SIZE: processes in the run
    local_rank: int = 0             # LOCAL_RANK: picks the CUDA device on a machine
    initialized_here: bool = False  # this process started the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_device(spec: str) -> str:
    """The one check of ``--device`` (train, sweep, eval, inspect-gates): ``auto`` | ``cpu`` |
    ``cuda`` | ``cuda:N`` -> the name of the torch device it means on this machine (``auto``: cuda
    when available, else cpu). A device this build or machine lacks is a ConfigError."""
    spec = str(spec).strip().lower()
    kind, _, index = spec.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"--device must be auto, cpu or cuda (or cuda:N), got {spec!r}", "e.g. --device cpu")
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec} was asked for but CUDA is not available (torch {torch.__version__})",
                              "use --device cpu (or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                              f"pass cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    return spec


def resolve_device(spec: str, local_rank: int = 0):
    """``--device`` (:func:`check_device`) -> a torch.device; plain ``cuda`` is ``cuda:local_rank``."""

    name = check_device(spec)
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def init_distributed(device) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on GPU."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":

            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        here = True
    return Dist(rank=rank, world_size=world, local_rank=local, initialized_here=here)


def shutdown(d: Dist) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if d.initialized_here:

        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait for every process (no-op in a single process)."""
    if d.world_size > 1:

        dist.barrier()


def broadcast_parameters(model, d: Dist) -> None:
    """Every rank starts from rank 0's weights (they are equal by seed anyway)."""
    if d.world_size > 1:

        for p in model.parameters():
            dist.broadcast(p.data, 0)


def all_reduce_sum(t, d: Dist) -> None:
    """Sum ``t`` over the processes, in place (no-op in a single process)."""
    if d.world_size > 1:

        dist.all_reduce(t)


def rank_mean(values: list, d: Dist) -> list[float]:
    """The mean over the processes of each scalar tensor in ``values`` (float32), as floats."""
    logged = torch.stack([v.detach().float() for v in values])
    if d.world_size > 1:
        all_reduce_sum(logged, d)
        logged /= d.world_size
    return [float(x) for x in logged]


def rank_checksums(model, device, d: Dist) -> list[float] | None:
    """A weight checksum (sum of |w|, float64) per rank, gathered on every rank; None in a single
    process. Equal values show that the ranks stayed in lockstep."""
    if d.world_size <= 1:
        return None

    mine = torch.tensor([sum(float(p.detach().double().abs().sum()) for p in model.parameters())],
                        dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(d.world_size)]
    dist.all_gather(gathered, mine)
    return [float(g) for g in gathered]


def autocast(device):
    """bf16 autocast on CUDA; float32 (no autocast) on CPU."""

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def allreduce_gradients(dense: list, tables: list, world_size: int) -> None:
    """Average gradients over the processes (call after ``backward`` on every rank).

    Dense gradients: flattened into one buffer, one ``all_reduce`` (sum), divided by the world
    size. Engram table gradients are sparse (the looked-up rows only); NCCL cannot all-reduce
    sparse tensors, so every rank all-gathers the others' coalesced (row indices, row values) —
    padded to the largest count, which is first all-gathered — and sums them into one coalesced
    sparse gradient. Every rank ends with the same gradients (the same sums in the same order).
    """

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in dense:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    for p in tables:
        g = p.grad.coalesce() if p.grad is not None else torch.sparse_coo_tensor(
            torch.zeros(1, 0, dtype=torch.long, device=p.device), torch.zeros(0, p.shape[1], device=p.device), p.shape,
            check_invariants=False)
        rows, vals = g.indices()[0], g.values()  # (R,), (R, D)
        count = torch.tensor([rows.numel()], device=p.device)
        counts = [torch.zeros_like(count) for _ in range(world_size)]
        dist.all_gather(counts, count)
        R = int(max(int(c) for c in counts))
        pad_rows = torch.zeros(R, dtype=rows.dtype, device=p.device)
        pad_vals = torch.zeros(R, vals.shape[1], dtype=vals.dtype, device=p.device)
        pad_rows[:rows.numel()], pad_vals[:rows.numel()] = rows, vals
        all_rows = [torch.empty_like(pad_rows) for _ in range(world_size)]
        all_vals = [torch.empty_like(pad_vals) for _ in range(world_size)]
        dist.all_gather(all_rows, pad_rows)
        dist.all_gather(all_vals, pad_vals)
        idx = torch.cat([r[:int(c)] for r, c in zip(all_rows, counts)])
        val = torch.cat([v[:int(c)] for v, c in zip(all_vals, counts)])
        p.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), val / world_size, p.shape, check_invariants=False).coalesce()
