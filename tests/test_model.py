"""The MoE + Engram model: shapes, causality, MoE equivalences, Engram wiring, sparse grads, errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engram_cli.core.errors import ConfigError, InputError
from engram_cli.model.config import ModelConfig
from engram_cli.model.moe import MoE, SwiGLU, load_balancing_loss, moe_reference_forward
from engram_cli.model.transformer import EngramModel, param_counts
from engram_cli.tables.hashing import hash_ngrams
from engram_cli.tables.plan import make_plan

V = 96  # model vocabulary of the tiny tests
CANON_V = 80  # canonical vocabulary (canonical ids are idx % CANON_V)


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=3, n_head=2, n_embd=32, block_size=64, moe_num_experts=4,
                moe_top_k=2, moe_num_shared_experts=1, moe_expert_hidden=32)  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def tiny_plan(layer_ids=(0, 2), **kw):
    base = dict(canonical_vocab_size=CANON_V, canonical_pad_id=2, original_vocab_size=V, layer_ids=layer_ids,
                n_head_per_ngram=2, embed_dim_per_head=8, target_sizes=(61, 67))  # fmt: skip
    base.update(kw)
    return make_plan(**base)


def batch(B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    return idx, idx % CANON_V


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- shapes, gates, causality


@pytest.mark.parametrize("hc", [1, 2])
def test_forward_shapes_and_gates(hc):
    plan = tiny_plan()
    model = EngramModel(tiny_config(engram_hc_mult=hc), plan)
    idx, canon = batch()
    out = model(idx, canon, targets=idx, return_gates=True)
    assert out.logits.shape == (2, 16, V)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.allclose(out.loss, out.lm_loss + model.config.moe_aux_loss_weight * out.aux_loss)
    assert set(out.gates) == set(plan.layer_ids)
    for gate in out.gates.values():
        assert gate.shape == (2, 16, hc)
        assert gate.min() >= 0 and gate.max() <= 1
        assert gate.requires_grad  # part of the training graph, not a side computation
    assert model(idx, canon).gates is None and model(idx, canon).loss is None


def test_returned_gates_are_the_forward_pass_gates():
    model = EngramModel(tiny_config(engram_hc_mult=2), tiny_plan())
    seen = {}
    for layer in model.engram_layer_ids:
        model.blocks[layer].engram.register_forward_hook(
            lambda mod, args, output, layer=layer: seen.__setitem__(layer, output[1])
        )
    idx, canon = batch()
    out = model(idx, canon, return_gates=True)
    for layer, gate in out.gates.items():
        assert gate is seen[layer]
    # asking for gates does not change the computation
    assert torch.equal(out.logits, model(idx, canon).logits)


@pytest.mark.parametrize("reference", [False, True])
def test_engram_gate_equals_the_formula_by_hand(reference):
    """alpha = sigmoid(sign(s) sqrt|s|), s = RMSNorm(h) . RMSNorm(W_K e) / sqrt(C), for every branch
    (paper Section 2.3), computed here with plain tensor ops from the module's weights."""
    hc, B, T = 2, 2, 16
    plan = tiny_plan()
    config = tiny_config(engram_hc_mult=hc, engram_reference_module=reference)
    model = EngramModel(config, plan)
    C = config.n_embd
    eps = torch.finfo(torch.float32).eps if reference else config.norm_eps
    g = torch.Generator().manual_seed(3)
    _, canon = batch(B, T)
    for layer, slots in model.engram_slots(canon).items():  # slots: (B, T, H)
        engram = model.blocks[layer].engram
        with torch.no_grad():  # random weights of order 1, so that s spans both signs and sizes
            for p in engram.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))
        h = torch.randn(B, T, hc, C, generator=g)
        with torch.no_grad():
            _, gate = engram(h, slots)  # (B, T, hc)
            rows = engram.tables.embedding.weight
            offsets = plan.head_offsets(layer)
            e = torch.cat([rows[slots[..., j] + offsets[j]] for j in range(slots.shape[-1])], dim=-1)  # (B, T, H*D)
            W_K, b_K = engram.key_proj.weight, engram.key_proj.bias  # (hc*C, H*D), (hc*C,) or None
            for b in range(hc):
                k = e @ W_K[b * C:(b + 1) * C].T + (b_K[b * C:(b + 1) * C] if b_K is not None else 0)  # (B, T, C)
                hn = h[:, :, b] / torch.sqrt((h[:, :, b] ** 2).mean(-1, keepdim=True) + eps) * engram.query_norm.weight[b]
                kn = k / torch.sqrt((k ** 2).mean(-1, keepdim=True) + eps) * engram.key_norm.weight[b]
                s = (hn * kn).sum(-1) / C ** 0.5  # (B, T)
                expected = torch.sigmoid(torch.sign(s) * torch.sqrt(torch.abs(s)))
                assert s.abs().min() > 1e-4 and (s > 0).any() and (s < 0).any()
                torch.testing.assert_close(gate[..., b], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hc,with_plan", [(1, True), (2, True), (1, False)])
def test_causal(hc, with_plan):
    model = EngramModel(tiny_config(engram_hc_mult=hc), tiny_plan() if with_plan else None).eval()
    idx, canon = batch(B=1, T=20)
    idx2, canon2 = idx.clone(), canon.clone()
    idx2[:, 12:] = (idx2[:, 12:] + 7) % V
    canon2[:, 12:] = (canon2[:, 12:] + 5) % CANON_V
    a = model(idx, canon).logits
    b = model(idx2, canon2).logits
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


# ---------------------------------------------------------------- MoE


def test_one_expert_moe_equals_dense_swiglu():
    cfg = tiny_config(moe_num_experts=1, moe_top_k=1, moe_num_shared_experts=0)
    moe = MoE(cfg)
    ffn = SwiGLU(cfg.n_embd, cfg.moe_expert_hidden)
    with torch.no_grad():
        moe.experts.w_gate[0].copy_(ffn.gate.weight.T)
        moe.experts.w_up[0].copy_(ffn.up.weight.T)
        moe.experts.w_down[0].copy_(ffn.down.weight.T)
    x = torch.randn(2, 7, cfg.n_embd)
    y, aux = moe(x)
    torch.testing.assert_close(y, ffn(x))
    assert aux.item() == pytest.approx(1.0)  # one expert is trivially balanced


@pytest.mark.parametrize(
    "experts,top_k,shared,norm",
    [(4, 2, 1, False), (8, 2, 0, False), (8, 3, 2, True), (3, 3, 0, False), (5, 1, 1, False)],
)
def test_fast_moe_matches_reference_loop(experts, top_k, shared, norm):
    cfg = tiny_config(
        moe_num_experts=experts, moe_top_k=top_k, moe_num_shared_experts=shared, moe_norm_topk_prob=norm
    )
    moe = MoE(cfg)
    for w in moe.experts.parameters():
        torch.nn.init.normal_(w, std=0.1)
    x = torch.randn(3, 9, cfg.n_embd)
    y, _ = moe(x)
    torch.testing.assert_close(y, moe_reference_forward(moe, x), rtol=1e-5, atol=1e-6)
    # gradients flow to every expert that received a token, and to the router
    y.sum().backward()
    assert moe.router.gate.weight.grad is not None and moe.router.gate.weight.grad.abs().sum() > 0


def test_router_weights_follow_deepseekmoe():
    cfg = tiny_config(moe_num_experts=6, moe_top_k=2)
    moe = MoE(cfg)
    scores, weights, indices = moe.router(torch.randn(10, cfg.n_embd))
    assert scores.shape == (10, 6) and weights.shape == indices.shape == (10, 2)
    torch.testing.assert_close(weights, scores.gather(1, indices))  # not renormalized by default
    assert (weights.sum(-1) < 1).all()
    moe_n = MoE(replace(cfg, moe_norm_topk_prob=True))
    _, w_n, _ = moe_n.router(torch.randn(10, cfg.n_embd))
    torch.testing.assert_close(w_n.sum(-1), torch.ones(10))


def test_load_balancing_loss_hand_example():
    # 2 tokens, 2 experts, top-1, both tokens go to expert 0: f = (1, 0), P = (0.75, 0.25)
    scores = torch.tensor([[0.9, 0.1], [0.6, 0.4]], requires_grad=True)
    loss = load_balancing_loss(scores, torch.tensor([[0], [0]]), num_experts=2)
    assert loss.item() == pytest.approx(2 * (1.0 * 0.75 + 0.0 * 0.25))
    loss.backward()  # d loss / d scores[t, i] = E * f_i / N: only through P
    torch.testing.assert_close(scores.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    # top-2 of 3, perfectly balanced assignments and uniform scores -> exactly 1
    uniform = torch.full((3, 3), 1 / 3)
    idx = torch.tensor([[0, 1], [1, 2], [2, 0]])
    assert load_balancing_loss(uniform, idx, 3).item() == pytest.approx(1.0)
    # top-2 of 4: f = (2, 1, 1, 0)/4, P = (0.4, 0.3, 0.2, 0.1) -> 4 * (0.8 + 0.3 + 0.2) / 4 = 1.3
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.3, 0.3, 0.3, 0.1]])
    idx = torch.tensor([[0, 1], [0, 2]])
    expected = 4 * (0.5 * 0.4 + 0.25 * 0.3 + 0.25 * 0.2)
    assert load_balancing_loss(scores, idx, 4).item() == pytest.approx(expected)


