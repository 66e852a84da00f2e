"""engram sweep: equal budgets across an allocation sweep, one row and one marker per run, resume
without training again, --jobs 2 == --jobs 1, the capacity-1 control, plan keys on grid axes, the
CLI end to end (exact files), bad input as one red line; the [plan] settings, the loss curve and
the TensorBoard log of engram train.

Runs are the tiny model of ``conftest.TINY_RUN_SETS`` (2 steps on 3000 tokens of two speeches) with
the ``tiny_tables`` (Engram at block 1, 2 heads per order, 8 dims, ~1000 slots per head).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN_CORPUS, TINY_RUN_SETS
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.core.artifacts import read_manifest
from engram_cli.core.errors import ConfigError, Interrupted, TrainingError
from engram_cli.sweep import (
    LOWER,
    NO_PAIRED_DIFFERENCE,
    ONE_SEED,
    WITHIN,
    SweepConfig,
    make_points,
    paired_comparison,
    parse_axis,
    parse_ratios,
    parse_seeds,
    parse_slots,
    power_law_fit,
    range_verdict,
    sweep,
)
from engram_cli.sweep import runner as R

from cli_asserts import one_red_line

runner = CliRunner()


def config(out: Path, tables: Path, kind: str = "allocation", **kw) -> SweepConfig:
    kw.setdefault("threads", 1)
    kw.setdefault("evaluate", False)
    return SweepConfig(kind=kind, out=out, tables=tables, sources=TINY_RUN_CORPUS, overrides=list(TINY_RUN_SETS), **kw)


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def alloc(tmp_path_factory, tiny_tables):
    """An allocation sweep, rho 1 and 0.5, seeds 0 and 1 (4 runs), scored by engram eval."""
    out = tmp_path_factory.mktemp("sweep") / "alloc"
    cfg = config(out, tiny_tables, ratios=[1.0, 0.5], seeds=[0, 1], evaluate=True)
    return cfg, sweep(cfg)


# ---------------------------------------------------------------------------------------------
# option values, points, verdicts (no training)


def test_option_values_are_read_and_checked():
    assert parse_ratios("1, 0.9,0.4") == [1.0, 0.9, 0.4]
    assert parse_slots("1,1e4,3e4") == [1, 10_000, 30_000]
    assert parse_seeds("0,1") == [0, 1]
    assert parse_axis("plan.layer_ids=[1],[1,3]") == ("plan.layer_ids", [[1], [1, 3]])
    assert parse_axis("n_head_per_ngram=2,4") == ("plan.n_head_per_ngram", [2, 4])  # bare keys as --set reads them
    assert parse_axis("engram_lr_mult=1,5.0") == ("train.engram_lr_mult", [1, 5.0])
    for bad, needle in [(lambda: parse_ratios("1,1.5"), "outside [0, 1]"), (lambda: parse_ratios(""), "empty"),
                        (lambda: parse_ratios("1,x"), "not a number"), (lambda: parse_ratios("1,1"), "twice"),
                        (lambda: parse_slots("0.5"), "whole number"), (lambda: parse_seeds("-1"), "seed"),
                        (lambda: parse_axis("nope=1,2"), "unknown config key"),
                        (lambda: parse_axis("train.seed=1,2"), "--seeds"), (lambda: parse_axis("lr="), "empty")]:
        with pytest.raises(ConfigError) as e:
            bad()
        assert needle in str(e.value)


def test_points_of_each_kind(tmp_path):
    base = dict(out=tmp_path, tables=tmp_path, sources=["x"])
    alloc = make_points(SweepConfig(kind="allocation", ratios=[0.8, 1.0], **base))
    assert [(p.name, p.allocation, p.reference) for p in alloc] == [("rho=0.8", 0.8, False), ("rho=1", 1.0, True)]
    mem = make_points(SweepConfig(kind="memory", slots=[1, 10_000], **base))
    assert [p.name for p in mem] == ["backbone", "slots=1", "slots=10000"]
    assert mem[0].allocation == 1.0 and mem[0].reference  # the backbone alone: the pure MoE of the same base
    assert mem[1].overrides == ("plan.target_size=1", "plan.single_row=true")  # the capacity-1 control
    assert mem[2].overrides == ("plan.target_size=10000",)
    grid = make_points(SweepConfig(kind="grid", axes=[("plan.n_head_per_ngram", [2, 4]), ("plan.layer_ids", [[1], [1, 3]])],
                                   **base))
    assert [p.name for p in grid] == ["n_head_per_ngram=2--layer_ids=1", "n_head_per_ngram=2--layer_ids=1+3",
                                      "n_head_per_ngram=4--layer_ids=1", "n_head_per_ngram=4--layer_ids=1+3"]
    assert grid[1].overrides == ("plan.n_head_per_ngram=2", "plan.layer_ids=[1, 3]") and grid[0].reference


def test_range_verdict_calls_differences_within_the_seed_spread_no_difference():
    assert range_verdict([5.00, 5.10], [5.05, 5.07]) == WITHIN        # |Δ| 0.01 <= spread 0.10
    assert range_verdict([4.50, 4.52], [5.05, 5.07]).startswith("lower loss")
    assert range_verdict([5.50, 5.52], [5.05, 5.07]).startswith("higher loss")
    assert range_verdict([4.0], [5.0, 5.1]) == ONE_SEED                 # never a claim from one seed


def test_paired_verdict_sees_what_overlapping_ranges_hide():
    """Every seed lower by about 0.1 while the seeds themselves differ by 1.0: the ranges overlap
    (range verdict: within seed spread), the paired differences do not straddle 0 (lower)."""
    ref = {0: 5.0, 1: 5.5, 2: 6.0}
    point = {0: 4.9, 1: 5.41, 2: 5.88}
    assert range_verdict(list(point.values()), list(ref.values())) == WITHIN
    p = paired_comparison(point, ref)
    assert p["paired_deltas"] == pytest.approx([-0.1, -0.09, -0.12]) and p["paired_seeds"] == [0, 1, 2]
    sd = float(np.std(p["paired_deltas"], ddof=1))
    half = 4.303 * sd / math.sqrt(3)  # Student t, 2 degrees of freedom, 95%
    assert p["paired_delta_mean"] == pytest.approx(-0.31 / 3)
    assert (p["paired_delta_ci95_low"], p["paired_delta_ci95_high"]) == \
        pytest.approx((-0.31 / 3 - half, -0.31 / 3 + half))
    assert p["paired_verdict"] == LOWER and p["paired_sign_count"] == "lower on 3 of 3 seeds"


def test_separated_ranges_with_inconsistent_pairs_are_no_paired_difference():
    """The reverse: the means differ by more than either range (range verdict: lower), but the
    three paired differences vary so much that their t-interval holds 0."""
    ref = {0: 5.0, 1: 5.0, 2: 5.0}
    point = {0: 4.0, 1: 4.0, 2: 4.6}
    assert range_verdict(list(point.values()), list(ref.values())) == "lower loss than the reference"
    p = paired_comparison(point, ref)
    assert p["paired_delta_ci95_low"] < 0 < p["paired_delta_ci95_high"]
    assert p["paired_verdict"] == NO_PAIRED_DIFFERENCE
    # two seeds: never a t-interval, a sign count; 2 of 2 is no evidence at 5% (the sign test needs 6)
    two = paired_comparison({0: 4.0, 1: 4.1}, {0: 5.0, 1: 5.1})
    assert two["paired_delta_ci95_low"] is None and two["paired_verdict"] == NO_PAIRED_DIFFERENCE
    assert two["paired_sign_count"] == "lower on 2 of 2 seeds"
    # six equal differences: a t-interval means nothing (no variance); the sign count decides
    six = paired_comparison(dict.fromkeys(range(6), 4.0), dict.fromkeys(range(6), 5.0))
    assert six["paired_delta_ci95_low"] is None and six["paired_verdict"] == LOWER
    # only the seeds finished at both points are paired
    assert paired_comparison({0: 4.0, 5: 1.0}, {0: 5.0, 1: 5.0})["paired_seeds"] == [0]
    assert paired_comparison({3: 4.0}, {0: 5.0})["paired_verdict"] == "no seed finished at both points"


def test_t95_matches_the_tables():
    from engram_cli.sweep.summary import t95

    assert t95(2) == 4.303 and t95(30) == 2.042
    assert t95(40) == pytest.approx(2.021, abs=1e-3) and t95(120) == pytest.approx(1.980, abs=1e-3)


def test_power_law_fit_recovers_the_exponent():
    rows = [{"status": "finished", "slots": s, "table_rows": s * 8, "val_loss": 7.0 * (s * 8) ** -0.05}
            for s in (100, 1000, 10_000)]
    rows += [{"status": "finished", "slots": 1, "table_rows": 8, "val_loss": 9.9},       # the control: not fitted
             {"status": "finished", "slots": None, "table_rows": 0, "val_loss": 9.9}]   # the backbone: not fitted
    fit = power_law_fit(rows)
    assert fit["alpha"] == pytest.approx(0.05) and fit["a"] == pytest.approx(7.0) and fit["runs"] == 3


def test_capacity_one_is_one_row_per_head_not_the_smallest_primes():
    import numpy as np
    import torch

    from engram_cli.model.config import ModelConfig
    from engram_cli.model.transformer import EngramModel
    from engram_cli.tables.hashing import hash_ngrams
    from engram_cli.tables.plan import TablePlan, make_plan, replan

    smallest = make_plan(canonical_vocab_size=100, canonical_pad_id=0, original_vocab_size=120, layer_ids=(1,),
                         n_head_per_ngram=4, target_sizes=(1, 1), embed_dim_per_head=8)
    assert smallest.primes[1] == ((2, 3, 5, 7), (11, 13, 17, 19))  # primes >= 1, none twice: not capacity 1
    one = replan(smallest, single_row=True)
    assert one.single_row and one.primes[1] == ((1,) * 4, (1,) * 4) and one.total_slots_all == 8
    assert TablePlan.from_dict(json.loads(json.dumps(one.to_dict()))) == one
    assert "single_row" not in smallest.to_dict()  # older plans keep their bytes and sha256
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 16))
    assert (hash_ngrams(ids, one, 1) == 0).all() and (hash_ngrams(torch.from_numpy(ids), one, 1) == 0).all()
    model = EngramModel(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16, moe_num_experts=4,
                                    moe_expert_hidden=32), one)
    assert sum(p.numel() for p in model.engram_table_parameters()) == 8 * 8
    with pytest.raises(ConfigError, match="target size 1"):
        make_plan(canonical_vocab_size=100, canonical_pad_id=0, original_vocab_size=120, target_sizes=(5, 5),
                  single_row=True)


# ---------------------------------------------------------------------------------------------
# the allocation sweep


def test_allocation_sweep_keeps_total_and_activated_parameters(alloc):
    cfg, res = alloc
    rows = {r["run"]: r for r in res.runs}
    assert sorted(rows) == ["rho=0.5--seed=0", "rho=0.5--seed=1", "rho=1--seed=0", "rho=1--seed=1"]
    ref, moved = rows["rho=1--seed=0"], rows["rho=0.5--seed=0"]
    assert ref["table_rows"] == 0 and moved["table_rows"] > 0 and moved["moe_num_experts"] == 3
    # the stated tolerance: total equal up to the primes' rounding (< 1%); activated grows by Engram's dense
    # projections only (< 3% here, where they are large next to a 32-wide model)
    assert abs(moved["total_params"] / ref["total_params"] - 1) < 0.01
    assert 0 <= moved["activated_params"] / ref["activated_params"] - 1 < 0.03
    assert all(r["status"] == "finished" and r["steps"] == 2 for r in res.runs)
    assert all(r["bits_per_byte"] > 0 and r["loss_unseen"] > 0 for r in res.runs)  # engram eval's figures


def test_one_row_and_one_plot_marker_per_run(alloc):
    cfg, res = alloc
    assert len(res.runs) == 4 and res.plot_markers == 4
    assert len(read_parquet(cfg.out / "runs.parquet")) == 4
    points = read_parquet(cfg.out / "points.parquet")
    assert [(p["point"], p["seeds"]) for p in points] == [("rho=1", 2), ("rho=0.5", 2)]
    p = points[1]
    assert p["val_loss_spread"] == pytest.approx(p["val_loss_max"] - p["val_loss_min"])
    assert p["range_verdict"] in (WITHIN, "lower loss than the reference", "higher loss than the reference")
    assert points[0]["paired_verdict"] == "reference" and p["paired_seeds"] == [0, 1]
    by_run = {(r["point"], r["seed"]): r["val_loss"] for r in res.runs}
    assert p["paired_deltas"] == pytest.approx([by_run["rho=0.5", s] - by_run["rho=1", s] for s in (0, 1)])
    assert p["paired_verdict"] == NO_PAIRED_DIFFERENCE and p["paired_delta_ci95_low"] is None  # 2 seeds: a count
    assert p["paired_sign_count"] == f"lower on {sum(d < 0 for d in p['paired_deltas'])} of 2 seeds"
    manifest = read_manifest(cfg.out, "engram.sweep")  # every listed file present with its sha256
    assert manifest["summary"]["status"] == "finished" and len(manifest["runs"]) == 4
    from engram_cli.train.runs import load_run

    assert load_run(cfg.out / "runs" / "rho=0.5--seed=1", with_model=False).plan is not None  # an ordinary run


def test_resume_skips_finished_runs(alloc, monkeypatch):
    cfg, first = alloc

    def never(*a, **k):
        raise AssertionError("a finished run was trained or scored again")

    monkeypatch.setattr(R, "train", never)
    monkeypatch.setattr(R, "eval_record", never)
    again = sweep(cfg)
    assert again.trained == [] and sorted(again.skipped) == sorted(r["run"] for r in first.runs)
    assert [r["val_loss"] for r in again.runs] == [r["val_loss"] for r in first.runs]
    assert [r["bits_per_byte"] for r in again.runs] == [r["bits_per_byte"] for r in first.runs]


def test_jobs_2_gives_the_numbers_of_jobs_1(alloc, tmp_path):
    cfg, res = alloc
    par = sweep(config(tmp_path / "par", cfg.tables, ratios=[1.0, 0.5], seeds=[0], jobs=2))
    assert len(par.trained) == 2
    one = {r["run"]: r for r in res.runs}
    for r in par.runs:  # same threads per run (1): bit for bit the same
        assert (r["train_loss"], r["val_loss"], r["total_params"]) == \
            (one[r["run"]]["train_loss"], one[r["run"]]["val_loss"], one[r["run"]]["total_params"])


def test_interrupted_run_resumes_and_unstarted_run_restarts(tmp_path, tiny_tables, monkeypatch):
    cfg = config(tmp_path / "s", tiny_tables, ratios=[1.0], seeds=[0, 1])

    def stop_second_run(task, completed, total=None, **info):
        if task == "rho=1--seed=1" and completed == 1:  # after its step-1 checkpoint
            raise Interrupted(signal.SIGINT)

    with pytest.raises(Interrupted) as e:
        sweep(cfg, progress=stop_second_run)
    assert "1 of 2 runs finished" in e.value.message and "rerun the same command" in e.value.hint
    assert json.loads((cfg.out / "manifest.json").read_text())["summary"]["status"] == "interrupted"
    killed_early = cfg.out / "runs" / "rho=1--seed=2"  # a run killed before it wrote its manifest
    killed_early.mkdir()
    (killed_early / "config.json").write_text("{}")

    calls = []
    real_train = R.train

    def spy(tc, progress=None):
        calls.append((tc.out.name, tc.resume))
        return real_train(tc, progress=progress)

    monkeypatch.setattr(R, "train", spy)
    cfg.seeds = [0, 1, 2]  # a point's seeds may grow; finished runs stay
    res = sweep(cfg)
    assert calls == [("rho=1--seed=1", True), ("rho=1--seed=2", False)]
    runs = json.loads((cfg.out / "manifest.json").read_text())["runs"]
    assert runs["rho=1--seed=1"]["action"] == "resume" and runs["rho=1--seed=1"]["start_step"] == 1
    assert runs["rho=1--seed=2"]["action"] == "restart"
    assert [r["status"] for r in res.runs] == ["finished"] * 3 and res.skipped == ["rho=1--seed=0"]


def test_force_keeps_the_previous_sweep_until_the_new_one_is_complete(tmp_path, tiny_tables, monkeypatch):
    from engram_cli.core.artifacts import sha256_file

    old_cfg = config(tmp_path / "s", tiny_tables, ratios=[1.0], seeds=[0])
    sweep(old_cfg)
    before = {p.relative_to(old_cfg.out): sha256_file(p) for p in old_cfg.out.rglob("*") if p.is_file()}
    new_cfg = config(tmp_path / "s", tiny_tables, ratios=[1.0], seeds=[0, 1], force=True)

    def stop_second_run(task, completed, total=None, **info):
        if task == "rho=1--seed=1" and completed == 1:
            raise Interrupted(signal.SIGINT)

    with pytest.raises(Interrupted) as e:
        sweep(new_cfg, progress=stop_second_run)
    assert "stays as it was until the new sweep is complete" in e.value.hint
    after = {p.relative_to(old_cfg.out): sha256_file(p) for p in old_cfg.out.rglob("*") if p.is_file()}
    assert after == before  # the previous sweep, byte for byte
    staged = tmp_path / ".s.forced"
    assert (staged / "runs" / "rho=1--seed=0" / "manifest.json").is_file()

    calls = []
    real_train = R.train
    monkeypatch.setattr(R, "train", lambda tc, progress=None: calls.append(tc.out.name) or real_train(tc, progress))
    res = sweep(new_cfg)  # the same command continues the forced sweep, then swaps it in
    assert calls == ["rho=1--seed=1"] and not staged.exists()
    assert res.out == old_cfg.out and all(str(old_cfg.out) in f for f in res.files)
    assert len(json.loads((old_cfg.out / "manifest.json").read_text())["runs"]) == 2
    assert read_manifest(old_cfg.out, "engram.sweep")["summary"]["status"] == "finished"


def test_grid_replans_plan_keys_at_equal_parameters(tmp_path, tiny_tables):
    cfg = config(tmp_path / "g", tiny_tables, kind="grid", axes=[parse_axis("plan.n_head_per_ngram=1,3")],
                 allocation=0.5)
    res = sweep(cfg)
    a, b = res.runs
    assert (a["point"], b["point"]) == ("n_head_per_ngram=1", "n_head_per_ngram=3")
    assert abs(a["total_params"] / b["total_params"] - 1) < 0.01  # --allocation spreads the same budget
    manifest = json.loads((Path(b["run_dir"]) / "manifest.json").read_text())
    assert manifest["plan"]["source"] == "derived" and manifest["plan"]["changes"] == {"n_head_per_ngram": 3}
    from engram_cli.tables.plan import TablePlan

    assert TablePlan.load(Path(b["run_dir"]) / "table_plan.json").n_head_per_ngram == 3
    config_json = json.loads((Path(b["run_dir"]) / "config.json").read_text())
    assert config_json["plan"]["n_head_per_ngram"] == 3


# ---------------------------------------------------------------------------------------------
# the command line


def invoke(*args: str):
    return runner.invoke(app, list(args))


def sets() -> list[str]:
    return [x for s in TINY_RUN_SETS for x in ("--set", s)]


def test_cli_two_point_memory_sweep_end_to_end(tmp_path, tiny_tables):
    out = tmp_path / "mem"
    r = invoke("sweep", "memory", *TINY_RUN_CORPUS, "-T", str(tiny_tables), "--slots", "1", *sets(),
               "--threads", "1", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [p["point"] for p in data["points"]] == ["backbone", "slots=1"]
    assert {p.relative_to(out).as_posix() for p in out.iterdir()} == \
        {"manifest.json", "runs.parquet", "points.parquet", "sweep.png", "sweep.svg", "loss_curves.png", "runs"}
    assert sorted(p.name for p in (out / "runs").iterdir() if not p.name.startswith(".")) == \
        ["backbone--seed=0", "slots=1--seed=0"]
    kept = {"manifest.json", "config.json", "metrics.jsonl", "loss_curve.png", "ckpt"}
    assert {p.name for p in (out / "runs" / "backbone--seed=0").iterdir()} == kept
    assert {p.name for p in (out / "runs" / "slots=1--seed=0").iterdir()} == kept | {"table_plan.json", "table_deltas"}  # a store run: its delta chain
    one_row = next(x for x in data["runs"] if x["point"] == "slots=1")
    assert one_row["table_rows"] == 4 and one_row["bits_per_byte"] > 0  # 2 heads x 2 orders x 1 layer, one row each
    assert [p.name for p in tmp_path.iterdir()] == ["mem"]  # nothing beside it but its lock, released


def test_sweep_help_and_one_red_line_inside_the_sub_app(tmp_path):
    r = invoke("sweep", "--help")
    assert r.exit_code == 0 and "allocation" in r.output and "Examples" in r.output
    one_red_line(invoke("sweep", "allocation", "x", "-o", str(tmp_path / "s")), "Missing option")


@pytest.mark.parametrize("args, needles", [
    (["grid", "--axis", "model.nope=1,2"], ["unknown config key 'model.nope'"]),
    (["grid", "--axis", "train.seed=1,2"], ["cannot be a sweep axis", "--seeds"]),
    (["allocation", "--ratios", "1,1.5"], ["outside [0, 1]"]),
    (["allocation", "--ratios", ""], ["empty"]),
    (["allocation", "--ratios", "1,0.5", "--jobs", "0"], ["--jobs"]),
    (["memory", "--slots", "0.5"], ["whole number"]),
    (["allocation", "--ratios", "1,0.5", "--set", "plan.embed_dim_per_head=512"], ["point rho=0.5", "slots per Engram"]),
])
def test_bad_input_is_one_red_line_and_writes_nothing(tmp_path, tiny_tables, args, needles):
    out = tmp_path / "s"
    one_red_line(invoke("sweep", args[0], *TINY_RUN_CORPUS, "-T", str(tiny_tables), *sets(), *args[1:], "-o", str(out)),
                 *needles)
    assert not out.exists()


def test_an_existing_directory_that_is_no_sweep_is_refused(tmp_path, tiny_tables):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_red_line(invoke("sweep", "allocation", *TINY_RUN_CORPUS, "-T", str(tiny_tables), "--ratios", "1", "-o", str(out)),
                 "not an engram sweep")
    one_red_line(invoke("sweep", "allocation", *TINY_RUN_CORPUS, "-T", str(tiny_tables), "--ratios", "1", "-o", str(out),
                        "--force"), "--force replaces only")
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# engram train: [plan] settings, TensorBoard


def test_plan_settings_cannot_size_tables_under_an_allocation(tmp_path, tiny_tables):
    from engram_cli.train import TrainConfig, train

    with pytest.raises(ConfigError, match="--allocation sizes the tables itself"):
        train(TrainConfig(out=tmp_path / "r", tables=tiny_tables, sources=TINY_RUN_CORPUS, allocation=0.5,
                          overrides=[*TINY_RUN_SETS, "plan.target_size=100"]))
    assert not (tmp_path / "r").exists()


def test_resume_of_a_run_recorded_before_the_plan_section(tmp_path):
    from engram_cli.train import load_settings
    from engram_cli.train.settings import check_resume_settings

    now = load_settings(None, TINY_RUN_SETS)
    saved = {k: v for k, v in now.to_dict().items() if k != "plan"}
    check_resume_settings(saved, now, tmp_path / "config.json")  # no [plan] recorded = the tables' plan


def test_log_tensorboard_without_the_package_is_one_red_line(tmp_path, tiny_tables, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    r = runner.invoke(app, ["train", *TINY_RUN_CORPUS, "-T", str(tiny_tables), "-o", str(tmp_path / "r"), *sets(),
                            "--log", "tensorboard"])
    one_red_line(r, "`tensorboard` extra", "engram-cli[tensorboard]")
    assert not (tmp_path / "r").exists()


def test_log_tensorboard_writes_the_metrics(tmp_path, tiny_tables, monkeypatch):
    scalars, closed = [], []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            closed.append(self.log_dir)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    from engram_cli.train import TrainConfig, train

    train(TrainConfig(out=tmp_path / "r", tables=tiny_tables, sources=TINY_RUN_CORPUS, overrides=list(TINY_RUN_SETS),
                      log="tensorboard", cache_dir=tmp_path / "cache"))
    assert ("train/loss", 2) in scalars and ("val/loss", 2) in scalars
    assert closed == [str(tmp_path / "r" / "tensorboard")]
    assert (tmp_path / "r" / "loss_curve.png").stat().st_size > 0


def test_study_summary_tables_every_point(alloc, tmp_path):
    """scripts/study_summary.py (what scripts/study.sh ends with) reads a sweep directory back."""
    import runpy

    cfg, res = alloc
    (tmp_path / "allocation").symlink_to(cfg.out, target_is_directory=True)
    summary = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "study_summary.py"))["summary"]
    text = summary(tmp_path)
    rows = [ln for ln in text.splitlines() if ln.startswith("| rho=")]
    assert [r.split(" | ")[0] for r in rows] == ["| rho=1", "| rho=0.5"]
    means = {p["point"]: p["val_loss_mean"] for p in res.points}
    assert f"{means['rho=0.5']:.3f}" in rows[1] and "reference" in rows[0]


# ---------------------------------------------------------------------------------------------
# the human-readable table


def test_the_table_names_both_verdicts(alloc, monkeypatch):
    """The rendered summary (not --json): every point with its mean, spread and both verdicts,
    every run kept, nothing trained again."""
    from rich.console import Console

    import engram_cli.commands.render as render_module

    cfg, res = alloc
    monkeypatch.setattr(render_module, "out", Console(highlight=False, width=400))  # one line per row
    r = runner.invoke(app, ["sweep", "allocation", *TINY_RUN_CORPUS, "-T", str(cfg.tables), "--ratios", "1,0.5",
                            "--seeds", "0,1", *sets(), "--threads", "1", "-o", str(cfg.out), "--quiet"])
    assert r.exit_code == 0, r.output
    text = r.stdout
    for header in ("val loss mean", "min – max", "Δ vs reference", "range verdict", "paired Δ [95% CI]",
                   "paired verdict", "bits/byte"):
        assert header in text
    lines = {ln.split("│")[1].strip(): ln for ln in text.splitlines() if ln.count("│") > 5}
    ref, half = (next(p for p in res.points if p["point"] == n) for n in ("rho=1", "rho=0.5"))
    assert f"{ref['val_loss_mean']:.3f}" in lines["rho=1"] and "reference" in lines["rho=1"]
    assert f"{half['val_loss_mean']:.3f}" in lines["rho=0.5"] and half["range_verdict"] in lines["rho=0.5"]
    assert f"{half['paired_delta_mean']:+.3f} ({half['paired_sign_count']})" in lines["rho=0.5"]
    assert half["paired_verdict"] in lines["rho=0.5"]
    assert sum(name in lines and "kept" in lines[name] for name in (x["run"] for x in res.runs)) == 4
    assert "0 runs trained, 4 kept" in text


# ---------------------------------------------------------------------------------------------
# kept runs are verified; earlier points stay; a corrupt manifest; a missing device


def test_a_kept_run_with_a_flipped_byte_is_trained_again(tmp_path, tiny_tables):
    cfg = config(tmp_path / "s", tiny_tables, ratios=[1.0], seeds=[0], cache_dir=tmp_path / "cache")
    first = sweep(cfg)
    weights = sorted((cfg.out / "runs" / "rho=1--seed=0" / "ckpt").glob("*/model.safetensors"))[-1]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    again = sweep(cfg)
    assert again.trained == ["rho=1--seed=0"] and again.skipped == []
    assert any("rho=1--seed=0 failed its hash check and was trained again" in w for w in again.warnings)
    assert again.runs[0]["val_loss"] == first.runs[0]["val_loss"]  # the same run, bit for bit, retrained
    assert R.verify_run(cfg.out / "runs" / "rho=1--seed=0") is None
    assert sweep(cfg).trained == []  # now it passes and is kept


def test_other_ratios_keep_the_earlier_points(tmp_path, tiny_tables):
    cfg = config(tmp_path / "s", tiny_tables, ratios=[1.0], seeds=[0], cache_dir=tmp_path / "cache")
    sweep(cfg)
    cfg.ratios = [0.5]
    res = sweep(cfg)
    assert res.trained == ["rho=0.5--seed=0"] and res.skipped == ["rho=1--seed=0"]
    assert [(p["point"], p["reference"]) for p in res.points] == [("rho=0.5", False), ("rho=1", True)]
    assert res.points[0]["delta_vs_reference"] is not None  # against the earlier call's pure MoE
    assert any("kept 1 run(s) of earlier calls" in w and "rho=1--seed=0" in w for w in res.warnings)
    assert len(read_parquet(cfg.out / "points.parquet")) == 2
    manifest = read_manifest(cfg.out, "engram.sweep")
    assert sorted(manifest["runs"]) == ["rho=0.5--seed=0", "rho=1--seed=0"]
    assert [p["name"] for p in manifest["config"]["points"]] == ["rho=0.5", "rho=1"]


def test_a_corrupt_manifest_is_named_and_force_replaces_it(tmp_path, tiny_tables):
    out = tmp_path / "s"
    args = ["sweep", "allocation", *TINY_RUN_CORPUS, "-T", str(tiny_tables), "--ratios", "1", *sets(),
            "--threads", "1", "--no-eval", "-o", str(out), "--json"]
    assert invoke(*args).exit_code == 0
    (out / "manifest.json").write_text('{"format": "engram.sweep", "runs": ')  # cut short
    one_red_line(invoke(*args), "manifest.json is corrupt", "--force")
    r = invoke(*args, "--force")
    assert r.exit_code == 0, r.output
    assert read_manifest(out, "engram.sweep")["summary"]["status"] == "finished"
    assert not (tmp_path / ".s.forced").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_refused_device_leaves_nothing_behind(tmp_path, tiny_tables):
    out = tmp_path / "s"
    one_red_line(invoke("sweep", "allocation", *TINY_RUN_CORPUS, "-T", str(tiny_tables), "--ratios", "1", *sets(),
                        "--device", "cuda", "-o", str(out)), "--device cuda", "CUDA is not available")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_what_a_sweep_directory_holds(tmp_path):
    """A killed sweep is recognized by what it holds (sweep_dir_state), a directory of anything
    else never is."""
    from engram_cli.sweep.report import CORRUPT, EMPTY, FOREIGN, SWEEP, UNMARKED, sweep_dir_state

    d = tmp_path / "s"
    assert sweep_dir_state(d)[0] == EMPTY
    d.mkdir()
    assert sweep_dir_state(d)[0] == EMPTY
    (d / ".manifest.json.x1y2.tmp").write_text("{")  # killed inside the first atomic write
    assert sweep_dir_state(d)[0] == UNMARKED
    (d / "runs" / "rho=1--seed=0" / "ckpt").mkdir(parents=True)
    (d / "runs" / ".rho=1--seed=0.lock").write_text("123")  # the run's lock, left by SIGKILL
    assert sweep_dir_state(d)[0] == UNMARKED
    (d / "manifest.json").write_text('{"format": "engram.sweep", "runs"')
    assert sweep_dir_state(d)[0] == CORRUPT and "JSON" in sweep_dir_state(d)[1]
    (d / "manifest.json").write_text('{"format": "engram.sweep", "config": {}}')
    assert sweep_dir_state(d) == (CORRUPT, "its 'runs' is missing or not what engram wrote")
    (d / "manifest.json").write_text('{"format": "engram.sweep", "config": {}, "runs": {}}')
    assert sweep_dir_state(d)[0] == SWEEP
    (d / "manifest.json").write_text('{"format": "engram.run"}')
    assert sweep_dir_state(d) == (FOREIGN, "a 'engram.run' artifact")
    (d / "manifest.json").unlink()
    (d / "notes.txt").write_text("mine")
    assert sweep_dir_state(d)[0] == FOREIGN
    (d / "notes.txt").unlink()
    (d / "runs" / "notes.txt").write_text("mine")
    assert sweep_dir_state(d)[0] == FOREIGN
    (d / "manifest.json").write_text("{")
    assert sweep_dir_state(d)[0] == FOREIGN  # a corrupt manifest beside files of others: not ours


# ---------------------------------------------------------------------------------------------
# a sweep killed with SIGKILL at any instant continues with the same command


def sweep_args(out: Path, tables: Path, cache: Path, *extra: str) -> list[str]:
    return ["sweep", "allocation", *TINY_RUN_CORPUS, "-T", str(tables), "--ratios", "1,0.5", *sets(), "--threads", "1",
            "--no-eval", "--cache-dir", str(cache), "-o", str(out), "--quiet", *extra]


def run_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["summary"]["status"]
    except (OSError, ValueError, KeyError):
        return None


#: when the child is killed: a condition on the sweep directory and the seconds since it started, polled every 5 ms
INSTANTS = {
    "directory created": lambda out, seconds: out.exists(),
    "4 s in": lambda out, seconds: seconds >= 4.0,
    "first run training": lambda out, seconds: (out / "runs" / "rho=1--seed=0" / "ckpt").exists(),
    "first run finished": lambda out, seconds: run_status(out / "runs" / "rho=1--seed=0") == "finished",
}


def kill_sweep_at(args: list[str], out: Path, instant: str, workers: list[int] | None = None) -> None:
    """Start ``python -m engram_cli ARGS`` and SIGKILL it at ``instant``; ``workers`` collects the
    pids of its children just before."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "engram_cli", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    t0, deadline = time.monotonic(), time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if INSTANTS[instant](out, time.monotonic() - t0):
                break
            time.sleep(0.005)
        if workers is not None:
            workers += children_of(child.pid)
        if child.poll() is not None and instant == "4 s in" and child.returncode == 0:
            pytest.skip("this machine finished the sweep in under 4 s")
        assert child.poll() is None, f"the sweep ended before {instant}: {child.stderr.read()[-2000:]}"
        child.kill()
    finally:
        child.kill()
        child.wait()


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("instant", list(INSTANTS))
def test_a_sweep_killed_at_any_instant_continues(tmp_path, tiny_tables, instant):
    out, cache = tmp_path / "s", tmp_path / "cache"
    args = sweep_args(out, tiny_tables, cache)
    kill_sweep_at(args, out, instant)
    first_done = run_status(out / "runs" / "rho=1--seed=0") == "finished"
    r = invoke(*args, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [x["status"] for x in res["runs"]] == ["finished", "finished"]
    assert ("rho=1--seed=0" in res["skipped"]) == first_done  # a finished run is kept, not trained again
    assert read_manifest(out, "engram.sweep")["summary"]["status"] == "finished"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".s")] == []  # no staging, no lock left


