"""A small decoder-only MoE Transformer with Engram conditional memory.

Follows "Conditional Memory via Scalable Lookup: A New Axis of Sparsity for Large Language Models"
(Cheng et al., DeepSeek-AI & Peking University, arXiv 2601.07372). The backbone is a pre-norm
Transformer (RMSNorm, causal self-attention with RoPE) whose feed-forward layers are
DeepSeekMoE-style mixtures of SwiGLU experts (routed experts + always-active shared experts).
At the blocks named in the table plan (``plan.layer_ids``, 0-based block indices) an Engram module
runs *before* the block's attention (paper Section 2):

1. Retrieval: the canonical token ids are hashed into per-(order, head) slots by
   :func:`engram_cli.tables.hashing.hash_ngrams` (the one hashing function of this project, see
   docs/hashing.md); each slot indexes an embedding table of prime size, and all heads of all
   N-gram orders are concatenated into the memory vector ``e_t``.
2. Context-aware gating: ``k_t = W_K e_t``, ``v_t = W_V e_t``,
   ``s_t = RMSNorm(h_t) . RMSNorm(k_t) / sqrt(d)``, ``alpha_t = sigmoid(sign(s_t) sqrt|s_t|)``,
   gated value ``v~_t = alpha_t v_t``.
3. A depthwise causal convolution: ``Y = V~ + SiLU(Conv1D(RMSNorm(V~)))`` (kernel 4, dilation =
   the largest N-gram order), added to the residual stream.

Everything is in dependency order: norm -> RoPE -> attention -> Engram -> block -> model ->
parameter accounting; the configuration is ``engram_cli.model.config``, the MoE (dense FFN, router,
experts, load-balancing loss and the plain-loop reference) ``engram_cli.model.moe``. Shapes are written beside the code: B batch, T time, C model width,
hc hyper-connection branches, H Engram heads (all orders), D per-head memory width, E experts,
k experts per token, N = B*T tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_cli.core.errors import InputError
from engram_cli.model.config import ModelConfig
from engram_cli.model.moe import Experts, MoE
from engram_cli.tables.hashing import hash_ngrams
from engram_cli.tables.plan import TablePlan

# ----------------------------------------------------------------------------------------------
# Normalization and rotary position embedding


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned gain.

    ``shape`` is the gain's shape: ``(C,)`` for the usual norm, ``(hc, C)`` for one independent
    norm per hyper-connection branch (the same as ``hc`` separate ``RMSNorm(C)`` modules, applied
    to a (..., hc, C) tensor in one call). ``eps=None`` takes the epsilon of the input's dtype,
    as PyTorch's ``nn.RMSNorm(eps=None)`` does (float32: 1.19e-7).
    """

    def __init__(self, *shape: int, eps: float | None = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(*shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 so that bf16 activations do not lose the small mean-square
        xf = x.float()
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        return xf.to(x.dtype) * self.weight


def rope_cache(head_dim: int, block_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (block_size, head_dim/2) for rotary embeddings (Su et al., RoFormer)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hd) by position; the two halves of the head dim form the 2-D pairs."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, nh, T, hd/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, hd/2), broadcast over B and nh
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# ----------------------------------------------------------------------------------------------
# Attention


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on queries and keys."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


# ----------------------------------------------------------------------------------------------
# Engram (paper Section 2)


class MultiHeadEmbedding(nn.Module):
    r"""All H hash heads' tables of one Engram layer, as one table of sum(p_j) rows.

    Rows ``[offset_j, offset_j + p_j)`` are head j's table of prime size p_j (heads in the plan's
    order: every head of order 2, then order 3, ...). The rows live in one of two places:

    * a parameter (``store_backed=False``; runs recorded before the row store, ``table_store =
      "module"``): one ``nn.Embedding(..., sparse=True)``, so that a step's gradient holds only
      the looked-up rows (SparseAdam updates it);
    * a row store (``store_backed=True``; ``engram_cli.model.store``, in RAM or memory-mapped):
      no parameter here. In training, the trainer :meth:`bind`\ s a step's *working set* — the
      sorted unique rows the batch addresses, gathered into one (k, D) tensor that requires grad,
      and every (position, head)'s index into it — and the lookup is ``rows[local]``; its
      gradient is dense over the working set and goes back to the store through a row
      optimizer. For reading (eval, inspect-gates) a store is :meth:`attach`\ ed and each lookup
      gathers the rows its slots address (no gradient).
    """

    def __init__(self, head_sizes: list[int], head_offsets: list[int], dim: int, store_backed: bool = False):
        super().__init__()
        self.register_buffer("offsets", torch.tensor(head_offsets, dtype=torch.long), persistent=False)
        self.rows, self.dim = sum(head_sizes), dim
        self.embedding = None if store_backed else nn.Embedding(self.rows, dim, sparse=True)
        self.store = None      # RowStore to read from (store-backed, reading); see attach
        self.working = None    # (rows (k, D), local (B, T, H)) of the current step; see bind
        self.read_transform = None  # applied to rows read from the store (e.g. quant.quantized_tables)

    @property
    def store_backed(self) -> bool:
        return self.embedding is None

    def attach(self, store) -> None:
        """Read rows from ``store`` (a RowStore of this table's rows and dim) when no working set is bound."""
        if store.rows != self.rows or store.dim != self.dim:
            raise InputError(f"the row store holds {store.rows} x {store.dim} rows, this table {self.rows} x {self.dim}",
                             "open the store of this run's plan")
        self.store = store

    def bind(self, rows: torch.Tensor, local: torch.Tensor) -> None:
        """Use ``rows[local]`` for the next lookups: rows (k, D), local (B, T, H) indices into them."""
        self.working = (rows, local)

    def unbind(self) -> None:
        self.working = None

    def forward(self, slots: torch.Tensor | None) -> torch.Tensor:
        """slots: (B, T, H), head j's slot in [0, p_j) -> (B, T, H, D). With a bound working set
        the slots are not needed (None): its local indices address the same rows."""
        if self.working is not None:
            rows, local = self.working
            return rows[local]  # (B, T, H, D)
        if self.embedding is not None:
            return self.embedding(slots + self.offsets)
        if self.store is None:
            raise InputError("this Engram table lives in a row store and none is attached",
                             "open the run with engram_cli.train.runs.load_run (it attaches the run's store)")
        flat = (slots + self.offsets).cpu().numpy()
        uniq, local = np.unique(flat.reshape(-1), return_inverse=True)
        rows = torch.from_numpy(self.store.gather(uniq.astype(np.int64)))  # (k, D)
        if self.read_transform is not None:
            rows = self.read_transform(rows)
        return rows[torch.from_numpy(local.reshape(flat.shape))].to(slots.device)


class ShortConv(nn.Module):
    """``SiLU(Conv1D(RMSNorm(x)))``: depthwise causal convolution over time, one channel per
    (branch, feature), with one RMSNorm per hyper-connection branch.

    Causal: the input is padded on the left only, so output t sees inputs t, t-dil, t-2*dil, ...
    The dilation is the largest N-gram order, so the kernel reaches past the longest N-gram.
    """

    def __init__(self, n_embd: int, hc_mult: int, kernel_size: int, dilation: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(hc_mult, n_embd, eps=eps)
        channels = hc_mult * n_embd
        self.left_pad = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, G, C = x.shape  # (B, T, hc, C)
        xc = self.norm(x).reshape(B, T, G * C).transpose(1, 2)  # (B, hc*C, T)
        yc = self.conv(F.pad(xc, (self.left_pad, 0)))  # (B, hc*C, T)
        return F.silu(yc).transpose(1, 2).reshape(B, T, G, C)


class Engram(nn.Module):
    """Engram conditional memory at one block: hashed N-gram lookup, context-aware gate, short conv.

    With hyper-connections (hc > 1) the residual stream has hc branches; each branch gets its own
    key projection and its own pair of norms (so its own gate), while the tables and W_V are shared
    (as in the reference implementation); the conv has its own channels and norm per branch.
    As in the reference implementation (``engram_reference_module``, the default), W_K and W_V
    carry a bias (PyTorch's ``nn.Linear`` default) and the two gate norms use the epsilon of the
    hidden states' dtype (``nn.RMSNorm(eps=None)``); ``engram_reference_module = False`` gives
    the paper's bias-free ``k_t = W_K e_t`` and the backbone's ``norm_eps`` (docs/model.md has
    the measured difference). The short conv starts at zero by default (``engram_conv_init``), so
    a fresh module adds only its gated value ``alpha_t * v_t`` to the residual stream.

    ``knocked_out`` (False; set through :meth:`EngramModel.engram_knockout`) makes the module add
    nothing: the paper's Section 6 ablation of the memory at inference. The gate is still computed
    and returned. It is a plain attribute, not state: checkpoints never record it.
    """

    def __init__(self, config: ModelConfig, plan: TablePlan, layer_id: int, store_backed: bool = False):
        super().__init__()
        self.layer_id = layer_id
        self.knocked_out = False  # True: forward returns y = 0 (see EngramModel.engram_knockout)
        self.hc_mult = config.engram_hc_mult
        self.n_embd = config.n_embd
        self.tables = MultiHeadEmbedding(
            plan.head_sizes(layer_id), plan.head_offsets(layer_id), plan.embed_dim_per_head, store_backed
        )
        d_mem = plan.total_heads * plan.embed_dim_per_head  # = (max_n - 1) * n_head_per_ngram * D
        bias = config.engram_reference_module  # the reference's nn.Linear layers carry a bias
        self.key_proj = nn.Linear(d_mem, self.hc_mult * config.n_embd, bias=bias)  # hc stacked W_K
        self.value_proj = nn.Linear(d_mem, config.n_embd, bias=bias)  # W_V, shared by the branches
        gate_eps = None if config.engram_reference_module else config.norm_eps  # None: dtype's eps
        self.query_norm = RMSNorm(self.hc_mult, config.n_embd, eps=gate_eps)  # on h_t
        self.key_norm = RMSNorm(self.hc_mult, config.n_embd, eps=gate_eps)  # on k_t
        self.short_conv = ShortConv(
            config.n_embd, self.hc_mult, config.engram_conv_kernel, plan.max_ngram_size, config.norm_eps
        )

    def forward(self, h: torch.Tensor, slots: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (B, T, hc, C) residual stream; slots: (B, T, H) hash slots of this layer (None when
        a working set is bound to the tables).

        Returns (y (B, T, hc, C) to add to the residual stream, gate alpha (B, T, hc)).
        """
        B, T, G, C = h.shape
        e = self.tables(slots).flatten(start_dim=-2).to(h.dtype)  # (B, T, H*D) memory vector e_t
        k = self.key_proj(e).view(B, T, G, C)  # (B, T, hc, C)
        v = self.value_proj(e)  # (B, T, C)
        s = (self.query_norm(h) * self.key_norm(k)).sum(dim=-1) / math.sqrt(C)  # (B, T, hc)
        # signed square root (reference implementation): compresses large logits so the sigmoid
        # does not saturate; the clamp keeps the derivative of sqrt finite at s = 0
        s = torch.sign(s) * s.abs().clamp_min(1e-6).sqrt()
        gate = torch.sigmoid(s)  # (B, T, hc) alpha_t
        v_gated = gate.unsqueeze(-1) * v.unsqueeze(2)  # (B, T, hc, C)
        if self.knocked_out:  # the memory switched off: the residual stream gets nothing from it
            return torch.zeros_like(v_gated), gate
        return v_gated + self.short_conv(v_gated), gate


# ----------------------------------------------------------------------------------------------
# Block


class Block(nn.Module):
    """[Engram] -> attention -> MoE, each added to the residual stream (pre-norm).

    Hyper-connections (simplified; mHC proper learns mixing matrices between branches): the
    stream is (B, T, hc, C); Engram writes a different gated value into each branch; attention and
    the MoE read the mean of the branches and add their output to every branch. With hc = 1 this is
    the ordinary pre-norm Transformer block.
    """

    def __init__(self, config: ModelConfig, layer_id: int, plan: TablePlan | None, store_backed: bool = False):
        super().__init__()
        has_engram = plan is not None and layer_id in plan.layer_ids
        self.engram = Engram(config, plan, layer_id, store_backed) if has_engram else None
        self.attn_norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.moe_norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.moe = MoE(config)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """h: (B, T, hc, C) -> (h, load-balancing loss, Engram gate (B, T, hc) or None)."""
        gate = None
        if self.engram is not None:
            y, gate = self.engram(h, slots)
            h = h + y
        h = h + self.attn(self.attn_norm(h.mean(dim=2)), cos, sin).unsqueeze(2)
        m, aux = self.moe(self.moe_norm(h.mean(dim=2)))
        h = h + m.unsqueeze(2)
        return h, aux, gate


# ----------------------------------------------------------------------------------------------
# Model


@dataclass
class ModelOutput:
    """What :meth:`EngramModel.forward` returns."""

    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # lm_loss + moe_aux_loss_weight * aux_loss; None without targets
    lm_loss: torch.Tensor | None  # next-token cross entropy (targets == -1 ignored); None without targets
    aux_loss: torch.Tensor  # load-balancing loss, mean over the MoE layers (scalar)
    gates: dict[int, torch.Tensor] | None  # layer id -> Engram gate alpha (B, T, hc); None unless asked


class EngramModel(nn.Module):
    """Token embedding -> blocks (Engram at ``plan.layer_ids``) -> RMSNorm -> LM head.

    ``plan=None`` gives the pure MoE baseline. The LM head is untied from the token embedding
    (DeepSeek-V3 unties them; it also keeps the parameter accounting per module simple).
    ``store_backed``: the Engram tables live in row stores outside the module (see
    :class:`MultiHeadEmbedding`); the model then has no table parameters, and the trainer binds
    each step's working set (:meth:`bind_working_set`) or a reader attaches the stores
    (:meth:`attach_stores`).
    """

    def __init__(self, config: ModelConfig, plan: TablePlan | None = None, store_backed: bool = False):
        super().__init__()
        config.validate(plan)
        self.config = config
        self.plan = plan
        self.store_backed = store_backed
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i, plan, store_backed) for i in range(config.n_layer)])
        self.final_norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rope_cache(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 style normal(0, 0.02) for every matrix, zero biases; norms start at 1 (their
        # constructor). The Engram conv starts at zero (the paper) unless engram_conv_init is
        # "default" (PyTorch's init; the reference demo never trains, so it sets no init).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, ShortConv) and self.config.engram_conv_init == "zero":
            nn.init.zeros_(module.conv.weight)
        elif isinstance(module, Experts):
            for w in (module.w_gate, module.w_up, module.w_down):
                nn.init.normal_(w, mean=0.0, std=self.config.init_std)

    @property
    def engram_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.blocks) if b.engram is not None)

    @contextmanager
    def engram_knockout(self) -> Iterator[EngramModel]:
        """Inside this context every Engram module adds nothing to the residual stream.

        The inference-time ablation of the paper's Section 6 (the memory removed from a model
        trained with it): the backbone runs exactly as before, each Engram block's output is
        zero. Gates are still returned with ``return_gates``. The previous setting of every
        module is restored on exit, also after an exception; outside the context nothing changes.

        >>> with model.engram_knockout():            # doctest: +SKIP
        ...     out = model(idx, canonical_ids, targets)
        """
        engrams = [b.engram for b in self.blocks if b.engram is not None]
        before = [e.knocked_out for e in engrams]
        for e in engrams:
            e.knocked_out = True
        try:
            yield self
        finally:
            for e, was in zip(engrams, before):
                e.knocked_out = was

    def engram_table_parameters(self) -> list[nn.Parameter]:
        """The Engram embedding tables (sparse gradients: optimize with torch.optim.SparseAdam);
        none when the tables live in row stores."""
        return [b.engram.tables.embedding.weight for b in self.blocks
                if b.engram is not None and not b.engram.tables.store_backed]

    def engram_tables(self) -> dict[int, MultiHeadEmbedding]:
        """layer id -> that layer's tables."""
        return {i: b.engram.tables for i, b in enumerate(self.blocks) if b.engram is not None}

    def attach_stores(self, stores: dict) -> None:
        """Read every layer's rows from its row store (layer id -> RowStore); store-backed models only."""
        for layer, tables in self.engram_tables().items():
            tables.attach(stores[layer])

    def bind_working_set(self, working: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Bind each layer's (rows (k, D), local (B, T, H)) for the next forward passes."""
        for layer, tables in self.engram_tables().items():
            tables.bind(*working[layer])

    def unbind_working_set(self) -> None:
        for tables in self.engram_tables().values():
            tables.unbind()

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (dense gradients: AdamW)."""
        tables = {id(p) for p in self.engram_table_parameters()}
        return [p for p in self.parameters() if id(p) not in tables]

    def engram_slots(self, canonical_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Hash slots per Engram layer: layer id -> (B, T, H) long tensor, by ``hash_ngrams``."""
        device = canonical_ids.device if isinstance(canonical_ids, torch.Tensor) else torch.device("cpu")
        out = {}
        for layer in self.engram_layer_ids:
            slots = hash_ngrams(canonical_ids, self.plan, layer)  # (B, T, H), numpy or torch
            out[layer] = torch.as_tensor(slots, dtype=torch.long).to(device)
        return out

    def forward(
        self,
        idx: torch.Tensor,
        canonical_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        return_gates: bool = False,
    ) -> ModelOutput:
        """idx: (B, T) model-vocabulary ids; canonical_ids: (B, T) canonical ids for hashing
        (required iff the model has Engram layers, ignored otherwise); targets: (B, T) next-token
        ids, -1 = ignore. ``return_gates`` returns the gates of this very forward pass.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise InputError(
                f"sequence length {T} exceeds block_size {self.config.block_size}",
                "use shorter sequences or a larger block_size",
            )
        slots: dict[int, torch.Tensor] = {}
        if self.engram_layer_ids:
            if canonical_ids is None:
                raise InputError(
                    "this model has Engram layers and needs canonical_ids", "pass canonical_ids=..."
                )
            if tuple(canonical_ids.shape) != (B, T):
                raise InputError(
                    f"canonical_ids has shape {tuple(canonical_ids.shape)}, idx has {(B, T)}",
                    "pass canonical ids aligned with idx",
                )
            bound = all(t.working is not None for t in self.engram_tables().values())
            slots = {} if bound else self.engram_slots(canonical_ids)  # a bound working set holds its rows

        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        h = x.unsqueeze(2).expand(B, T, self.config.engram_hc_mult, self.config.n_embd)  # (B, T, hc, C)
        aux_losses, gates = [], {}
        for i, block in enumerate(self.blocks):
            h, aux, gate = block(h, cos, sin, slots.get(i))
            aux_losses.append(aux)
            if gate is not None:
                gates[i] = gate
        logits = self.lm_head(self.final_norm(h.mean(dim=2)))  # (B, T, V); the head reads the branch mean
        aux_loss = torch.stack(aux_losses).mean()

        loss = lm_loss = None
        if targets is not None:
            flat_logits = logits.view(-1, logits.size(-1)).float()  # (B*T, V)
            lm_loss = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=-1)
            loss = lm_loss + self.config.moe_aux_loss_weight * aux_loss
        return ModelOutput(logits, loss, lm_loss, aux_loss, gates if return_gates else None)


# ----------------------------------------------------------------------------------------------
# Parameter accounting


def param_counts(model: EngramModel) -> dict[str, int]:
    """Total and per-token activated parameter counts.

    - ``engram_tables``: the Engram embedding tables; ``engram_tables_activated``: the rows one
      token looks up, H heads x D per Engram layer.
    - ``engram_dense``: the rest of the Engram modules (W_K, W_V, norms, conv).
    - ``experts_routed``: all routed experts; ``experts_routed_activated``: the k of E a token uses.
    - ``dense``: everything else (embedding, attention, routers, shared experts, norms, Engram dense,
      LM head), all counted as activated (the token embedding too, by convention).
    - ``total = dense + engram_tables + experts_routed``;
      ``activated = dense + experts_routed_activated + engram_tables_activated``.
    """
    store_rows = sum(t.rows * t.dim for t in model.engram_tables().values() if t.store_backed)
    total = sum(p.numel() for p in model.parameters()) + store_rows  # store-backed rows count as parameters
    tables = sum(p.numel() for p in model.engram_table_parameters()) + store_rows
    engram_all = sum(p.numel() for b in model.blocks if b.engram is not None for p in b.engram.parameters())
    routed = sum(p.numel() for b in model.blocks for p in b.moe.experts.parameters())
    cfg = model.config
    routed_activated = routed // cfg.moe_num_experts * cfg.moe_top_k
    plan = model.plan
    tables_activated = 0
    if plan is not None:
        tables_activated = len(model.engram_layer_ids) * plan.total_heads * plan.embed_dim_per_head
    dense = total - tables - routed
    return {
        "total": total,
        "activated": dense + routed_activated + tables_activated,
        "engram_tables": tables,
        "engram_tables_activated": tables_activated,
        "engram_dense": engram_all - tables,
        "experts_routed": routed,
        "experts_routed_activated": routed_activated,
        "dense": dense,
    }
