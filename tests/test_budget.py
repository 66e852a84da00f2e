"""Sparsity allocation: fixed total and activated parameters across the allocation ratio."""

from __future__ import annotations

import math

import pytest

from engram_cli.core.errors import ConfigError
from engram_cli.model.budget import MIN_SLOTS_PER_HEAD, allocate, params_per_expert, predict_param_counts
from engram_cli.model.config import ModelConfig
from engram_cli.model.transformer import EngramModel, param_counts
from engram_cli.tables.plan import make_plan


def tiny_base() -> ModelConfig:
    """The default tiny config (docs/model.md's worked example): 4 layers, C=128, 8 experts top-2."""
    return ModelConfig()


def tiny_template(**kw):
    # 2 Engram layers x 2 orders x 2 heads x 8 dims: d_mem = 32, small next to C = 128, so Engram's
    # own dense projections add only ~1.5% to the activated parameters
    base = dict(canonical_vocab_size=900, canonical_pad_id=2, original_vocab_size=1024, layer_ids=(1, 3),
                n_head_per_ngram=2, embed_dim_per_head=8, seed=7)  # fmt: skip
    base.update(kw)
    return make_plan(**base)


@pytest.fixture(scope="module")
def sweep():
    base, template = tiny_base(), tiny_template()
    return base, template, {rho: allocate(base, template, rho) for rho in (0.5, 0.75, 1.0)}


def test_totals_and_activated_stay_within_three_percent(sweep):
    _, _, allocs = sweep
    totals = [a.param_counts["total"] for a in allocs.values()]
    activated = [a.param_counts["activated"] for a in allocs.values()]
    assert max(totals) / min(totals) - 1 <= 0.03
    assert max(activated) / min(activated) - 1 <= 0.03


@pytest.mark.parametrize("rho", [0.5, 0.75, 1.0])
def test_predicted_counts_equal_the_instantiated_model(sweep, rho):
    _, _, allocs = sweep
    a = allocs[rho]
    assert param_counts(EngramModel(a.config, a.plan)) == a.param_counts


def test_expert_counts_and_derived_plan(sweep):
    base, template, allocs = sweep
    assert [allocs[r].config.moe_num_experts for r in (0.5, 0.75, 1.0)] == [5, 7, 8]  # 2 + round(rho * 6)
    assert allocs[1.0].plan is None and allocs[1.0].config == base
    assert allocs[1.0].sparse_budget == base.n_layer * 6 * params_per_expert(base)
    for rho in (0.5, 0.75):
        a = allocs[rho]
        p = a.plan
        kept = ("seed", "max_ngram_size", "n_head_per_ngram", "layer_ids", "pad_id", "canonical_pad_id",
                "canonical_vocab_size", "original_vocab_size", "embed_dim_per_head", "multipliers")  # fmt: skip
        for field in kept:
            assert getattr(p, field) == getattr(template, field), field
        assert p.target_sizes == (a.table_target_size,) * p.n_orders
        assert all(size >= a.table_target_size for layer in p.layer_ids for size in p.head_sizes(layer))
        assert a.config.moe_top_k == base.moe_top_k and a.config.n_embd == base.n_embd
    assert allocs[1.0].realized_allocation == 1.0
    assert 0.5 < allocs[0.75].realized_allocation < 0.9 and 0.4 < allocs[0.5].realized_allocation < 0.6
    # less in experts -> more in tables
    assert allocs[0.5].param_counts["engram_tables"] > allocs[0.75].param_counts["engram_tables"] > 0


def test_all_to_engram_keeps_the_activated_experts():
    a = allocate(tiny_base(), tiny_template(), 0.0)
    assert a.config.moe_num_experts == a.config.moe_top_k == 2
    assert a.param_counts["experts_routed"] == a.param_counts["experts_routed_activated"]
    assert param_counts(EngramModel(a.config, a.plan)) == a.param_counts


def test_predict_param_counts_matches_models_with_hyper_connections():
    cfg = tiny_base()
    for hc in (1, 3):
        c = ModelConfig(**{**cfg.__dict__, "engram_hc_mult": hc})
        plan = tiny_template(target_sizes=(31, 37))
        assert predict_param_counts(c, plan) == param_counts(EngramModel(c, plan))


@pytest.mark.parametrize("rho", [-0.1, 1.5, math.nan])
def test_ratio_outside_unit_interval(rho):
    with pytest.raises(ConfigError, match="allocation ratio"):
        allocate(tiny_base(), tiny_template(), rho)


