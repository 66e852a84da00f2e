"""The logit lens of the memory: which tokens the retrieved rows alone push the model toward.

At an Engram layer the retrieved memory is ``e = concat(rows of every head)`` (H*D) and the value it
writes into the residual stream is ``v = W_V e + b`` (before the gate). The lens takes ``v`` straight
to the output: ``softmax(lm_head(final_norm(v)))`` over the model's sub-vocabulary, as a logit lens
reads a hidden state (nostalgebraist's logit lens; TransformerLens's vocabulary).

What is left out, on purpose: the gate alpha (a scalar per token; RMSNorm is scale invariant, so
it would not change the picture), the short convolution (it mixes in the values of earlier
positions, zero at initialization), and everything the layers after the Engram block add. So the
lens says what the memory *contributes*, not what the model predicts. Per order, the rows of the
other orders' heads are zeroed (the bias stays: it is part of the value projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from engram_cli.core.errors import ArtifactError
from engram_cli.model.transformer import RMSNorm
from engram_cli.train.checkpoint import MODEL_FILE
from engram_cli.train.runs import LoadedRun


@dataclass
class LensToken:
    token: str          # the token's text (the tokenizer's decoding of its original id)
    model_id: int       # id in the run's sub-vocabulary
    original_id: int    # tokenizer id (-1: the sub-vocabulary's UNK)
    prob: float


class MemoryLens:
    """The value projection, final norm and LM head of a run, read from its checkpoint (no tables)."""

    def __init__(self, run: LoadedRun):
        path = Path(run.checkpoint.path) / MODEL_FILE
        names = {"lm_head": "lm_head.weight", "norm": "final_norm.weight"}
        for layer in run.layer_ids:
            names[f"w{layer}"] = f"blocks.{layer}.engram.value_proj.weight"
            names[f"b{layer}"] = f"blocks.{layer}.engram.value_proj.bias"
        self.weights: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                have = set(f.keys())
                for k, name in names.items():
                    if name in have:
                        self.weights[k] = f.get_tensor(name).float()
        except Exception as e:  # noqa: BLE001  a damaged header or truncated file
            raise ArtifactError(f"{path} cannot be read ({str(e).splitlines()[0][:80]})",
                                "pass --step of another checkpoint") from e
        self.norm = RMSNorm(run.model_config.n_embd, eps=run.model_config.norm_eps)
        with torch.no_grad():
            self.norm.weight.copy_(self.weights["norm"])
        self.subvocab = run.subvocab
        self.tokenizer = run.tokenizer.tokenizer

    def probs(self, layer_id: int, memory: np.ndarray) -> np.ndarray:
        """(V,) token probabilities the memory vector ``memory`` (H*D) alone gives at ``layer_id``."""
        e = torch.as_tensor(memory, dtype=torch.float32)
        with torch.no_grad():
            v = F.linear(e, self.weights[f"w{layer_id}"], self.weights.get(f"b{layer_id}"))  # (C,)
            logits = F.linear(self.norm(v), self.weights["lm_head"])                          # (V,)
            return torch.softmax(logits, dim=-1).numpy()

    def top(self, layer_id: int, memory: np.ndarray, k: int) -> list[LensToken]:
        """The ``k`` most probable tokens of :meth:`probs`, most probable first."""
        p = self.probs(layer_id, memory)
        idx = np.argsort(-p, kind="stable")[:k]
        orig = self.subvocab.to_original_ids(idx)
        return [LensToken(token=self.tokenizer.decode([int(o)]) if o >= 0 else "<unk>", model_id=int(i),
                          original_id=int(o), prob=float(p[i])) for i, o in zip(idx, orig)]