# ---------------------------------------------------------------- Engram wiring


@pytest.mark.parametrize("hc", [1, 2])
def test_zero_value_projection_equals_backbone(hc):
    cfg = tiny_config(engram_hc_mult=hc)
    model = EngramModel(cfg, tiny_plan()).eval()
    with torch.no_grad():
        for layer in model.engram_layer_ids:
            model.blocks[layer].engram.value_proj.weight.zero_()
    backbone = EngramModel(cfg, None).eval()
    missing, unexpected = backbone.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and unexpected and all(".engram." in k for k in unexpected)
    idx, canon = batch()
    a, b = model(idx, canon), backbone(idx)
    if hc == 1:
        assert torch.equal(a.logits, b.logits)  # h + 0 is exact
    else:
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)


def test_model_slots_equal_hash_ngrams_on_numpy():
    plan = tiny_plan()
    model = EngramModel(tiny_config(), plan)
    idx, canon = batch(B=3, T=24)
    slots = model.engram_slots(canon)
    assert set(slots) == set(plan.layer_ids)
    for layer in plan.layer_ids:
        expected = hash_ngrams(canon.numpy(), plan, layer)
        assert isinstance(expected, np.ndarray)
        assert slots[layer].dtype == torch.long and slots[layer].shape == (3, 24, plan.total_heads)
        np.testing.assert_array_equal(slots[layer].numpy(), expected)
        assert (slots[layer] < torch.tensor(plan.head_sizes(layer))).all()