def test_too_small_table_is_an_error():
    # one freed expert of 3 * 128 * 4 params cannot pay for Engram's projections
    base = ModelConfig(**{**tiny_base().__dict__, "moe_expert_hidden": 4, "moe_num_experts": 3})
    with pytest.raises(ConfigError, match=f"< {MIN_SLOTS_PER_HEAD}"):
        allocate(base, tiny_template(), 0.0)


def test_allocation_below_one_needs_a_plan():
    with pytest.raises(ConfigError, match="no table plan"):
        allocate(tiny_base(), None, 0.5)
    assert allocate(tiny_base(), None, 1.0).plan is None


def test_plan_layers_must_fit_the_base():
    with pytest.raises(ConfigError, match="outside the model's blocks"):
        allocate(tiny_base(), tiny_template(layer_ids=(1, 15)), 0.5)


def test_memory_estimate_refuses_what_cannot_fit(monkeypatch):
    from engram_cli.core.errors import ConfigError
    from engram_cli.model import budget

    cfg = ModelConfig(vocab_size=10_000)
    need = budget.estimate_train_memory(cfg, None, batch_size=16)
    assert need["total"] == need["weights_and_optimizer"] + need["tables"] + need["activations"]
    assert need["weights_and_optimizer"] == 16 * budget.predict_param_counts(cfg, None)["total"]
    big = budget.estimate_train_memory(cfg, None, batch_size=1_000_000_000)
    assert big["activations"] > 10**15  # a billion sequences
    monkeypatch.setattr(budget, "available_memory", lambda device="cpu": 24 * 2**30)
    budget.check_train_memory(cfg, None, batch_size=16)
    with pytest.raises(ConfigError, match=r"needs about .* GiB of memory .* activations of 1000000000 sequences"):
        budget.check_train_memory(cfg, None, batch_size=1_000_000_000)


# ---------------------------------------------------------------------------------------------
# the tables' memory by where they live (train.table_store) and the advice to keep them on disk

GiB = 2**30


def big_template(target: int = 100_000_000):
    """2 layers x 2 orders x 2 heads x 8 dims of ~`target` slots: 8 x target rows (made without O(rows) work)."""
    return tiny_template(target_sizes=(target, target))


def test_table_bytes_by_optimizer_are_the_row_optimizers_state():
    from engram_cli.tables.sizing import TABLE_OPTIMIZER_STATE_FLOATS, table_train_bytes
    from engram_cli.train.rowopt import ROW_OPTIMIZERS, make_row_optimizer

    plan = tiny_template(target_sizes=(1000, 1000))
    rows, D = plan.total_slots_all, plan.embed_dim_per_head
    assert set(TABLE_OPTIMIZER_STATE_FLOATS) == set(ROW_OPTIMIZERS)
    for name in ROW_OPTIMIZERS:  # the one figure per row the store keeps, whatever the backend
        got = table_train_bytes(plan, name)
        assert got["rows"] == rows * D * 4
        assert got["state"] == rows * make_row_optimizer(name).state_bytes_per_row(D)
    assert table_train_bytes(plan, "adam")["total"] == rows * 3 * D * 4
    assert table_train_bytes(plan, "rowwise-adagrad")["total"] == rows * (D * 4 + 4)
    with pytest.raises(ConfigError, match="unknown table optimizer 'sgd'"):
        table_train_bytes(plan, "sgd")


def test_the_default_is_todays_estimate_and_the_memory_store_is_the_same():
    from engram_cli.model import budget

    cfg, plan = tiny_base(), big_template(1000)
    counts = predict_param_counts(cfg, plan)
    today = budget.estimate_train_memory(cfg, plan, 16)
    assert today["tables"] == counts["engram_tables"] * budget.BYTES_PER_TABLE_VALUE
    assert budget.estimate_train_memory(cfg, plan, 16, table_store="memory") == today
    ada = budget.estimate_train_memory(cfg, plan, 16, table_store="memory", table_optimizer="rowwise-adagrad")
    assert ada["tables"] == plan.total_slots_all * (plan.embed_dim_per_head * 4 + 4)
    with pytest.raises(ConfigError, match="unknown table store 'disk'"):
        budget.estimate_train_memory(cfg, plan, 16, table_store="disk")


