"""DeepSeekMoE-style mixture of experts: SwiGLU experts, a top-k router, the load-balancing loss.

The MoE feed-forward layer of the model in ``engram_cli.model.transformer`` (DeepSeekMoE, arXiv 2401.06066):
routed SwiGLU experts chosen per token by a softmax router (top-k), plus always-active shared
experts. As in mistral-inference / OLMoE: the router returns (scores, top-k weights, top-k
indices), the experts are a separate module, and the load-balancing loss is a pure function of
what the router returned. The fast sort-by-expert dispatch keeps a plain loop reference beside
it (:func:`moe_reference_forward`), which the tests compare it with.
Shapes: N tokens, C model width, E experts, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_cli.model.config import ModelConfig


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate x) * up x)``.

    Used for the shared experts, and as the dense reference a one-expert MoE must reproduce.
    """

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(n_embd, hidden, bias=False)
        self.up = nn.Linear(n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Router(nn.Module):
    """Token-choice top-k router.

    Returns ``(scores, topk_weights, topk_indices)``: the softmax over all E routed experts
    (N, E) in float32, and for each token the k largest scores (N, k) with their expert ids (N, k).
    As in DeepSeekMoE (Dai et al. 2024) the gate of a chosen expert is its softmax score,
    *not* renormalized over the k chosen (``moe_norm_topk_prob`` switches renormalization on, as
    in Mixtral/DeepSeek-V3).
    """

    def __init__(self, n_embd: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(n_embd, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # float32 softmax: the load-balancing loss averages these and bf16 would bias it
        scores = F.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        weights, indices = torch.topk(scores, self.top_k, dim=-1)  # (N, k), (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return scores, weights.to(x.dtype), indices


def load_balancing_loss(scores: torch.Tensor, topk_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Auxiliary load-balancing loss ``E * sum_i f_i * P_i`` (a pure function of router outputs).

    Switch Transformers (Fedus et al. 2021, Eqs. 4-6): ``f_i`` is the fraction of routing decisions
    sent to expert i and ``P_i`` the mean router probability of expert i. For top-k routing each of
    a token's k assignments counts 1/k (the top-k form used by OLMoE and Mixtral), so f sums to 1
    and the loss equals 1 when both f and P are uniform. f is a count and carries no gradient; the
    gradient reaches the router through P.

    scores: (N, E) softmax scores; topk_indices: (N, k) chosen experts. Returns a scalar.
    """
    n_tokens, k = topk_indices.shape
    counts = torch.bincount(topk_indices.reshape(-1), minlength=num_experts)  # (E,)
    f = counts.to(scores.dtype) / (n_tokens * k)  # (E,)
    p = scores.mean(dim=0)  # (E,)
    return num_experts * torch.sum(f * p)


class Experts(nn.Module):
    """E routed SwiGLU experts with stacked weights, run on token slices grouped by expert.

    ``w_gate``/``w_up`` are (E, C, hidden) and ``w_down`` (E, hidden, C): expert e is
    ``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``, the same function as :class:`SwiGLU`
    with ``w_gate[e] = gate.weight.T`` etc.
    """

    def __init__(self, num_experts: int, n_embd: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.empty(num_experts, n_embd, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, n_embd, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, n_embd))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on (n, C) -> (n, C)."""
        return (F.silu(x @ self.w_gate[e]) * (x @ self.w_up[e])) @ self.w_down[e]

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted: (M, C) rows grouped by expert, ``counts[e]`` rows for expert e -> (M, C).

        One matmul chain per expert on its contiguous slice; the loop is over experts, never tokens.
        The stacked weights are split once (``unbind``): indexing ``w[e]`` per expert would make the
        backward pass write a full-size (E, ...) gradient per expert, E^2 work for E experts.
        """
        slices = torch.split(x_sorted, counts, dim=0)
        gates, ups, downs = self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0)
        return torch.cat([(F.silu(xs @ g) * (xs @ u)) @ d for xs, g, u, d in zip(slices, gates, ups, downs)],
                         dim=0)


class MoE(nn.Module):
    """DeepSeekMoE layer: top-k routed experts plus always-active shared experts.

    ``y = sum_{i in topk} g_i * Expert_i(x) + Shared(x)``. The ``moe_num_shared_experts`` shared
    experts are stored as one SwiGLU of hidden ``n_shared * moe_expert_hidden``, which computes
    exactly the sum of that many experts of width ``moe_expert_hidden`` (their hidden units are
    concatenated).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.moe_num_experts
        self.top_k = config.moe_top_k
        self.router = Router(
            config.n_embd, config.moe_num_experts, config.moe_top_k, config.moe_norm_topk_prob
        )
        self.experts = Experts(config.moe_num_experts, config.n_embd, config.moe_expert_hidden)
        self.shared = (
            SwiGLU(config.n_embd, config.moe_num_shared_experts * config.moe_expert_hidden)
            if config.moe_num_shared_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, C) -> (output (B, T, C), load-balancing loss scalar)."""
        B, T, C = x.shape
        xf = x.reshape(-1, C)  # (N, C)
        scores, weights, indices = self.router(xf)  # (N, E), (N, k), (N, k)
        # Dispatch: sort the N*k (token, expert) assignments by expert so each expert sees one
        # contiguous slice; a stable sort keeps the result independent of the sort algorithm.
        flat_expert = indices.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_expert, stable=True)  # (N*k,)
        token_of = order // self.top_k  # (N*k,) source token of each sorted assignment
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        y_sorted = self.experts(xf[token_of], counts)  # (N*k, C)
        y_sorted = y_sorted * weights.reshape(-1)[order].unsqueeze(-1)
        # Combine: each token sums its k weighted expert outputs
        y = torch.zeros_like(xf).index_add_(0, token_of, y_sorted)  # (N, C)
        if self.shared is not None:
            y = y + self.shared(xf)
        aux = load_balancing_loss(scores, indices, self.num_experts)
        return y.view(B, T, C), aux


def moe_reference_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Plain loop over tokens and their k choices: the slow reference the fast MoE is tested against.

    x: (B, T, C) -> (B, T, C).
    """
    B, T, C = x.shape
    xf = x.reshape(-1, C)
    _, weights, indices = moe.router(xf)
    y = torch.zeros_like(xf)
    for t in range(xf.shape[0]):
        for j in range(moe.top_k):
            e = int(indices[t, j])
            y[t] += weights[t, j] * moe.experts.expert_forward(e, xf[t : t + 1])[0]
    if moe.shared is not None:
        y = y + moe.shared(xf)
    return y.view(B, T, C)
