"""engram sweep: equal budgets across an allocation sweep, one row and one marker per run, resume
without training again, --jobs 2 == --jobs 1, the capacity-1 control, plan keys on grid axes, the
CLI end to end (exact files), bad input as one red line; the [plan] settings, the loss curve and
the TensorBoard log of engram train.

Runs are the tiny model of ``conftest.TINY_RUN_SETS`` (2 steps on 3000 tokens of two speeches) with
the ``tiny_tables`` (Engram at block 1, 2 heads per order, 8 dims, ~1000 slots per head).
"""

from __future__ import annotations

import json
import signal
import sys
import types
from pathlib import Path

import pytest
from conftest import TINY_RUN_CORPUS, TINY_RUN_SETS
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.core.artifacts import read_manifest
from engram_cli.core.errors import ConfigError, Interrupted
from engram_cli.sweep import (
    ONE_SEED,
    WITHIN,
    SweepConfig,
    make_points,
    parse_axis,
    parse_ratios,
    parse_seeds,
    parse_slots,
    power_law_fit,
    sweep,
    verdict,
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


def test_verdict_calls_differences_within_the_seed_spread_no_difference():
    assert verdict([5.00, 5.10], [5.05, 5.07]) == WITHIN        # |Δ| 0.01 <= spread 0.10
    assert verdict([4.50, 4.52], [5.05, 5.07]).startswith("lower loss")
    assert verdict([5.50, 5.52], [5.05, 5.07]).startswith("higher loss")
    assert verdict([4.0], [5.0, 5.1]) == ONE_SEED                 # never a claim from one seed


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
    assert p["verdict"] in (WITHIN, "lower loss than the reference", "higher loss than the reference")
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
    assert {p.name for p in (out / "runs" / "slots=1--seed=0").iterdir()} == kept | {"table_plan.json"}
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
