"""Training with the Engram tables in row stores (train.table_store memory|mmap): the two stores and
prefetch on/off give the same bits, checkpoints are deltas, resume and kill -9 are exact, readers
see the same rows, older "module" runs still resume and evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import CORPUS, SETS
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.core.artifacts import sha256_file
from engram_cli.core.errors import ArtifactError, ConfigError
from engram_cli.model.store import memory_store
from engram_cli.train import TrainConfig, TrainSettings, train
from engram_cli.train.runs import load_run, run_stores, store_specs
from engram_cli.train.tablestore import check_table_store

from cli_asserts import one_red_line

KEYS = ("step", "loss", "aux_loss", "lr", "engram_lr", "grad_norm", "val_loss")
runner = CliRunner()


def run(out: Path, tables: Path, *extra: str, progress=None, **kw):
    cfg = TrainConfig(out=out, tables=tables, sources=CORPUS, overrides=[*SETS, *extra],
                      cache_dir=out.parent / "cache", **kw)
    return train(cfg, progress=progress)


def metrics(out: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r.get(k) for k in KEYS) for r in rows]


def all_rows(out: Path, step: int | None = None) -> dict[int, np.ndarray]:
    r = load_run(out, step, with_model=False)
    return {layer: s.gather(np.arange(s.rows, dtype=np.int64)) for layer, s in run_stores(r).items()}


def crash_after(n: int):
    def progress(task, completed, total=None, **info):
        if task == "train" and completed == n:
            raise KeyboardInterrupt
    return progress


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tables) -> dict[str, Path]:
    """The same 6-step run with each store (memory, mmap) and with prefetch off (memory)."""
    root = tmp_path_factory.mktemp("store_runs")
    out = {}
    for name, extra in (("memory", ["train.table_store=memory"]), ("mmap", ["train.table_store=mmap"]),
                        ("noprefetch", ["train.table_store=memory", "train.prefetch=false"])):
        run(root / name, tiny_tables, *extra)
        out[name] = root / name
    return out


def test_memory_and_mmap_give_the_same_bits(runs):
    a, b = metrics(runs["memory"]), metrics(runs["mmap"])
    assert a == b and len(a) == 6 and all(m[4] is not None for m in a)  # engram_lr is logged
    ra, rb = all_rows(runs["memory"]), all_rows(runs["mmap"])
    assert ra.keys() == rb.keys() == {1} and all(np.array_equal(ra[k], rb[k]) for k in ra)
    wa = load_file(runs["memory"] / "ckpt/step_000006/model.safetensors")
    wb = load_file(runs["mmap"] / "ckpt/step_000006/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any("engram.tables" in k for k in wa)  # the tables are not in the model file
    assert (runs["mmap"] / "tables/layer_1.rows.f32").is_file() and not (runs["memory"] / "tables").exists()


def test_prefetch_on_and_off_give_the_same_bits(runs):
    assert metrics(runs["memory"]) == metrics(runs["noprefetch"])
    ra, rb = all_rows(runs["memory"]), all_rows(runs["noprefetch"])
    assert all(np.array_equal(ra[k], rb[k]) for k in ra)


def test_checkpoints_are_deltas_with_a_recorded_chain(runs):
    out = runs["mmap"]
    state = json.loads((out / "ckpt/step_000006/state.json").read_text())
    rec = state["table_store"]
    assert rec["backend"] == "mmap" and rec["optimizer"] == "adam"
    assert [c["step"] for c in rec["chain"]] == [3, 6] and [c["since"] for c in rec["chain"]] == [None, 3]
    for c in rec["chain"]:
        assert sha256_file(out / f"table_deltas/step_{c['step']:06d}/layer_1.delta.json") == c["records"]["1"]
    opt = json.loads((out / "ckpt/step_000006/optimizer.json").read_text())
    assert sorted(opt) == ["adamw"]  # the tables' optimizer state lives in the store and its deltas
    manifest = json.loads((out / "manifest.json").read_text())
    D = 8
    assert manifest["budget"]["table_store"] == {"backend": "mmap", "optimizer": "adam", "state_bytes_per_row": 2 * D * 4}
    assert "tables/layer_1.json" in manifest["files"] and "tables/layer_1.rows.f32" not in manifest["files"]
    # the step-3 rows through the chain's first link equal the memory run's at step 3
    a, b = all_rows(runs["memory"], 3), all_rows(out, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["memory", "mmap"])
def test_resume_continues_exactly(tmp_path, tiny_tables, runs, store):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", tiny_tables, f"train.table_store={store}", progress=crash_after(4))
    resumed = train(TrainConfig(out=tmp_path / "cut", resume=True, cache_dir=tmp_path / "cache"))
    assert resumed.start_step == 3
    assert metrics(tmp_path / "cut") == metrics(runs[store])
    a, b = all_rows(runs[store]), all_rows(tmp_path / "cut")
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["memory", "mmap"])
def test_sigkill_mid_run_then_resume_is_exact(tmp_path, tiny_tables, runs, store):
    """A real process killed -9 after step 5's write-back (the last checkpoint is step 3): resume
    loses steps 4-5 only and ends with the uninterrupted run's bits."""
    script = ("import time\nfrom engram_cli.train import trainer as T\n"
              "orig = T.Trainer.train_step\n"
              "def slow(self, i):\n    if i == 5:\n        print('ready', flush=True); time.sleep(60)\n"
              "    return orig(self, i)\n"
              "T.Trainer.train_step = slow\nfrom engram_cli.cli import main\nmain()\n")
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", script, "train", *CORPUS, "--tables", str(tiny_tables), "--out",
                          str(out), "--cache-dir", str(tmp_path / "cache"), "--table-store", store,
                          *[x for s in SETS for x in ("--set", s)]],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait()
    if store == "mmap":  # the store holds steps 4-5's rows, flagged dirty since the step-3 checkpoint
        assert len(load_run(out, with_model=False).checkpoint.state["table_store"]["chain"]) == 1
    resumed = train(TrainConfig(out=out, resume=True, cache_dir=tmp_path / "cache"))
    assert resumed.start_step == 3
    assert metrics(out) == metrics(runs[store])
    a, b = all_rows(runs[store]), all_rows(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_rowwise_adagrad_trains_and_resumes_exactly(tmp_path, tiny_tables):
    extra = ("train.table_optimizer=rowwise-adagrad", "train.steps=30", "train.eval_interval=30",
             "train.checkpoint_interval=10", "train.log_interval=1")
    run(tmp_path / "full", tiny_tables, *extra)
    losses = [m[1] for m in metrics(tmp_path / "full")]
    assert np.mean(losses[-5:]) < losses[0] - 0.5
    m = json.loads((tmp_path / "full/manifest.json").read_text())
    assert m["budget"]["table_store"]["state_bytes_per_row"] == 4
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", tiny_tables, *extra, progress=crash_after(15))
    r = train(TrainConfig(out=tmp_path / "cut", resume=True, cache_dir=tmp_path / "cache"))
    assert r.start_step == 10 and metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def test_readers_see_the_same_rows_as_a_memory_store(runs):
    """eval's forward on the mapped mmap store == the same rows through a memory store."""
    r = load_run(runs["mmap"])
    stores = run_stores(r)
    assert stores[1].backend == "mmap" and not stores[1].writable  # clean at the latest step: mapped
    spec = store_specs(r.plan, r.model_config, 0, "adam")[1]
    mem = memory_store(spec)
    rows = np.arange(spec.rows, dtype=np.int64)
    mem.scatter(rows, stores[1].gather(rows))
    x = torch.from_numpy(r.to_model_ids(np.arange(64).reshape(2, 32) + 100))
    c = torch.from_numpy(r.vocab.table[np.arange(64).reshape(2, 32) + 100].astype(np.int64))
    with torch.no_grad():
        a = r.model(x, canonical_ids=c).logits
        r.model.attach_stores({1: mem})
        b = r.model(x, canonical_ids=c).logits
    assert torch.equal(a, b)
    ev = [runner.invoke(app, ["eval", str(runs[s]), "--json"]) for s in ("memory", "mmap")]
    assert all(e.exit_code == 0 for e in ev)
    loss = [json.loads(e.stdout)["runs"][0]["loss"] for e in ev]
    assert loss[0] == loss[1]


def test_serving_dtype_quantizes_a_store_runs_rows(runs):
    """eval --table-dtype on a store run reads the rows through the quantizer (nothing silently
    unquantized): the logits equal those of a memory store holding the quantized rows."""
    from engram_cli.model.quant import quantize_dequantize, quantized_tables

    r = load_run(runs["memory"])
    spec = store_specs(r.plan, r.model_config, 0, "adam")[1]
    rows = np.arange(spec.rows, dtype=np.int64)
    q = memory_store(spec)
    q.scatter(rows, quantize_dequantize(torch.from_numpy(run_stores(r)[1].gather(rows)), "fp8-e4m3").numpy())
    x = torch.from_numpy(r.to_model_ids(np.arange(64).reshape(2, 32) + 100))
    c = torch.from_numpy(r.vocab.table[np.arange(64).reshape(2, 32) + 100].astype(np.int64))
    with torch.no_grad():
        plain = r.model(x, canonical_ids=c).logits
        with quantized_tables(r.model, "fp8-e4m3"):
            quantized = r.model(x, canonical_ids=c).logits
        assert torch.equal(r.model(x, canonical_ids=c).logits, plain)  # the stores' rows are back
        r.model.attach_stores({1: q})
        want = r.model(x, canonical_ids=c).logits
    assert not torch.equal(quantized, plain) and torch.equal(quantized, want)


def test_a_tampered_delta_or_store_header_is_refused(tmp_path, runs):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs["mmap"], out)
    header = out / "tables/layer_1.json"
    before = header.read_text()
    header.write_text(before.replace('"seed": 0', '"seed": 7'))  # same size: only the sha256 tells
    with pytest.raises(ArtifactError, match="layer_1.json"):  # the manifest or the checkpoint record tells
        run_stores(load_run(out, with_model=False))
    one_red_line(runner.invoke(app, ["eval", str(out)]), "layer_1.json")
    header.write_text(before)
    data = out / "table_deltas/step_000003/layer_1.delta.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="layer_1.delta"):
        run_stores(load_run(out, 3, with_model=False))
    one_red_line(runner.invoke(app, ["eval", str(out)]), "layer_1.delta")


