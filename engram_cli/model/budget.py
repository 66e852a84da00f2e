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
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engram_cli.core.errors import ConfigError
from engram_cli.model.config import ModelConfig
from engram_cli.model.store import page_rows
from engram_cli.tables.plan import TablePlan, make_plan, vocab_fields
from engram_cli.tables.sizing import mmap_advised, ram_available, table_train_bytes

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


#: where the Engram tables live in training (``train.table_store``): ``module`` an ``nn.Embedding``
#: with SparseAdam (the runs before the row store), ``memory`` a row store in RAM, ``mmap`` a row
#: store in memory-mapped sparse files (engram_cli.model.store)
TABLE_STORES = ("module", "memory", "mmap")


def table_store_bytes(plan: TablePlan | None, table_store: str = "module", table_optimizer: str = "adam",
                      tokens: int = 0, steps: int | None = None, block_rows: int | None = None) -> dict[str, int]:
    """What the Engram tables take in training, by where they live: ``ram`` (bytes this process
    holds), ``disk`` (the full size of the store's sparse files; 0 in RAM) and ``disk_expected``
    (``mmap``: the disk the first ``steps`` steps are expected to materialize under uniform
    hashing; the full size when ``steps`` is None).

    ``module`` / ``memory``: every row and its optimizer state in RAM (Adam 3 x D x 4 bytes a row,
    row-wise Adagrad D x 4 + 4). ``mmap``: only a step's working set — at most ``tokens`` x heads
    rows per layer, their values and state twice (the step's and the prefetched next step's) and
    their gradient; the rest is page cache, which the kernel reclaims. A block of ``block_rows``
    rows (default: a page of rows, as a run's stores use) is materialized (initialized and given disk) on its first touch: a run of ``steps``
    steps of ``tokens`` x heads lookups per layer touches ``1 - exp(-lookups / blocks)`` of a
    layer's blocks.
    """
    if table_store not in TABLE_STORES:
        raise ConfigError(f"unknown table store {table_store!r}", f"use one of: {', '.join(TABLE_STORES)}")
    if plan is None:
        return {"ram": 0, "disk": 0, "disk_expected": 0}
    full = table_train_bytes(plan, table_optimizer)
    if table_store != "mmap":
        return {"ram": full["total"], "disk": 0, "disk_expected": 0}
    per_row = full["total"] // plan.total_slots_all               # values + state, bytes
    block_rows = block_rows or page_rows(plan.embed_dim_per_head)
    dim_bytes = 4 * plan.embed_dim_per_head
    ram = disk_expected = 0
    for layer in plan.layer_ids:
        rows = plan.total_slots(layer)
        lookups = tokens * plan.total_heads
        k = min(rows, lookups)                                       # the working set's rows
        ram += k * (2 * per_row + dim_bytes)
        if steps is None:
            disk_expected += rows * per_row
        else:
            blocks = -(-rows // block_rows)
            touched = -math.expm1(-steps * lookups / blocks) if blocks else 0.0
            disk_expected += min(rows, math.ceil(touched * blocks) * block_rows) * per_row
    return {"ram": ram, "disk": full["total"], "disk_expected": disk_expected}


def estimate_train_memory(config: ModelConfig, plan: TablePlan | None, batch_size: int,
                          world_size: int = 1, *, table_store: str = "module",
                          table_optimizer: str = "adam") -> dict[str, int]:
    """Bytes one training process needs, by part: ``weights_and_optimizer`` (dense and expert
    parameters with their gradients and Adam moments), ``tables`` (the Engram tables' share of
    RAM in ``table_store`` with ``table_optimizer``'s row state: :func:`table_store_bytes`) and
    ``activations`` (this process's share of the batch); ``total`` adds them up."""
    counts = predict_param_counts(config, plan)
    tokens = -(-batch_size // world_size) * config.block_size
    tables = table_store_bytes(plan, table_store, table_optimizer, tokens)["ram"]
    parts = {"weights_and_optimizer": (counts["total"] - counts["engram_tables"]) * BYTES_PER_DENSE_PARAM,
             "tables": tables,
             "activations": tokens * activation_bytes_per_token(config, plan)}
    return {**parts, "total": sum(parts.values())}


def available_memory(device: str = "cpu") -> int | None:
    """Bytes a process can still allocate on ``device``: MemAvailable of /proc/meminfo on a CPU,
    free device memory on CUDA; None when unknown."""
    if device.startswith("cuda"):

        return int(torch.cuda.mem_get_info()[0])
    return ram_available()


def free_disk(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_train_memory(config: ModelConfig, plan: TablePlan | None, batch_size: int, world_size: int = 1,
                       device: str = "cpu", *, table_store: str = "module", table_optimizer: str = "adam",
                       store_dir: str | os.PathLike | None = None, steps: int | None = None,
                       warnings: list[str] | None = None) -> dict[str, int]:
    """Refuse (ConfigError, with the estimate) a run that cannot fit in the memory available.

    ``table_store`` / ``table_optimizer`` (``train.table_store`` / ``train.table_optimizer``; the
    defaults are the ``nn.Embedding`` + SparseAdam path) say what the tables hold in RAM
    (:func:`table_store_bytes`). With the tables in RAM (``module``, ``memory``) a run whose tables
    do not fit is refused with the hint that ``--table-store mmap`` keeps them on disk. With
    ``mmap`` only the working set counts against RAM, and the disk under ``store_dir`` is checked:
    what the run's ``steps`` steps are expected to materialize (uniform hashing) above the free
    space is refused; the store's full size (rows + state) above it is only a warning appended
    to ``warnings`` (sparse files grow with the rows touched) — should the disk fill anyway, the
    run stops with one line, its last checkpoint intact. Returns the estimate (:func:`estimate_train_memory`, plus ``table_disk``
    and ``table_disk_expected``).
    """
    need = estimate_train_memory(config, plan, batch_size, world_size, table_store=table_store,
                                 table_optimizer=table_optimizer)
    tokens = -(-batch_size // world_size) * config.block_size
    store = table_store_bytes(plan, table_store, table_optimizer, tokens, steps)
    have = available_memory(device)
    gib = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
    if have is not None and need["total"] > have:
        hint = "lower train.batch_size, the model sizes or the table sizes"
        if plan is not None and table_store != "mmap" and device == "cpu":
            hint += "; or keep the tables on disk: --table-store mmap"
        raise ConfigError(
            f"this run needs about {gib(need['total'])} of memory (weights and optimizer "
            f"{gib(need['weights_and_optimizer'])}, Engram tables {gib(need['tables'])} "
            f"({table_store} store, {table_optimizer}), activations of "
            f"{batch_size} sequences {gib(need['activations'])}) but {device} has {gib(have)} available", hint)
    if table_store == "mmap" and store_dir is not None:
        free = free_disk(store_dir)
        if free is not None and steps is not None and store["disk_expected"] > free:
            raise ConfigError(
                f"the Engram tables' row store is expected to take about {gib(store['disk_expected'])} on disk "
                f"in {steps:,} steps (of {gib(store['disk'])} in full: rows and {table_optimizer} state, "
                f"materialized by blocks of {page_rows(plan.embed_dim_per_head)} rows as they are touched) but {store_dir} has "
                f"{gib(free)} free", "free disk space, put the run on a larger disk, train fewer steps, "
                "or use smaller tables (or --set train.table_optimizer=rowwise-adagrad: 4 bytes of state a row)")
        if free is not None and store["disk"] > free and warnings is not None:
            expect = (f"; the first {steps:,} steps are expected to use about {gib(store['disk_expected'])}"
                      if steps is not None else "")
            warnings.append(
                f"the Engram tables' row store takes up to {gib(store['disk'])} on disk (rows and "
                f"{table_optimizer} state) but {store_dir} has {gib(free)} free: its sparse files grow with the "
                f"rows touched{expect}; a full disk stops the run with its last checkpoint intact")
    elif plan is not None and table_store != "mmap" and warnings is not None and device == "cpu" \
            and mmap_advised(store["ram"], have):
        warnings.append(f"the Engram tables take {gib(store['ram'])} of RAM in training ({table_optimizer} "
                        f"state included), more than half of the {gib(have)} available: --table-store mmap "
                        "keeps them on disk")
    return {**need, "table_disk": store["disk"], "table_disk_expected": store["disk_expected"]}
