"""Sparsity allocation: split a fixed budget of never-activated parameters between routed experts
and Engram table slots (paper Section 3, "Conditional Memory via Scalable Lookup", arXiv 2601.07372).

The pure-MoE base model fixes two numbers: the total parameters and the parameters a token
activates. Its *sparse* budget is the routed-expert parameters a token does not use,
``P = n_layer * (E - k) * params_per_expert``. An allocation ratio rho keeps the share rho of P
in routed experts and moves the rest into Engram tables:

    E' = k + round(rho * (E - k))             (half up; the k activated experts stay, so E' >= k)
    freed = n_layer * (E - E') * (params_per_expert + n_embd)   (the experts and their router columns)
            - Engram's own dense parameters (W_K, W_V, norms, conv)
    target slots per head = floor(freed / (n_engram_layers * total_heads * embed_dim_per_head))

Netting Engram's dense parameters out of the freed budget keeps the *total* fixed up to the
rounding of each table up to a prime. The *activated* count grows by exactly those dense
parameters plus the looked-up rows; keep the Engram width small next to the backbone to keep that
within a few percent (the returned counts say by how much). rho = 1 is the pure MoE (no plan).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from engram_cli.core.errors import ConfigError
from engram_cli.model.config import ModelConfig
from engram_cli.tables.plan import TablePlan, make_plan, vocab_fields

#: below this many slots per head a table is too small to mean anything (and primes get sparse)
MIN_SLOTS_PER_HEAD = 16


@dataclass
class Allocation:
    """One point of the allocation sweep: the model to build and its predicted parameter counts."""

    allocation: float  # rho: share of the sparse budget kept in routed experts (1 = pure MoE)
    config: ModelConfig  # the base config with moe_num_experts = E'
    plan: TablePlan | None  # the derived table plan (None at rho = 1 or when nothing was freed)
    param_counts: dict[str, int]  # predicted counts, same keys and values as model.param_counts
    sparse_budget: int  # P = n_layer * (E - k) * params_per_expert of the base model
    table_target_size: int | None  # per-head target slots handed to make_plan (None without plan)

    @property
    def realized_allocation(self) -> float:
        """The share of the never-activated parameters actually in routed experts: rho after
        rounding E' to an integer and the tables to primes (e.g. rho = 0.75 of 6 experts -> 5 kept)."""
        inactive_experts = self.param_counts["experts_routed"] - self.param_counts["experts_routed_activated"]
        inactive_rows = self.param_counts["engram_tables"] - self.param_counts["engram_tables_activated"]
        sparse = inactive_experts + inactive_rows
        return inactive_experts / sparse if sparse else 1.0


def params_per_expert(config: ModelConfig) -> int:
    """A SwiGLU expert: gate and up (C x hidden) and down (hidden x C), no biases."""
    return 3 * config.n_embd * config.moe_expert_hidden


def engram_dense_params(config: ModelConfig, plan: TablePlan) -> int:
    """Per Engram layer: W_K (hc*C x d_mem), W_V (C x d_mem), query/key/conv norms (hc*C each),
    depthwise conv (hc*C x kernel); summed over the plan's layers."""
    C, hc = config.n_embd, config.engram_hc_mult
    d_mem = plan.total_heads * plan.embed_dim_per_head
    per_layer = hc * C * d_mem + C * d_mem + 3 * hc * C + hc * C * config.engram_conv_kernel
    if config.engram_reference_module:
        per_layer += hc * C + C  # the biases of W_K and W_V
    return len(plan.layer_ids) * per_layer


def predict_param_counts(config: ModelConfig, plan: TablePlan | None) -> dict[str, int]:
    """The dict :func:`engram_cli.model.transformer.param_counts` returns for ``EngramModel(config, plan)``,
    computed from the sizes alone (no model is built)."""
    C, V, L, E, k = config.n_embd, config.vocab_size, config.n_layer, config.moe_num_experts, config.moe_top_k
    per_block = (
        2 * C  # attention and MoE pre-norms
        + 4 * C * C  # qkv and output projections
        + C * E  # router
        + 3 * C * config.moe_num_shared_experts * config.moe_expert_hidden  # shared experts
    )
    backbone = V * C + L * per_block + C + C * V  # embedding, blocks, final norm, untied LM head
    routed = L * E * params_per_expert(config)
    routed_activated = L * k * params_per_expert(config)
    tables = tables_activated = engram_dense = 0
    if plan is not None:
        tables = sum(plan.total_slots(layer) for layer in plan.layer_ids) * plan.embed_dim_per_head
        tables_activated = len(plan.layer_ids) * plan.total_heads * plan.embed_dim_per_head
        engram_dense = engram_dense_params(config, plan)
    dense = backbone + engram_dense
    return {
        "total": dense + tables + routed,
        "activated": dense + routed_activated + tables_activated,
        "engram_tables": tables,
        "engram_tables_activated": tables_activated,
        "engram_dense": engram_dense,
        "experts_routed": routed,
        "experts_routed_activated": routed_activated,
        "dense": dense,
    }