@pytest.mark.slow
@pytest.mark.parametrize("instant", ["first run training", "first run finished"])
def test_force_over_a_killed_sweep(tmp_path, tiny_tables, instant):
    out, cache = tmp_path / "s", tmp_path / "cache"
    kill_sweep_at(sweep_args(out, tiny_tables, cache), out, instant)
    r = invoke(*sweep_args(out, tiny_tables, cache, "--force", "--json"))
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.stdout)["trained"]) == ["rho=0.5--seed=0", "rho=1--seed=0"]  # started over
    assert read_manifest(out, "engram.sweep")["summary"]["status"] == "finished"


@pytest.mark.slow
def test_the_workers_of_a_killed_parallel_sweep_stop_themselves(tmp_path, tiny_tables):
    out, cache = tmp_path / "s", tmp_path / "cache"
    args = sweep_args(out, tiny_tables, cache, "--jobs", "2")
    workers: list[int] = []
    kill_sweep_at(args, out, "first run training", workers)
    assert workers, "no worker process was running"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{w}").exists() for w in workers), "an orphaned worker kept running"
    r = invoke(*args[:-2], "--json")  # continued with --jobs 1
    assert r.exit_code == 0, r.output
    assert [x["status"] for x in json.loads(r.stdout)["runs"]] == ["finished", "finished"]


