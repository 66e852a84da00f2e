"""engram_cli.train.distributed beyond the torchrun tests (tests/test_ddp.py): the device, the
single-process paths (every helper a no-op or the identity), and the gradient all-reduce — dense
and sparse — on a real gloo group of world size 1 in this process and of world size 2 in two
spawned processes, against the plain average."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engram_cli.core.errors import ConfigError
from engram_cli.train import distributed as D

# ---------------------------------------------------------------------------------------------
# the device


def test_resolve_device_cpu_and_auto():
    assert D.resolve_device("cpu") == torch.device("cpu")
    auto = D.resolve_device("auto")
    assert auto == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu", ""])
def test_resolve_device_refuses_what_it_does_not_know(spec):
    with pytest.raises(ConfigError, match="--device must be auto, cpu or cuda"):
        D.resolve_device(spec)


@pytest.mark.parametrize("spec", ["cuda", "cuda:7"])
def test_resolve_device_cuda_without_cuda_is_refused(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available") as e:
        D.resolve_device(spec)
    assert "--device cpu" in e.value.hint
    assert D.resolve_device("auto") == torch.device("cpu")


def test_resolve_device_picks_the_local_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [D.resolve_device("cuda", r) for r in (0, 1, 2, 3)] == [torch.device("cuda", i) for i in (0, 1, 0, 1)]


# ---------------------------------------------------------------------------------------------
# one process: no group, nothing communicated


def test_one_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = D.init_distributed(torch.device("cpu"))
    assert d == D.Dist() and d.main and d.world_size == 1 and not d.initialized_here

    def no_collectives(*a, **k):
        raise AssertionError("a collective was called in a single process")

    for name in ("barrier", "all_reduce", "broadcast", "all_gather", "destroy_process_group"):
        monkeypatch.setattr(dist, name, no_collectives)
    D.barrier(d)
    D.shutdown(d)
    t = torch.tensor([1.0, 2.0])
    D.all_reduce_sum(t, d)
    assert t.tolist() == [1.0, 2.0]
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    D.broadcast_parameters(model, d)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert D.rank_checksums(model, torch.device("cpu"), d) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init_distributed(torch.device("cpu")) == D.Dist()


def test_autocast_only_on_cuda():
    assert isinstance(D.autocast(torch.device("cpu")), contextlib.nullcontext)


# ---------------------------------------------------------------------------------------------
# the gradient all-reduce on a gloo group


def rank_grads(rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Rank ``rank``'s gradients: two dense (one None: a parameter that got no gradient) and
    three sparse tables (uncoalesced rows with repeats; a table no lookup reached; an empty one)."""
    g = torch.Generator().manual_seed(rank)
    dense = [torch.randn(3, 4, generator=g), None]
    rows = torch.tensor([1, 4, 1, rank + 2])  # row 1 twice: an uncoalesced gradient
    sparse = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(4, 5, generator=g), (8, 5), check_invariants=True)
    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 5), (6, 5), check_invariants=True)
    return dense, [sparse, None if rank == 0 else sparse * 2, empty]


def expected(world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The plain average of every rank's gradients (the reference)."""
    per = [rank_grads(r) for r in range(world)]
    dense = [sum(per[r][0][0] for r in range(world)) / world, torch.zeros(5)]
    sparse = []
    for i, shape in enumerate(((8, 5), (8, 5), (6, 5))):
        total = torch.zeros(shape)
        for r in range(world):
            if per[r][1][i] is not None:
                total += per[r][1][i].to_dense()
        sparse.append(total / world)
    return dense, sparse


def reduce_on_rank(rank: int, world: int, init: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        dense_grads, sparse_grads = rank_grads(rank)
        dense = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
        tables = [torch.nn.Parameter(torch.zeros(8, 5)), torch.nn.Parameter(torch.zeros(8, 5)),
                  torch.nn.Parameter(torch.zeros(6, 5))]
        for p, g in zip(dense, dense_grads):
            p.grad = g
        for p, g in zip(tables, sparse_grads):
            p.grad = g
        D.allreduce_gradients(dense, tables, world)
        assert all(p.grad.is_sparse and p.grad.is_coalesced() for p in tables)
        torch.save({"dense": [p.grad for p in dense], "sparse": [p.grad.to_dense() for p in tables]},
                   f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def check(results: Path, world: int) -> None:
    dense, sparse = expected(world)
    for rank in range(world):
        got = torch.load(results / f"rank{rank}.pt")
        for a, b in zip(got["dense"], dense):
            torch.testing.assert_close(a, b)
        for a, b in zip(got["sparse"], sparse):
            torch.testing.assert_close(a, b)


def test_allreduce_gradients_on_a_group_of_one(tmp_path):
    reduce_on_rank(0, 1, f"file://{tmp_path / 'store'}", str(tmp_path))
    check(tmp_path, 1)


@pytest.mark.slow
def test_allreduce_gradients_on_two_processes_is_the_average(tmp_path):
    mp.spawn(reduce_on_rank, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    check(tmp_path, 2)
