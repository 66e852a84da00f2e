"""The model's configuration: :class:`ModelConfig`, every field with its meaning and where its
default comes from, and its checks against a table plan. The model (``engram_cli.model.transformer``)
and the MoE layer (``engram_cli.model.moe``) are built from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engram_cli.core.errors import ConfigError
from engram_cli.tables.plan import TablePlan

#: the behaviour of runs recorded before a ModelConfig field existed (not the defaults of new runs)
LEGACY_MODEL_DEFAULTS = {"engram_conv_init": "default", "engram_reference_module": False}


@dataclass
class ModelConfig:
    """Backbone and module sizes. Defaults are a tiny model that trains on a CPU in minutes."""

    # size of the model's vocabulary (``idx`` ids); the trainer sets it to its compact
    # sub-vocabulary of the corpus. 1024 is a placeholder for tests.
    vocab_size: int = 1024
    # number of Transformer blocks; Engram block indices in the plan must be < n_layer. Tiny.
    n_layer: int = 4
    # attention heads; n_embd must be divisible by it and the head dim even (RoPE). Tiny.
    n_head: int = 4
    # model width C (residual stream per hyper-connection branch). Tiny.
    n_embd: int = 128
    # longest sequence; sizes the RoPE tables. Tiny.
    block_size: int = 256
    # RoPE base frequency (RoFormer / LLaMA default 10000).
    rope_theta: float = 10000.0
    # routed experts E per MoE layer; a tiny stand-in for the paper's fine-grained MoE (dozens).
    moe_num_experts: int = 8
    # routed experts chosen per token k; 2 of 8 keeps the tiny model sparse (3/4 inactive).
    moe_top_k: int = 2
    # always-active shared experts per MoE layer (DeepSeekMoE shared-expert isolation); tiny: 1.
    moe_num_shared_experts: int = 1
    # hidden width of one SwiGLU expert (routed and shared); n_embd here (fine-grained experts
    # are narrower than a dense FFN's 4*n_embd, as in DeepSeekMoE).
    moe_expert_hidden: int = 128
    # weight of the load-balancing loss in the total loss (Switch Transformers uses 1e-2).
    moe_aux_loss_weight: float = 0.01
    # renormalize the k chosen gates to sum to 1; False follows DeepSeekMoE (Mixtral/V3: True).
    moe_norm_topk_prob: bool = False
    # hyper-connection branches of the residual stream (reference demo: 4 with mHC; 1 = none).
    engram_hc_mult: int = 1
    # kernel size of Engram's depthwise causal conv (paper / reference: 4).
    engram_conv_kernel: int = 4
    # init of that conv's weights: "zero" (the paper: the module starts as an identity-preserving
    # addition of its gated value) or "default" (PyTorch's kaiming-uniform; measured to make
    # training worse by 0.3-0.5 nats on a 1M-token corpus, docs/training.md).
    engram_conv_init: str = "zero"
    # build W_K/W_V with biases and the gate norms with the dtype's epsilon, as DeepSeek's
    # reference Engram module does (True); False: no biases, norm_eps (docs/model.md).
    engram_reference_module: bool = True
    # dropout on embeddings, attention and residual outputs (0 for small-data pretraining, nanoGPT).
    dropout: float = 0.0
    # RMSNorm epsilon (1e-5 as in LLaMA).
    norm_eps: float = 1e-5
    # std of the normal init of linear, embedding and expert weights (GPT-2: 0.02).
    init_std: float = 0.02

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A configuration a run recorded; fields it predates take the values engram used before
        they existed (``LEGACY_MODEL_DEFAULTS``), so older runs load and resume as they trained."""
        return cls(**{**LEGACY_MODEL_DEFAULTS, **d})

    def validate(self, plan: TablePlan | None = None) -> None:
        """Raise :class:`ConfigError` (one line + hint) for an impossible configuration."""
        positive = ["vocab_size", "n_layer", "n_head", "n_embd", "block_size", "moe_num_experts", "moe_top_k",
                    "moe_expert_hidden", "engram_conv_kernel"]  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name} must be >= 1, got {getattr(self, name)}", f"set {name} to a positive integer"
                )
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})",
                "choose n_head dividing n_embd",
            )
        if (self.n_embd // self.n_head) % 2:
            raise ConfigError(
                f"head dim n_embd/n_head = {self.n_embd // self.n_head} is odd; RoPE rotates pairs",
                "choose n_embd/n_head even",
            )
        if self.moe_top_k > self.moe_num_experts:
            raise ConfigError(
                f"moe_top_k ({self.moe_top_k}) is larger than moe_num_experts ({self.moe_num_experts})",
                "lower moe_top_k or raise moe_num_experts",
            )
        if self.moe_num_shared_experts < 0:
            raise ConfigError(
                f"moe_num_shared_experts must be >= 0, got {self.moe_num_shared_experts}", "use 0 for none"
            )
        if self.moe_aux_loss_weight < 0:
            raise ConfigError(
                f"moe_aux_loss_weight must be >= 0, got {self.moe_aux_loss_weight}", "use 0 to disable it"
            )
        if self.engram_hc_mult < 1:
            raise ConfigError(
                f"engram_hc_mult must be >= 1, got {self.engram_hc_mult}", "use 1 for no hyper-connections"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", "use 0.0 to disable dropout")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive finite number, got {value}",
                                  f"see the defaults of ModelConfig for {name}")
        if not math.isfinite(self.moe_aux_loss_weight):
            raise ConfigError(f"moe_aux_loss_weight must be finite, got {self.moe_aux_loss_weight}", "e.g. 0.01")
        if self.engram_conv_init not in ("zero", "default"):
            raise ConfigError(f"engram_conv_init must be zero or default, got {self.engram_conv_init!r}",
                              "use zero (the paper) or default (PyTorch's init)")
        if plan is None:
            return
        if not plan.layer_ids:
            raise ConfigError(
                "the table plan has no Engram layers", "pass plan=None for the pure MoE baseline"
            )
        bad = [i for i in plan.layer_ids if not 0 <= i < self.n_layer]
        if bad:
            raise ConfigError(
                f"Engram layer ids {bad} are outside the model's blocks 0..{self.n_layer - 1}",
                f"make the plan with layer ids below n_layer={self.n_layer} (e.g. layer_ids=(1,))",
            )
        if plan.max_ngram_size < 2 or plan.n_head_per_ngram < 1:
            raise ConfigError(
                f"the plan needs N-gram orders >= 2 and >= 1 head (max_ngram_size={plan.max_ngram_size}, "
                f"n_head_per_ngram={plan.n_head_per_ngram})",
                "make the plan with max_ngram_size >= 2 and n_head_per_ngram >= 1",
            )
        if plan.embed_dim_per_head < 1:
            raise ConfigError(
                f"embed_dim_per_head must be >= 1, got {plan.embed_dim_per_head}",
                "make the plan with a positive embed_dim_per_head",
            )
        for layer in plan.layer_ids:
            sizes = plan.head_sizes(layer)
            smallest = 1 if getattr(plan, "single_row", False) else 2  # 1: the capacity-1 control
            if len(sizes) != plan.total_heads or min(sizes) < smallest:
                raise ConfigError(
                    f"the plan's head tables of layer {layer} are malformed ({len(sizes)} heads, "
                    f"smallest {min(sizes, default=0)} slots)",
                    "rebuild the plan with make_plan",
                )