# ---------------------------------------------------------------------------------------------
# parallel runs that fail


FAKE_WORKER = """
import json, os, sys, time
kind = os.environ["FAKE_KIND"]
job = json.loads(sys.stdin.readline())
open(os.path.join(os.environ["FAKE_PIDS"], str(os.getpid())), "w").close()
if kind == "error":
    print(json.dumps({"kind": "error", "type": "ConfigError", "message": "bad " + job["name"], "hint": "fix it"}))
elif kind == "crashed":
    print(json.dumps({"kind": "crashed", "message": "ZeroDivisionError: division by zero"}))
elif kind == "dies":
    sys.exit(3)
elif kind == "sleeps":  # a run that trains on; "stubborn" ignores SIGTERM
    import signal
    if job["name"] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(json.dumps({"kind": "progress", "task": "train", "completed": 0, "total": 2, "info": {}}), flush=True)
    time.sleep(600)
"""


def parallel(tmp_path, monkeypatch, kind: str, names: list[str]):
    """ParallelRuns over fake workers (no training): what the sweep process does with what they say."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    (tmp_path / "pids").mkdir()
    monkeypatch.setenv("FAKE_KIND", kind)
    monkeypatch.setenv("FAKE_PIDS", str(tmp_path / "pids"))
    monkeypatch.setattr(R, "job_to_json", lambda job: json.dumps({"name": job.name}))
    monkeypatch.setattr(R.ParallelRuns, "WORKER", (str(script),))
    monkeypatch.setattr(R.ParallelRuns, "STOP_GRACE_S", 1.0)
    runs = R.ParallelRuns(2, 1, lambda name: (lambda *a, **k: None), lambda record: None)
    return runs, [types.SimpleNamespace(name=n) for n in names]


@pytest.mark.parametrize("kind, error, needle", [
    ("error", ConfigError, "bad a"),
    ("crashed", TrainingError, "run a crashed: ZeroDivisionError"),
    ("dies", TrainingError, "the process of run a died (exit code 3"),
])
def test_a_failing_worker_is_one_error(tmp_path, monkeypatch, kind, error, needle):
    runs, jobs = parallel(tmp_path, monkeypatch, kind, ["a", "b"])
    with pytest.raises(error) as e:
        runs.run(jobs)
    assert needle in e.value.message and runs.running == {}
    assert len(list((tmp_path / "pids").iterdir())) == 1  # the second waited for the first to train


def test_stop_all_terminates_every_worker_and_kills_a_stubborn_one(tmp_path, monkeypatch):
    runs, jobs = parallel(tmp_path, monkeypatch, "sleeps", ["stubborn", "polite"])
    started = []

    def interrupt_once_both_train(name):
        def progress(*a, **k):
            started.append(name)
            if len(started) == 2:
                raise Interrupted(signal.SIGINT)
        return progress

    runs.progress = interrupt_once_both_train
    procs = {}
    real_start = runs._start
    runs._start = lambda job: (real_start(job), procs.update({job.name: runs.running[job.name]}))
    with pytest.raises(Interrupted):
        runs.run(jobs)
    assert runs.running == {}
    assert procs["polite"].returncode == -signal.SIGTERM and procs["stubborn"].returncode == -signal.SIGKILL


@pytest.mark.slow
def test_a_worker_that_dies_mid_sweep_stops_the_others_and_keeps_finished_runs(tmp_path, tiny_tables, monkeypatch):
    """Real runs with --jobs 2; the worker of rho=1--seed=1 is SIGKILLed once the sweep recorded
    rho=1--seed=0 finished: one error line, the other running worker stopped, the finished run kept and not
    trained again by the rerun."""
    out, pids = tmp_path / "s", tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "dying_worker.py"
    script.write_text(f"""