def test_tables_that_do_not_fit_in_ram_are_refused_with_the_mmap_hint(monkeypatch, tmp_path):
    from engram_cli.model import budget

    cfg, plan = tiny_base(), big_template()  # 800M rows x 8 dims: ~24 GiB with Adam in RAM
    monkeypatch.setattr(budget, "available_memory", lambda device="cpu": 8 * GiB)
    monkeypatch.setattr(budget, "free_disk", lambda path: 10_000 * GiB)
    for store in ("module", "memory"):
        with pytest.raises(ConfigError, match=rf"Engram tables .* \({store} store, adam\)") as e:
            budget.check_train_memory(cfg, plan, 16, table_store=store)
        assert "--table-store mmap" in str(e.value)
    warnings: list[str] = []
    need = budget.check_train_memory(cfg, plan, 16, table_store="mmap", store_dir=tmp_path, steps=50,
                                     warnings=warnings)
    tokens = 16 * cfg.block_size
    assert need["tables"] == 2 * tokens * plan.total_heads * (2 * 3 * 8 * 4 + 8 * 4)  # 2 layers' working sets
    assert need["table_disk"] == plan.total_slots_all * 3 * 8 * 4 and not warnings
    assert 0 < need["table_disk_expected"] < need["table_disk"]


def test_mmap_warns_when_the_full_store_exceeds_the_free_disk_and_refuses_what_the_run_cannot_fit(
        monkeypatch, tmp_path):
    from engram_cli.model import budget

    cfg, plan = tiny_base(), big_template()
    monkeypatch.setattr(budget, "available_memory", lambda device="cpu": 8 * GiB)
    full = budget.table_store_bytes(plan, "mmap")["disk"]
    expected = budget.table_store_bytes(plan, "mmap", tokens=16 * cfg.block_size, steps=50)["disk_expected"]
    assert expected < full
    monkeypatch.setattr(budget, "free_disk", lambda path: (expected + full) // 2)
    warnings: list[str] = []
    budget.check_train_memory(cfg, plan, 16, table_store="mmap", store_dir=tmp_path, steps=50, warnings=warnings)
    assert len(warnings) == 1 and "on disk" in warnings[0] and "first 50 steps are expected" in warnings[0]
    monkeypatch.setattr(budget, "free_disk", lambda path: expected // 2)
    with pytest.raises(ConfigError, match=r"expected to take about .* in 50 steps .* free") as e:
        budget.check_train_memory(cfg, plan, 16, table_store="mmap", store_dir=tmp_path, steps=50)
    assert "rowwise-adagrad" in str(e.value)
    budget.check_train_memory(cfg, plan, 16, table_store="mmap", store_dir=tmp_path)  # no steps: nothing refused


def test_expected_disk_follows_uniform_hashing_of_blocks():
    from engram_cli.model import budget

    plan = tiny_template(target_sizes=(5000, 5000), layer_ids=(1,))  # one layer, ~20k rows: ~20 blocks
    from engram_cli.model.store import page_rows

    per_row = 3 * plan.embed_dim_per_head * 4
    block = page_rows(plan.embed_dim_per_head)  # a run's stores: one page of rows per block
    blocks = -(-plan.total_slots_all // block)
    few = budget.table_store_bytes(plan, "mmap", tokens=1, steps=1)["disk_expected"]
    assert few == math.ceil(-math.expm1(-plan.total_heads / blocks) * blocks) * block * per_row  # 4 lookups
    coarse = budget.table_store_bytes(plan, "mmap", tokens=1, steps=1, block_rows=1024)["disk_expected"]
    assert coarse > few  # coarser blocks materialize more rows for the same lookups
    many = budget.table_store_bytes(plan, "mmap", tokens=10_000, steps=100)["disk_expected"]
    assert many == plan.total_slots_all * per_row  # every block touched: the full size, never more


def test_the_memory_store_is_advised_to_move_to_disk_past_half_the_ram(monkeypatch):
    from engram_cli.model import budget
    from engram_cli.tables.sizing import table_store_advice

    cfg, plan = tiny_base(), big_template(1_000_000)  # 8M rows: ~245 MiB with Adam
    need_tables = budget.table_store_bytes(plan, "memory")["ram"]
    monkeypatch.setattr(budget, "available_memory", lambda device="cpu": int(need_tables * 1.5) + 4 * GiB)
    warnings: list[str] = []
    budget.check_train_memory(cfg, plan, 16, table_store="memory", warnings=warnings)
    assert not warnings
    monkeypatch.setattr(budget, "available_memory", lambda device="cpu": int(need_tables * 1.9))
    budget.check_train_memory(cfg, plan, 1, table_store="memory", warnings=warnings)
    assert len(warnings) == 1 and "more than half" in warnings[0] and "--table-store mmap" in warnings[0]
    advice = table_store_advice(plan, available=int(need_tables * 1.9))
    assert advice["mmap_advised"] and advice["train_bytes"]["adam"] == need_tables
    assert not table_store_advice(plan, available=need_tables * 3)["mmap_advised"]
    assert not table_store_advice(plan, available=None)["mmap_advised"]
