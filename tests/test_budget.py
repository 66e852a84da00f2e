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