def test_mmap_refuses_data_parallel_and_bad_values(tmp_path, tiny_tables):
    with pytest.raises(ConfigError, match="one process"):
        check_table_store(TrainSettings(table_store="mmap"), 2)
    check_table_store(TrainSettings(table_store="memory"), 2)
    r = runner.invoke(app, ["train", *CORPUS, "-T", str(tiny_tables), "-o", str(tmp_path / "r"), "--table-store", "disk",
                            *[x for s in SETS for x in ("--set", s)]])
    one_red_line(r, "train.table_store must be one of")
    r = runner.invoke(app, ["train", *CORPUS, "-T", str(tiny_tables), "-o", str(tmp_path / "r"), "--table-store", "module",
                            "--set", "train.table_optimizer=rowwise-adagrad", *[x for s in SETS for x in ("--set", s)]])
    one_red_line(r, "needs a row store")


def _make_legacy(out: Path) -> None:
    """Rewrite a fresh "module" run as a run recorded before the row store: no table keys in its config."""
    from engram_cli.core.artifacts import atomic_write_json

    drop = ("table_store", "table_optimizer", "prefetch")
    files = [out / "config.json", *sorted(out.glob("ckpt/step_*/state.json"))]
    for f in files:
        doc = json.loads(f.read_text())
        cfg = doc if f.name == "config.json" else doc["config"]
        for k in drop:
            cfg["train"].pop(k)
        f.write_text(json.dumps(doc, indent=2))
    m = json.loads((out / "manifest.json").read_text())
    for k in drop:
        m["config"]["train"].pop(k)
    for f in files:
        rel = f.relative_to(out).as_posix()
        m["files"][rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    atomic_write_json(out / "manifest.json", m)


@pytest.mark.slow
def test_an_old_module_run_still_resumes_and_evaluates(tmp_path, tiny_tables):
    run(tmp_path / "full", tiny_tables, "train.table_store=module")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "old", tiny_tables, "train.table_store=module", progress=crash_after(4))
    _make_legacy(tmp_path / "old")
    r = load_run(tmp_path / "old")
    assert r.table_store == "module" and not r.store_backed and r.model.engram_table_parameters()
    resumed = train(TrainConfig(out=tmp_path / "old", resume=True, cache_dir=tmp_path / "cache"))
    assert resumed.start_step == 3
    assert metrics(tmp_path / "old") == metrics(tmp_path / "full")
    wa = load_file(tmp_path / "full/ckpt/step_000006/model.safetensors")
    wb = load_file(tmp_path / "old/ckpt/step_000006/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    e = runner.invoke(app, ["eval", str(tmp_path / "old"), "--json"])
    assert e.exit_code == 0, e.output


def test_inspect_tables_reads_a_store_run(runs):
    """inspect-tables on a store run: rows from the store, the store's keyed init, the chain's rows."""
    from engram_cli import inspect_tables as I

    for name in ("memory", "mmap"):
        r = load_run(runs[name], with_model=False)
        w = all_rows(runs[name])[1]
        w0 = I.initial_rows(r, 1, slice(None))
        upd = I.updated_rows(r, 1, w.shape[0])
        assert w0.shape == w.shape and 0 < upd.sum() < w.shape[0]
        assert np.array_equal(w[~upd], w0[~upd]) and (np.linalg.norm(w[upd] - w0[upd], axis=1) > 0).all()
        with I.TableRows(r) as t:
            assert t.shape(1) == w.shape and np.array_equal(t.read(1, 5, 17), w[5:17])


# ---------------------------------------------------------------------------------------------
# on a GPU: the working set goes host -> device from pinned memory on a side stream


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_store_runs_memory_mmap_and_prefetch_agree(tmp_path, tiny_tables):
    """On CUDA (bf16 autocast, the side-stream copy) memory == mmap and prefetch on == off, bit for
    bit, and the run learns like the module path does."""
    out = {}
    for name, extra in (("memory", ["train.table_store=memory"]), ("mmap", ["train.table_store=mmap"]),
                        ("noprefetch", ["train.table_store=memory", "train.prefetch=false"]),
                        ("module", ["train.table_store=module"])):
        run(tmp_path / name, tiny_tables, *extra, device="cuda")
        out[name] = metrics(tmp_path / name)
    assert out["memory"] == out["mmap"] == out["noprefetch"] and len(out["memory"]) == 6
    ra, rb = all_rows(tmp_path / "memory"), all_rows(tmp_path / "mmap")
    assert all(np.array_equal(ra[k], rb[k]) for k in ra)
    first, last = out["memory"][0][1], out["memory"][-1][1]  # (step, loss, ...)
    assert last < first and abs(last - out["module"][-1][1]) < 0.5  # same distribution of inits, same schedule