def test_table_layout_follows_plan():
    plan = tiny_plan()
    model = EngramModel(tiny_config(), plan)
    for layer in plan.layer_ids:
        tables = model.blocks[layer].engram.tables
        assert tables.embedding.num_embeddings == plan.total_slots(layer)
        assert tables.embedding.embedding_dim == plan.embed_dim_per_head
        assert tables.offsets.tolist() == plan.head_offsets(layer)
        assert tables.embedding.sparse


def test_engram_gradients_are_sparse_and_touch_only_looked_up_rows():
    plan = tiny_plan()
    model = EngramModel(tiny_config(), plan)
    idx, canon = batch(B=2, T=10)
    model(idx, canon, targets=idx).loss.backward()
    slots = model.engram_slots(canon)
    tables = model.engram_table_parameters()
    assert len(tables) == len(plan.layer_ids)
    for layer, weight in zip(model.engram_layer_ids, tables):
        assert weight.grad.is_sparse
        rows = (slots[layer] + torch.tensor(plan.head_offsets(layer))).unique()
        touched = weight.grad.coalesce().indices()[0].unique()
        assert torch.equal(touched, rows)
        assert rows.numel() <= 2 * 10 * plan.total_heads < weight.shape[0]
    # the two parameter groups partition the model, and dense parameters get dense gradients
    dense = model.dense_parameters()
    assert len(dense) + len(tables) == len(list(model.parameters()))
    assert {id(p) for p in dense}.isdisjoint({id(p) for p in tables})
    assert all(p.grad is None or not p.grad.is_sparse for p in dense)


def test_canonical_ids_required_iff_engram():
    idx, canon = batch()
    with pytest.raises(InputError, match="canonical_ids"):
        EngramModel(tiny_config(), tiny_plan())(idx)
    with pytest.raises(InputError, match="shape"):
        EngramModel(tiny_config(), tiny_plan())(idx, canon[:, :5])
    EngramModel(tiny_config(), None)(idx)  # the baseline needs none
    with pytest.raises(InputError, match="block_size"):
        EngramModel(tiny_config(block_size=8), None)(idx)


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "overrides,layer_ids,match",
    [
        (dict(moe_top_k=5, moe_num_experts=4), (0,), "moe_top_k"),
        (dict(n_embd=30, n_head=4), (0,), "divisible"),
        (dict(n_embd=20, n_head=4), (0,), "odd"),
        (dict(), (0, 3), r"layer ids \[3\]"),
        (dict(engram_hc_mult=0), (0,), "engram_hc_mult"),
        (dict(moe_num_experts=0), (0,), "moe_num_experts"),
        (dict(moe_num_shared_experts=-1), (0,), "shared"),
        (dict(dropout=1.0), (0,), "dropout"),
        (dict(moe_aux_loss_weight=-0.1), (0,), "aux"),
    ],
)
def test_config_errors(overrides, layer_ids, match):
    with pytest.raises(ConfigError, match=match) as info:
        EngramModel(tiny_config(**overrides), tiny_plan(layer_ids=layer_ids))
    assert info.value.hint  # every error says how to fix it


# ---------------------------------------------------------------- accounting, training