import io, json, os, signal, sys, time
line = sys.stdin.readline()
open(os.path.join({str(pids)!r}, str(os.getpid())), "w").close()
if json.loads(line)["name"] == "rho=1--seed=1":
    print(json.dumps({{"kind": "progress", "task": "train", "completed": 0, "total": 2, "info": {{}}}}), flush=True)
    sweep_manifest = os.path.join({str(out)!r}, "manifest.json")  # the sweep has the first run's record
    for _ in range(2400):
        try:
            if json.load(open(sweep_manifest))["runs"]["rho=1--seed=0"]["status"] == "finished":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin = io.StringIO(line)
from engram_cli.sweep.worker import main
main()
""")
    monkeypatch.setattr(R.ParallelRuns, "WORKER", (str(script),))
    args = ["sweep", "allocation", *TINY_RUN_CORPUS, "-T", str(tiny_tables), "--ratios", "1,0.5", "--seeds", "0,1",
            *sets(), "--threads", "1", "--no-eval", "--cache-dir", str(tmp_path / "cache"), "-o", str(out), "--quiet"]
    one_red_line(invoke(*args, "--jobs", "2"), "the process of run rho=1--seed=1 died", "rerun the same command")
    assert not any(Path(f"/proc/{p.name}").exists() for p in pids.iterdir())  # every worker ended
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["status"] == "stopped"
    assert manifest["runs"]["rho=1--seed=0"]["status"] == "finished"
    monkeypatch.undo()
    r = invoke(*args, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["skipped"] == ["rho=1--seed=0"] and len(res["trained"]) == 3
