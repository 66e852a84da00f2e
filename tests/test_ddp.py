"""Data-parallel training under torchrun: 2 CPU processes (gloo) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOTU = sorted(str(p) for p in (ROOT / "sample_data" / "sotu").glob("*.txt"))
CORPUS = SOTU[:2]
# as tests/test_train.py, with the load-balancing loss off: then the gradient averaged over the
# two half batches equals the full batch's, and the two runs must agree up to float rounding
SETS = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.moe_num_experts=4",
        "model.moe_top_k=2", "model.moe_expert_hidden=32", "model.moe_aux_loss_weight=0", "train.steps=4",
        "train.batch_size=4", "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=2",
        "train.checkpoint_interval=2", "train.warmup_steps=1", "train.lr=1e-2", "data.max_tokens=3000",
        "data.val_chunk_tokens=128", "data.val_fraction=0.1", "data.min_count=1"]

DRIVER = """
import json, sys
from pathlib import Path
from engram_cli.train import TrainConfig, train
c = json.loads(sys.argv[1])
r = train(TrainConfig(out=Path(c["out"]), tables=Path(c["tables"]), sources=c["corpus"], overrides=c["sets"],
                      cache_dir=Path(c["cache"]), device="cpu"))
Path(c["results"], f"rank{r.rank}.json").write_text(json.dumps(r.to_dict()))
"""


@pytest.fixture(scope="module")
def tables(tiny_tables) -> Path:
    return tiny_tables


def launch(tmp_path: Path, tables: Path, name: str, nproc: int) -> tuple[Path, list[dict]]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    results = tmp_path / f"results-{name}"
    results.mkdir()
    conf = json.dumps({"out": str(tmp_path / name), "tables": str(tables), "corpus": CORPUS, "sets": SETS,
                       "cache": str(tmp_path / "cache"), "results": str(results)})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(driver), conf]
    else:
        cmd = [sys.executable, str(driver), conf]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp_path / name, [json.loads((results / f"rank{r}.json").read_text()) for r in range(nproc)]


def losses(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.mark.slow
def test_two_processes_agree_with_each_other_and_with_one(tmp_path, tables):
    one, (single,) = launch(tmp_path, tables, "one", 1)
    two, ranks = launch(tmp_path, tables, "two", 2)

    # both ranks finished, with identical weights (the same averaged gradients, the same steps)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["world_size"] == 2 and ranks[0]["rank_checksums"] is not None
    c0, c1 = ranks[0]["rank_checksums"]
    assert c0 == c1
    for key in ("steps", "train_loss", "val_loss", "tokens_seen"):
        assert ranks[0][key] == ranks[1][key], key

    # only rank 0 wrote the run directory: one metrics line per step, one manifest
    assert losses(two, "step") == [1, 2, 3, 4]
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["summary"]["status"] == "finished" and manifest["summary"]["world_size"] == 2

    # the same global batches: 2 x half a batch == 1 x the batch, up to float rounding; the
    # sparse Engram gradients were averaged correctly or the later steps would drift apart
    np.testing.assert_allclose(losses(two, "loss"), losses(one, "loss"), rtol=2e-4)
    np.testing.assert_allclose(losses(two, "val_loss"), losses(one, "val_loss"), rtol=2e-4)
    assert single["tokens_seen"] == ranks[0]["tokens_seen"]


@pytest.mark.slow
def test_engram_train_command_under_torchrun(tmp_path, tables):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "engram_cli",
           "train", *CORPUS, "--tables", str(tables), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
           *[x for s in SETS for x in ("--set", s)], "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(p.stdout)  # rank 0 alone prints
    assert result["world_size"] == 2 and result["steps"] == 4
    c0, c1 = result["rank_checksums"]
    assert c0 == c1
    assert json.loads((out / "manifest.json").read_text())["summary"]["status"] == "finished"