@pytest.mark.parametrize("with_plan", [True, False])
def test_param_counts_partition(with_plan):
    plan = tiny_plan() if with_plan else None
    cfg = tiny_config()
    model = EngramModel(cfg, plan)
    c = param_counts(model)
    assert c["total"] == sum(p.numel() for p in model.parameters())
    assert c["total"] == c["dense"] + c["engram_tables"] + c["experts_routed"]
    per_expert = 3 * cfg.n_embd * cfg.moe_expert_hidden
    assert c["experts_routed"] == cfg.n_layer * cfg.moe_num_experts * per_expert
    assert c["experts_routed_activated"] == cfg.n_layer * cfg.moe_top_k * per_expert
    assert c["activated"] == c["dense"] + c["experts_routed_activated"] + c["engram_tables_activated"]
    if with_plan:
        D = plan.embed_dim_per_head
        assert c["engram_tables"] == sum(plan.total_slots(i) for i in plan.layer_ids) * D
        assert c["engram_tables_activated"] == len(plan.layer_ids) * plan.total_heads * D
        assert c["engram_dense"] > 0
    else:
        assert c["engram_tables"] == c["engram_dense"] == c["engram_tables_activated"] == 0


@pytest.mark.parametrize("hc", [1, 2])
def test_loss_decreases_on_a_repeated_sequence(hc):
    model = EngramModel(tiny_config(n_layer=2, engram_hc_mult=hc), tiny_plan(layer_ids=(0,)))
    dense = torch.optim.AdamW(model.dense_parameters(), lr=3e-3)
    sparse = torch.optim.SparseAdam(model.engram_table_parameters(), lr=3e-3)
    seq = torch.arange(33) * 5 % V
    idx, targets = seq[:-1].repeat(4, 1), seq[1:].repeat(4, 1)
    canon = idx % CANON_V
    losses = []
    for _ in range(30):
        out = model(idx, canon, targets=targets)
        dense.zero_grad(set_to_none=True)
        sparse.zero_grad(set_to_none=True)
        out.loss.backward()
        dense.step()
        sparse.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- Engram init and reference fidelity


@pytest.mark.parametrize("hc", [1, 2])
def test_fresh_engram_conv_branch_contributes_nothing(hc):
    """Zero-initialized short conv (the paper): a fresh module adds exactly alpha_t * v_t."""
    model = EngramModel(tiny_config(engram_hc_mult=hc, engram_conv_init="zero"), tiny_plan())
    idx, canon = batch()
    for layer in model.engram_layer_ids:
        engram = model.blocks[layer].engram
        assert torch.count_nonzero(engram.short_conv.conv.weight) == 0
        h = torch.randn(2, 16, hc, 32) * 0.02
        slots = model.engram_slots(canon)[layer]
        with torch.no_grad():
            y, gate = engram(h, slots)
            v = engram.value_proj(engram.tables(slots).flatten(start_dim=-2))  # (B, T, C)
        torch.testing.assert_close(y, gate.unsqueeze(-1) * v.unsqueeze(2), rtol=0, atol=0)
    old = EngramModel(tiny_config(engram_conv_init="default"), tiny_plan())
    assert torch.count_nonzero(old.blocks[0].engram.short_conv.conv.weight) > 0


def test_engram_module_is_built_as_the_reference_builds_it():
    """W_K/W_V with biases (nn.Linear default) and gate norms at the dtype's eps (nn.RMSNorm(eps=None))."""
    ref = EngramModel(tiny_config(engram_reference_module=True), tiny_plan()).blocks[0].engram
    assert ref.key_proj.bias is not None and ref.value_proj.bias is not None
    assert ref.query_norm.eps is None and ref.key_norm.eps is None
    x = torch.full((1, 1, 1, 32), 1e-4)  # mean square 1e-8: the eps decides the scale
    expect = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(ref.query_norm(x), expect)
    ours = EngramModel(tiny_config(engram_reference_module=False), tiny_plan()).blocks[0].engram
    assert ours.key_proj.bias is None and ours.value_proj.bias is None
    assert ours.query_norm.eps == ours.key_norm.eps == 1e-5


@pytest.mark.parametrize("reference", [True, False])
def test_engram_biases_are_counted(reference):
    from engram_cli.model.budget import predict_param_counts

    cfg, plan = tiny_config(engram_reference_module=reference, engram_hc_mult=2), tiny_plan()
    assert predict_param_counts(cfg, plan) == {k: v for k, v in param_counts(EngramModel(cfg, plan)).items()
                                               if k in predict_param_counts(cfg, plan)}


def test_unknown_conv_init_is_refused():
    with pytest.raises(ConfigError, match="engram_conv_init"):
        tiny_config(engram_conv_init="xavier").validate()