def allocate(base: ModelConfig, plan: TablePlan | None, allocation: float) -> Allocation:
    """Model config and table plan for allocation ratio ``allocation`` (rho) of the base's sparse budget.

    ``base`` is the pure-MoE model (rho = 1); its ``moe_num_experts`` defines the budget. ``plan``
    is the template for the tables: layers, orders, heads, seed, pad ids, vocabulary sizes and
    embedding widths are kept, only the target sizes are replaced. Raises ConfigError for rho
    outside [0, 1], or when the freed parameters buy fewer than MIN_SLOTS_PER_HEAD slots per head.
    """
    rho = float(allocation)
    if not 0.0 <= rho <= 1.0:  # also rejects NaN
        raise ConfigError(
            f"allocation ratio must be in [0, 1], got {allocation}",
            "1 = pure MoE, 0 = all sparse parameters to Engram",
        )
    base.validate(plan)
    E, k, L = base.moe_num_experts, base.moe_top_k, base.n_layer
    ppe = params_per_expert(base)
    sparse_budget = L * (E - k) * ppe
    n_routed = k + math.floor(rho * (E - k) + 0.5)  # round half up (Python's round() is half-to-even)
    config = replace(base, moe_num_experts=n_routed)
    if rho == 1.0:
        return Allocation(rho, config, None, predict_param_counts(config, None), sparse_budget, None)
    if plan is None:
        raise ConfigError(
            f"allocation {rho} < 1 moves parameters into Engram tables but no table plan was given",
            "pass a plan (make_plan) as the template of the tables",
        )

    freed = L * (E - n_routed) * (ppe + base.n_embd) - engram_dense_params(config, plan)
    per_head = len(plan.layer_ids) * plan.total_heads * plan.embed_dim_per_head
    target = math.floor(freed / per_head) if freed > 0 else 0
    if target < MIN_SLOTS_PER_HEAD:
        raise ConfigError(
            f"allocation {rho} frees {max(freed, 0)} parameters: {target} slots per Engram head "
            f"(< {MIN_SLOTS_PER_HEAD}) for {E - n_routed} of {E - k} inactive experts",
            "lower the allocation ratio, or use fewer Engram layers/heads or narrower heads",
        )
    new_plan = make_plan(
        **vocab_fields(plan),
        layer_ids=plan.layer_ids,
        max_ngram_size=plan.max_ngram_size,
        n_head_per_ngram=plan.n_head_per_ngram,
        target_sizes=(target,) * plan.n_orders,
        seed=plan.seed,
        embed_dim_per_head=plan.embed_dim_per_head,
    )
    return Allocation(rho, config, new_plan, predict_param_counts(config, new_plan), sparse_budget, target)


# ---------------------------------------------------------------------------------------------
# memory a training run needs (checked before anything is allocated)

#: bytes per parameter while training in float32 with Adam: weight, gradient, two moments
BYTES_PER_DENSE_PARAM = 16
#: Engram table values: weight and SparseAdam's two full-size moments (the gradient is sparse)
BYTES_PER_TABLE_VALUE = 12


def activation_bytes_per_token(config: ModelConfig, plan: TablePlan | None) -> int:
    """float32 activations one token keeps for the backward pass, summed over the layers (an
    upper-bound estimate: every intermediate of attention, the MoE and Engram, and the logits)."""
    C, T, hidden = config.n_embd, config.block_size, config.moe_expert_hidden
    experts = config.moe_top_k + config.moe_num_shared_experts
    per_layer = 16 * C + config.n_head * T + config.moe_num_experts + experts * 3 * hidden
    engram = 0
    if plan is not None:
        d_mem = plan.total_heads * plan.embed_dim_per_head
        engram = len(plan.layer_ids) * (2 * d_mem + 8 * config.engram_hc_mult * C)
    logits = 3 * config.vocab_size  # logits, softmax, their gradient
    return 4 * (config.n_layer * per_layer + engram + logits)


def estimate_train_memory(config: ModelConfig, plan: TablePlan | None, batch_size: int,
                          world_size: int = 1) -> dict[str, int]:
    """Bytes one training process needs, by part: ``weights_and_optimizer`` (dense and expert
    parameters with their gradients and Adam moments), ``tables`` (Engram tables with SparseAdam's
    moments) and ``activations`` (this process's share of the batch); ``total`` adds them up."""
    counts = predict_param_counts(config, plan)
    tokens = -(-batch_size // world_size) * config.block_size
    parts = {"weights_and_optimizer": (counts["total"] - counts["engram_tables"]) * BYTES_PER_DENSE_PARAM,
             "tables": counts["engram_tables"] * BYTES_PER_TABLE_VALUE,
             "activations": tokens * activation_bytes_per_token(config, plan)}
    return {**parts, "total": sum(parts.values())}


def available_memory(device: str = "cpu") -> int | None:
    """Bytes a process can still allocate on ``device``: MemAvailable of /proc/meminfo on a CPU,
    free device memory on CUDA; None when unknown."""
    if device.startswith("cuda"):

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_train_memory(config: ModelConfig, plan: TablePlan | None, batch_size: int, world_size: int = 1,
                       device: str = "cpu") -> dict[str, int]:
    """Refuse (ConfigError, with the estimate) a run that cannot fit in the memory available."""
    need = estimate_train_memory(config, plan, batch_size, world_size)
    have = available_memory(device)
    if have is not None and need["total"] > have:
        gib = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
        raise ConfigError(
            f"this run needs about {gib(need['total'])} of memory (weights and optimizer "
            f"{gib(need['weights_and_optimizer'])}, Engram tables {gib(need['tables'])}, activations of "
            f"{batch_size} sequences {gib(need['activations'])}) but {device} has {gib(have)} available",
            "lower train.batch_size, the model sizes or the table sizes")
    return need
