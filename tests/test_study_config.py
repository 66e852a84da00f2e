"""configs/study.toml: the property it exists for (docs/experiments.md).

The study model must leave the allocation question something to allocate: its inactive routed
experts hold several times the activated parameters, and moving a quarter of them (rho = 0.75)
buys Engram tables of well over 100k rows at the same total. Counted with budget.allocate's
predictions (no model is built) on a synthetic table plan, so no corpus is needed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engram_cli.model.budget import allocate
from engram_cli.tables.plan import make_plan
from engram_cli.train import load_settings

STUDY = Path(__file__).resolve().parents[1] / "configs" / "study.toml"

#: The trainer sets vocab_size from the corpus; this is the medium corpus's sub-vocabulary at the
#: config's min_count = 20 (measured by `engram train`, docs/experiments.md). The embedding and
#: LM head are activated parameters, so the vocabulary matters for the sparse/activated ratio.
MEDIUM_SUBVOCAB = 16_295


@pytest.fixture(scope="module")
def study():
    settings = load_settings(STUDY)
    base = dataclasses.replace(settings.model, vocab_size=MEDIUM_SUBVOCAB)
    # the template docs/experiments.md builds: layer 1, orders 2-3, 4 heads x 16 dims each
    template = make_plan(canonical_vocab_size=1000, canonical_pad_id=2, original_vocab_size=1024,
                         layer_ids=(1,), max_ngram_size=3, n_head_per_ngram=4, embed_dim_per_head=16)
    return settings, base, template


def test_study_config_loads_with_the_papers_conv_init(study):
    settings, base, template = study
    assert base.engram_conv_init == "zero"
    base.validate(template)  # the template's layer fits the model


def test_sparse_budget_is_several_times_the_activated_parameters(study):
    _, base, template = study
    moe = allocate(base, template, 1.0)
    assert moe.plan is None
    assert moe.sparse_budget >= 3 * moe.param_counts["activated"]


def test_three_quarters_allocation_buys_large_tables_at_the_same_total(study):
    _, base, template = study
    moe = allocate(base, template, 1.0)
    engram = allocate(base, template, 0.75)
    assert engram.plan is not None
    assert engram.plan.total_slots_all >= 100_000
    assert engram.param_counts["total"] == pytest.approx(moe.param_counts["total"], rel=0.01)
