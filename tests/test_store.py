"""The row store (engram_cli.model.store), the row optimizers (train.rowopt), the working set and its
prefetch (train.prefetch) and delta checkpoints (train.deltas): exact, order-independent, tiny."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from engram_cli.cli import EngramGroup
from engram_cli.core.errors import ArtifactError, ConfigError
from engram_cli.model import store as store_module
from engram_cli.model.store import (
    BLOCK_ROWS,
    DIRTY,
    INIT,
    SPARSE_PROBE_BYTES,
    StoreFullError,
    StoreSpec,
    initial_block,
    initial_rows,
    make_store,
    open_store,
    store_files,
)
from engram_cli.tables.plan import make_plan
from engram_cli.train.deltas import delta_paths, read_delta, replay, rollback, write_delta
from engram_cli.train.prefetch import Prefetcher, gather_working_set, working_rows
from engram_cli.train.rowopt import RowAdam, RowwiseAdagrad, make_row_optimizer

from cli_asserts import one_red_line

ROOT = Path(__file__).resolve().parents[1]
D = 8
ADAM = RowAdam(0.9, 0.95, 1e-8)


def spec(rows: int = 3000, **kw) -> StoreSpec:
    base = dict(layer_id=1, rows=rows, dim=D, seed=7, init_std=0.02, state=ADAM.state_spec(D), plan_fingerprint="f" * 64)
    return StoreSpec(**{**base, **kw})


def store(backend: str, tmp_path: Path, sp: StoreSpec | None = None, **kw):
    return make_store(backend, sp or spec(), tmp_path / "store", **kw)


# ---------------------------------------------------------------------------------------------
# initialization


def test_initial_rows_is_the_philox_block_definition():
    rows = np.array([0, 5, 1023, 1024, 5000])
    got = initial_rows(3, 15, rows, D, 0.02)
    for r, row in zip(rows, got):
        b = r // BLOCK_ROWS
        gen = np.random.Generator(np.random.Philox(key=[3, 15], counter=[0, 0, b, 0]))
        want = gen.standard_normal((BLOCK_ROWS, D), dtype=np.float32)[r % BLOCK_ROWS] * np.float32(0.02)
        assert np.array_equal(row, want)
    assert got.dtype == np.float32 and abs(float(initial_rows(3, 15, np.arange(4096), D, 1.0).std()) - 1) < 0.03
    # keyed by (seed, layer): another seed or layer gives other rows
    assert not np.array_equal(got, initial_rows(4, 15, rows, D, 0.02))
    assert not np.array_equal(got, initial_rows(3, 1, rows, D, 0.02))
    assert not np.array_equal(initial_block(3, 15, 0, D, 1.0), initial_block(3, 15, 1, D, 1.0))


def test_initial_rows_do_not_depend_on_order_or_repeats():
    rows = np.random.default_rng(0).integers(0, 10 * BLOCK_ROWS, 500)
    a = initial_rows(1, 2, rows, D, 0.1)
    perm = np.random.default_rng(1).permutation(rows.size)
    assert np.array_equal(initial_rows(1, 2, rows[perm], D, 0.1), a[perm])
    for r in rows[:20]:
        assert np.array_equal(initial_rows(1, 2, [r], D, 0.1)[0], a[rows == r][0])


@pytest.mark.parametrize("backend", ["memory", "mmap"])
def test_store_values_do_not_depend_on_access_order(backend, tmp_path):
    n = 5 * BLOCK_ROWS + 17  # a partial last block
    want = initial_rows(7, 1, np.arange(n), D, 0.02)
    rng = np.random.default_rng(0)
    for trial in range(3):
        with store(backend, tmp_path / str(trial), spec(n)) as st:
            for _ in range(4):  # random sorted unique subsets first, then everything
                rows = np.unique(rng.integers(0, n, 50))
                assert np.array_equal(st.gather(rows), want[rows])
            assert np.array_equal(st.gather(np.arange(n)), want)


def test_memory_and_mmap_hold_identical_values(tmp_path):
    n = 4 * BLOCK_ROWS
    mem, mm = store("memory", tmp_path, spec(n)), store("mmap", tmp_path, spec(n))
    rng = np.random.default_rng(3)
    for _ in range(3):
        rows = np.unique(rng.integers(0, n, 300))
        vals = rng.standard_normal((rows.size, D)).astype(np.float32)
        assert np.array_equal(mm.gather(rows[::2]), mem.gather(rows[::2]))
        for st in (mem, mm):
            st.scatter(rows, vals)
            st.scatter_state("m", rows, vals * 2)
    everything = np.arange(n)
    assert np.array_equal(mem.gather(everything), mm.gather(everything))
    assert np.array_equal(mem.gather_state("m", everything), mm.gather_state("m", everything))
    assert np.array_equal(mem.gather_state("v", everything), np.zeros((n, D), np.float32))
    mm.close()


def test_untouched_rows_of_a_huge_table_cost_no_disk(tmp_path):
    """A 1e8-row table (3.2 GB of rows, twice that in Adam state) as sparse files: touching a few
    rows materializes their blocks only."""
    n, dim = 100_000_000, 8
    sp = StoreSpec(layer_id=3, rows=n, dim=dim, seed=0, init_std=0.02, state=ADAM.state_spec(dim))
    with open_store(tmp_path / "big", sp) as st:
        rows = np.array([0, 12_345_678, 99_999_999])
        assert np.array_equal(st.gather(rows), initial_rows(0, 3, rows, dim, 0.02))
        st.scatter_state("m", rows, np.ones((3, dim), np.float32))
        assert st.materialized_blocks() == 3
        st.flush()
        files = store_files(tmp_path / "big", sp)
        assert files["rows"][0].stat().st_size == n * dim * 4
        for path, _ in files.values():
            assert os.stat(path).st_blocks * 512 < 2 << 20, path  # a few 32 KiB blocks + the block map
    with open_store(tmp_path / "big", sp, writable=False) as ro:  # reopened: the same rows, still sparse
        assert np.array_equal(ro.gather(rows), initial_rows(0, 3, rows, dim, 0.02))
        assert np.array_equal(ro.gather_state("m", rows), np.ones((3, dim), np.float32))


# ---------------------------------------------------------------------------------------------
# the mmap store on disk: persistence, validation, the writer lock


def test_mmap_store_persists_across_reopen(tmp_path):
    rows = np.array([3, 2000, 2999])
    vals = np.arange(3 * D, dtype=np.float32).reshape(3, D)
    with store("mmap", tmp_path) as st:
        st.scatter(rows, vals)
    with store("mmap", tmp_path, writable=False) as ro:
        assert np.array_equal(ro.gather(rows), vals)
        assert np.array_equal(ro.gather(np.array([4])), initial_rows(7, 1, [4], D, 0.02))  # block 0, materialized
        assert np.array_equal(ro.gather(np.array([1500])), initial_rows(7, 1, [1500], D, 0.02))  # a hole, computed
        with pytest.raises(ArtifactError, match="read-only"):
            ro.scatter(rows, vals)


@pytest.mark.parametrize("change, match", [
    (dict(plan_fingerprint="0" * 64), "plan_fingerprint"),
    (dict(rows=3001), "rows"),
    (dict(dim=D + 1), "dim"),
    (dict(seed=8), "seed"),
    (dict(init_std=0.01), "init_std"),
    (dict(state=RowwiseAdagrad().state_spec(D)), "state"),
])
def test_a_store_of_another_table_is_refused(tmp_path, change, match):
    store("mmap", tmp_path).close()
    with pytest.raises(ArtifactError, match=f"made for another table: its {match}"):
        store("mmap", tmp_path, spec(**change))


def test_another_layout_version_and_a_truncated_file_are_refused(tmp_path):
    store("mmap", tmp_path).close()
    header = tmp_path / "store" / "layer_1.json"
    text = header.read_text()
    header.write_text(text.replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(ArtifactError, match="layout version 99, this engram reads 1"):
        store("mmap", tmp_path)
    header.write_text(text)
    rows_file = store_files(tmp_path / "store", spec())["rows"][0]
    os.truncate(rows_file, rows_file.stat().st_size - 4)
    with pytest.raises(ArtifactError, match="truncated"):
        store("mmap", tmp_path)
    with pytest.raises(ArtifactError, match="holds no row store of layer 2"):
        open_store(tmp_path / "store", spec(layer_id=2), writable=False)


@pytest.mark.parametrize("key", ["rows", "blocks", "state.m", "state.v"])
@pytest.mark.parametrize("change", ["truncated", "grown", "missing"])
def test_every_store_file_of_another_size_is_refused(tmp_path, key, change):
    store("mmap", tmp_path).close()
    path, size = store_files(tmp_path / "store", spec())[key]
    if change == "missing":
        path.unlink()
    else:
        os.truncate(path, size - 1 if change == "truncated" else size + 4096)
    want = "is missing" if change == "missing" else f"is {size - 1 if change == 'truncated' else size + 4096:,} bytes"
    for writable in (True, False):
        with pytest.raises(ArtifactError, match=f"row store file .*{path.name} {want}"):
            store("mmap", tmp_path, writable=writable)


@pytest.mark.parametrize("header, match", [
    ("{not json", "is not valid JSON"),
    ("[]", "is not an engram row store header"),
    (json.dumps({"format": "engram.tables"}), "is not an engram row store header"),
    (None, "made for another table: its block_rows is 1024, this run's is 512"),
])
def test_a_header_that_is_not_this_stores_is_refused(tmp_path, header, match):
    store("mmap", tmp_path).close()
    path = tmp_path / "store" / "layer_1.json"
    if header is None:  # a store of another block size: the same files' sizes, another layout
        with pytest.raises(ArtifactError, match=match):
            store("mmap", tmp_path, spec(block_rows=512))
        return
    path.write_text(header)
    with pytest.raises(ArtifactError, match=match):
        store("mmap", tmp_path)


def test_two_writers_are_refused_readers_are_not(tmp_path):
    st = store("mmap", tmp_path)
    with pytest.raises(ArtifactError, match=rf"being written by another process \(pid {os.getpid()}\)"):
        store("mmap", tmp_path)
    code = ("import sys; from engram_cli.model.store import StoreSpec, open_store\n"
            "from engram_cli.core.errors import ArtifactError\n"
            f"sp = StoreSpec(**{dict(layer_id=1, rows=3000, dim=D, seed=7, init_std=0.02, plan_fingerprint='f' * 64)},"
            f" state={ADAM.state_spec(D)!r})\n"
            "try:\n    open_store(sys.argv[1], sp)\nexcept ArtifactError as e:\n    print(e); sys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 3 and "being written by another process" in res.stdout, res.stderr
    with store("mmap", tmp_path, writable=False) as ro:  # a reader takes no lock
        assert ro.gather(np.array([1])).shape == (1, D)
    st.close()
    store("mmap", tmp_path).close()  # released on close


# ---------------------------------------------------------------------------------------------
# faults: a full disk, a filesystem without sparse files


def file_bytes(directory: Path, sp: StoreSpec) -> dict[str, bytes]:
    return {key: path.read_bytes() for key, (path, _) in store_files(directory, sp).items()}


def test_materializing_reserves_the_blocks_disk_in_every_file(tmp_path):
    """A gather materializes a block: its range is allocated in the rows file and in every state
    file (fallocate), though no state was written, so a later write-back cannot hit a hole."""
    sp = spec(50 * BLOCK_ROWS)
    with store("mmap", tmp_path, sp) as st:
        files = store_files(tmp_path / "store", sp)
        before = {key: os.stat(path).st_blocks * 512 for key, (path, _) in files.items()}
        st.gather(np.array([7 * BLOCK_ROWS + 3]))
        for key, (path, _) in files.items():
            if key != "blocks":
                grew = os.stat(path).st_blocks * 512 - before[key]
                assert grew >= BLOCK_ROWS * D * 4, (key, grew)  # one block of D floats (m, v, rows)


def fail_fallocate(monkeypatch, code: int = errno.ENOSPC) -> list:
    calls = []

    def fallocate(fd, offset, length):
        calls.append((offset, length))
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    return calls


@pytest.mark.parametrize("op", ["gather", "scatter", "scatter_state", "adam"])
def test_a_full_disk_raises_one_line_before_anything_is_written(tmp_path, monkeypatch, op):
    sp = spec(8 * BLOCK_ROWS)
    st = store("mmap", tmp_path, sp)
    touched = np.array([1, 2, 3])
    st.scatter(touched, np.ones((3, D), np.float32))
    st.flush()
    before, blockmap, dirty = file_bytes(tmp_path / "store", sp), st._blockmap.copy(), st.dirty_rows()
    calls = fail_fallocate(monkeypatch)
    rows = np.array([5, 4 * BLOCK_ROWS + 1, 6 * BLOCK_ROWS])  # one materialized block, two fresh ones
    vals = np.full((3, D), 9, np.float32)
    run = {"gather": lambda: st.gather(rows), "scatter": lambda: st.scatter(rows, vals),
           "scatter_state": lambda: st.scatter_state("m", rows, vals),
           "adam": lambda: ADAM.apply(st, rows, vals, lr=0.1, step=1)}[op]
    with pytest.raises(StoreFullError) as e:
        run()
    assert calls and e.value.errno == errno.ENOSPC
    line = str(e.value)
    assert "\n" not in line and "is full (ENOSPC)" in line and "nothing of the new rows was written" in line
    assert "--resume" in line
    st.flush()
    assert file_bytes(tmp_path / "store", sp) == before  # not a byte changed, not even in the materialized block
    assert np.array_equal(st._blockmap, blockmap) and np.array_equal(st.dirty_rows(), dirty)
    st.scatter(touched, np.zeros((3, D), np.float32))  # materialized blocks need no new disk: still writable
    monkeypatch.undo()
    run()  # with disk space again, the same operation goes through, as on a fresh store
    mem = make_store("memory", sp)
    mem.scatter(touched, np.ones((3, D), np.float32))
    mem.scatter(touched, np.zeros((3, D), np.float32))
    {"gather": lambda: mem.gather(rows), "scatter": lambda: mem.scatter(rows, vals),
     "scatter_state": lambda: mem.scatter_state("m", rows, vals),
     "adam": lambda: ADAM.apply(mem, rows, vals, lr=0.1, step=1)}[op]()
    every = np.arange(sp.rows)
    assert np.array_equal(st.gather(every), mem.gather(every))
    assert np.array_equal(st.gather_state("m", every), mem.gather_state("m", every))
    st.close()


def test_a_quota_is_a_full_disk_other_errors_pass_through(tmp_path, monkeypatch):
    st = store("mmap", tmp_path)
    fail_fallocate(monkeypatch, errno.EDQUOT)
    with pytest.raises(StoreFullError, match=r"over its quota \(EDQUOT\)"):
        st.gather(np.array([0]))
    fail_fallocate(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as e:
        st.gather(np.array([0]))
    assert e.value.errno == errno.EIO and not isinstance(e.value, StoreFullError)
    monkeypatch.undo()
    st.close()


def test_a_full_disk_is_one_red_line_on_the_command_line(tmp_path, monkeypatch):
    app = typer.Typer(cls=EngramGroup)

    @app.command()
    def grow(directory: str) -> None:
        with open_store(directory, spec()) as st:
            fail_fallocate(monkeypatch)  # the disk fills once the store is open: the first new block fails
            st.gather(np.array([0]))

    @app.command()
    def other() -> None:
        pass

    r = CliRunner().invoke(app, ["grow", str(tmp_path / "store")])
    one_red_line(r, "is full (ENOSPC)", "free disk space", "--resume")


def test_a_filesystem_without_sparse_files_is_refused(tmp_path, monkeypatch):
    assert store_module.probe_sparse_bytes(tmp_path) < SPARSE_PROBE_BYTES // 4  # tmp has sparse files
    assert not list(tmp_path.iterdir())  # the probe is gone
    monkeypatch.setattr(store_module, "probe_sparse_bytes", lambda directory: SPARSE_PROBE_BYTES)
    with pytest.raises(ConfigError, match="has no sparse files .* 64 MiB empty file took 64 MiB") as e:
        store("mmap", tmp_path)
    assert "--table-store memory" in str(e.value)
    assert not (tmp_path / "store" / "layer_1.json").exists()
    assert not (tmp_path / "store" / "layer_1.rows.f32").exists()
    monkeypatch.undo()
    store("mmap", tmp_path).close()  # created once the filesystem has sparse files
    monkeypatch.setattr(store_module, "probe_sparse_bytes", lambda directory: SPARSE_PROBE_BYTES)
    store("mmap", tmp_path).close()  # an existing store is reopened without a probe


def test_unknown_backend_and_optimizer_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown table store 'disk'"):
        make_store("disk", spec(), tmp_path)
    with pytest.raises(ConfigError, match="unknown table optimizer 'sgd'"):
        make_row_optimizer("sgd")
    with pytest.raises(ConfigError, match="no optimizer state 'sum_sq'"):
        make_store("memory", spec()).gather_state("sum_sq", np.array([0]))


# ---------------------------------------------------------------------------------------------
# row optimizers


@pytest.mark.parametrize("backend", ["memory", "mmap"])
def test_row_adam_is_sparse_adam_bit_for_bit(backend, tmp_path):
    n, lr = 400, 0.01
    st = store(backend, tmp_path, spec(n))
    everything = np.arange(n)
    emb = torch.nn.Embedding(n, D, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(st.gather(everything)))
    sparse_adam = torch.optim.SparseAdam(emb.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(0)
    hot = rng.integers(0, n, 30)  # repeated rows every step, plus disjoint ones on odd steps
    for t in range(1, 8):
        idx = np.concatenate([rng.choice(hot, 40), rng.integers(0, n, 40) if t % 2 else []]).astype(np.int64)
        weights = torch.from_numpy(rng.standard_normal((idx.size, D)).astype(np.float32))
        sparse_adam.zero_grad()
        (emb(torch.from_numpy(idx)) * weights).sum().backward()
        grad = emb.weight.grad.coalesce()
        rows, g = grad.indices()[0].numpy().copy(), grad.values().numpy().copy()
        sparse_adam.step()
        ADAM.apply(st, rows, g, lr=lr, step=t)
        state = sparse_adam.state[emb.weight]
        assert np.array_equal(st.gather(everything), emb.weight.detach().numpy()), t
        assert np.array_equal(st.gather_state("m", everything), state["exp_avg"].numpy()), t
        assert np.array_equal(st.gather_state("v", everything), state["exp_avg_sq"].numpy()), t
    assert ADAM.state_bytes_per_row(D) == 2 * D * 4
    if backend == "mmap":
        st.close()


def test_rowwise_adagrad_is_fbgemm_exact_rowwise_adagrad():
    opt, lr, eps = RowwiseAdagrad(eps=1e-6), 0.05, 1e-6
    assert opt.state_spec(D) == (("sum_sq", 1),) and opt.state_bytes_per_row(D) == 4
    st = make_store("memory", spec(state=opt.state_spec(D)))
    rng = np.random.default_rng(1)
    w = {r: st.gather(np.array([r]))[0] for r in range(3000)}
    s = dict.fromkeys(range(3000), np.float32(0))
    for t in range(1, 5):
        rows = np.unique(rng.integers(0, 50, 30))
        g = rng.standard_normal((rows.size, D)).astype(np.float32)
        opt.apply(st, rows, g, lr=lr, step=t)
        for r, gr in zip(rows.tolist(), g):  # the plain per-row loop of FBGEMM's kernel
            s[r] = np.float32(s[r] + np.sum(gr * gr, dtype=np.float32) / np.float32(D))
            w[r] = w[r] - (np.float32(lr) / (np.sqrt(s[r]) + np.float32(eps))) * gr
    touched = np.array(sorted(r for r in s if s[r] > 0))
    assert np.array_equal(st.gather(touched), np.stack([w[r] for r in touched.tolist()]))
    assert np.array_equal(st.gather_state("sum_sq", touched)[:, 0], np.array([s[r] for r in touched.tolist()]))
    # and the formula in float64, to a float32 tolerance: s = sum over steps of mean(g^2)
    assert np.allclose(st.gather_state("sum_sq", touched)[:, 0], [float(s[r]) for r in touched.tolist()], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# the working set and the prefetcher

V = 60


def tiny_plan():
    return make_plan(canonical_vocab_size=V, canonical_pad_id=0, original_vocab_size=V, layer_ids=(1, 2),
                     n_head_per_ngram=2, target_sizes=(300, 400), embed_dim_per_head=D)


def test_working_rows_index_the_hash_slots():
    plan = tiny_plan()
    ids = np.random.default_rng(0).integers(0, V, (3, 20))
    from engram_cli.tables.hashing import hash_ngrams
    for layer in plan.layer_ids:
        ws = working_rows(ids, plan, layer)
        flat = hash_ngrams(ids, plan, layer) + np.asarray(plan.head_offsets(layer))
        assert np.array_equal(ws.rows[ws.local], flat)
        assert np.all(np.diff(ws.rows) > 0) and ws.local.shape == (3, 20, plan.total_heads)


def plan_stores(plan, backend, tmp_path, opt=ADAM):
    return {layer: make_store(backend, StoreSpec(layer_id=layer, rows=plan.total_slots(layer), dim=D, seed=5,
                                                 init_std=0.02, state=opt.state_spec(D)), tmp_path / backend)
            for layer in plan.layer_ids}


def simulate(plan, stores, *, prefetch: bool, steps: int = 6, force_stale: bool = False) -> Prefetcher:
    """A training loop with random gradients: step t's write-back happens while step t+1's working
    set is prepared (with ``force_stale``: after it was gathered, so it must be patched)."""
    rng = np.random.default_rng(42)
    batches = [rng.integers(0, V // 3, (2, 16)) for _ in range(steps + 1)]  # a small vocab: rows overlap
    pf = Prefetcher(plan, stores, enabled=prefetch)
    pf.submit(batches[0])
    for t in range(1, steps + 1):
        sets = pf.take()
        pf.submit(batches[t])
        if force_stale:
            pf.ready()
        for layer, ws in sets.items():
            g = np.random.default_rng([t, layer]).standard_normal(ws.values.shape).astype(np.float32)
            ADAM.apply(stores[layer], ws.rows, g, lr=0.01, step=t, values=ws.values, state=ws.state)
    pf.take()
    pf.close()
    return pf


def snapshot(stores):
    out = {}
    for layer, st in stores.items():
        every = np.arange(st.rows)
        out[layer] = (st.gather(every), st.gather_state("m", every), st.gather_state("v", every))
    return out


@pytest.mark.parametrize("backend", ["memory", "mmap"])
def test_prefetch_on_and_off_give_bit_identical_stores(backend, tmp_path):
    plan = tiny_plan()
    off = plan_stores(plan, backend, tmp_path / "off")
    simulate(plan, off, prefetch=False)
    on = plan_stores(plan, backend, tmp_path / "on")
    pf = simulate(plan, on, prefetch=True, force_stale=True)
    assert pf.patched_rows > 0  # consecutive steps overlapped and the stale rows were re-read
    a, b = snapshot(off), snapshot(on)
    for layer in plan.layer_ids:
        for x, y in zip(a[layer], b[layer]):
            assert np.array_equal(x, y)
    on2 = plan_stores(plan, backend, tmp_path / "on2")  # without the forced order: whatever the race, the same
    simulate(plan, on2, prefetch=True)
    for layer, arrays in snapshot(on2).items():
        for x, y in zip(a[layer], arrays):
            assert np.array_equal(x, y)


def test_the_patch_is_what_keeps_prefetch_exact(tmp_path):
    """Without the re-read the stale rows differ: the identity above is not vacuous."""
    plan = tiny_plan()
    stores = plan_stores(plan, "memory", tmp_path)
    ids = np.random.default_rng(0).integers(0, V // 3, (2, 16))
    first = gather_working_set(ids, plan, stores)
    pf = Prefetcher(plan, stores)
    pf.submit(ids)
    pf.ready()
    stale = {layer: ws.values.copy() for layer, ws in pf._pending[1].result().items()}
    for layer, ws in first.items():
        ADAM.apply(stores[layer], ws.rows, np.ones_like(ws.values), lr=0.1, step=1, values=ws.values, state=ws.state)
    fresh = pf.take()
    pf.close()
    for layer, ws in fresh.items():
        assert np.array_equal(ws.values, stores[layer].gather(ws.rows))
        assert not np.array_equal(ws.values, stale[layer])


# ---------------------------------------------------------------------------------------------
# dirty rows and delta checkpoints


def test_dirty_rows_are_the_rows_written_since_mark_clean(tmp_path):
    st = store("mmap", tmp_path)
    st.gather(np.array([5, 6]))  # a read changes nothing
    assert st.dirty_rows().size == 0
    st.scatter(np.array([1, 2000]), np.zeros((2, D), np.float32))
    st.scatter_state("m", np.array([2, 2000]), np.zeros((2, D), np.float32))
    assert st.dirty_rows().tolist() == [1, 2, 2000]
    assert st.dirty_blocks().tolist() == [0, 1]
    st.close()
    with store("mmap", tmp_path, writable=False) as ro:  # the DIRTY flags survive the process
        assert ro.dirty_blocks().tolist() == [0, 1] and ro.materialized_blocks() == 2
    st = store("mmap", tmp_path)
    st.mark_clean()
    assert st.dirty_rows().size == 0 and st.dirty_blocks().size == 0
    assert np.all(st._blockmap[:2] & INIT) and not np.any(st._blockmap & DIRTY)
    st.close()


def train_with_deltas(st, tmp_path, opt=ADAM, checkpoints=(2, 4, 7)):
    rng = np.random.default_rng(9)
    paths, since = [], None
    for t in range(1, max(checkpoints) + 1):
        rows = np.unique(rng.integers(0, 200 if t % 2 else st.rows, 60))
        opt.apply(st, rows, rng.standard_normal((rows.size, D)).astype(np.float32), lr=0.01, step=t)
        if t in checkpoints:
            rec = write_delta(st, tmp_path / f"ckpt-{t}", step=t, since=since)
            st.mark_clean()
            paths.append(rec.path)
            since = t
    return paths


@pytest.mark.parametrize("backend", ["memory", "mmap"])
@pytest.mark.parametrize("opt", [ADAM, RowwiseAdagrad()], ids=["adam", "rowwise-adagrad"])
def test_replay_of_base_and_deltas_equals_the_live_store(backend, opt, tmp_path):
    sp = spec(state=opt.state_spec(D))
    live = make_store(backend, sp, tmp_path / "live")
    paths = train_with_deltas(live, tmp_path, opt)
    rebuilt = replay(make_store(backend, sp, tmp_path / "rebuilt"), paths)
    every = np.arange(sp.rows)
    assert np.array_equal(rebuilt.gather(every), live.gather(every))
    for name in live.state_names:
        assert np.array_equal(rebuilt.gather_state(name, every), live.gather_state(name, every))
    assert rebuilt.dirty_rows().size == 0
    # a delta holds only the rows changed since the previous checkpoint
    _, arrays = read_delta(paths[1], live)
    assert 0 < arrays["rows"].size < sp.rows


def test_a_tampered_or_foreign_delta_is_refused(tmp_path):
    live = store("memory", tmp_path)
    paths = train_with_deltas(live, tmp_path)
    _, data = delta_paths(paths[1].parent, 1)
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="corrupt: modified after it was written"):
        replay(store("memory", tmp_path), paths)
    with pytest.raises(ArtifactError, match="follows step 4, but the chain is at step 2"):
        replay(store("memory", tmp_path), [paths[0], paths[2]])
    with pytest.raises(ArtifactError, match="belongs to another table: its plan_fingerprint"):
        replay(make_store("memory", spec(plan_fingerprint="0" * 64)), paths[:1])
    fresh = store("memory", tmp_path)
    with pytest.raises(ArtifactError, match="corrupt"):  # verified before any row is written
        replay(fresh, paths)
    assert fresh.dirty_rows().size == 0 and fresh.materialized_blocks() == 0


def test_rollback_returns_a_killed_runs_store_to_its_last_checkpoint(tmp_path):
    live = store("mmap", tmp_path)
    paths = train_with_deltas(live, tmp_path)
    every = np.arange(live.rows)
    at_checkpoint = (live.gather(every), live.gather_state("m", every), live.gather_state("v", every))
    rng = np.random.default_rng(5)  # steps after the last checkpoint, then the process dies (no mark_clean)
    for t in (8, 9):
        rows = np.unique(rng.integers(0, 200, 80))  # block 0 only
        ADAM.apply(live, rows, rng.standard_normal((rows.size, D)).astype(np.float32), lr=0.01, step=t)
    live.close()
    reopened = store("mmap", tmp_path)
    assert not np.array_equal(reopened.gather(every), at_checkpoint[0])
    assert reopened.dirty_blocks().tolist() == [0]
    assert rollback(reopened, paths) == 1  # one block reset and re-played, the others left as they were
    assert np.array_equal(reopened.gather(every), at_checkpoint[0])
    assert np.array_equal(reopened.gather_state("m", every), at_checkpoint[1])
    assert np.array_equal(reopened.gather_state("v", every), at_checkpoint[2])
    reopened.close()
