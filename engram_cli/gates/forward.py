"""The gates of a text, straight from the model's forward pass, in windows of ``block_size``.

Long sequences are cut into windows of the model's ``block_size`` that overlap by ``overlap``
tokens (default half a block); each token's gate is taken from the window in which it has the
most left context, so after the first window every token sees at least ``overlap`` tokens
before it, and its n-grams are hashed from the real preceding ids (not the pad id).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engram_cli.core.errors import ConfigError, InputError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.gates.text import row_labels, token_texts
from engram_cli.train.runs import LoadedRun, load_run


def load_run_model(run_dir: str | os.PathLike, step: int | None = None, device: str = "cpu") -> LoadedRun:
    """A run directory written by ``engram train``, loaded for inspection with its model
    (:func:`engram_cli.train.runs.load_run`); a run without Engram layers is refused (:func:`check_run`)."""

    run = load_run(run_dir, step, device, verify=False)  # inference: file sizes checked, not hashed
    check_run(run)
    return run


def check_run(run: LoadedRun) -> None:
    """Refuse a run without Engram layers: a pure-MoE baseline has no gates to inspect."""
    if not run.layer_ids:
        raise ConfigError(f"this model has no Engram layers: {run.name} is a pure-MoE baseline "
                          "(allocation 1.0), so it has no gates to inspect",
                          "pass a run trained with Engram tables (allocation < 1)")


# ---------------------------------------------------------------------------------------------
# windows of block_size, gates straight from the forward pass


def plan_windows(length: int, block: int, overlap: int) -> list[tuple[int, int, int]]:
    """Cut ``length`` positions into windows of at most ``block``: ``(start, end, keep_from)``.

    The kept parts ``[keep_from, end)`` tile ``[0, length)``. Every window after the first
    starts at least ``overlap`` positions before its kept part (the last one is moved left to
    end at ``length``, which gives its tokens more context).
    """
    if length <= 0:
        return []
    if not 0 <= overlap < block:
        raise ConfigError(f"window overlap {overlap} must be in [0, block_size={block})",
                          "pass a smaller overlap")
    windows = [(0, min(block, length), 0)]
    while windows[-1][1] < length:
        kept = windows[-1][1]
        start = max(0, min(kept - overlap, length - block))
        windows.append((start, min(start + block, length), kept))
    return windows


def forward_gates(model: Any, model_ids: Sequence[np.ndarray], canonical_ids: Sequence[np.ndarray], *,
                  overlap: int | None = None, batch_windows: int = 16,
                  progress: ProgressFn | None = None) -> list[np.ndarray]:
    """The gates of every token of every sequence: one float32 array (T, L * hc) per sequence.

    Columns are layer-major (layer ``model.engram_layer_ids[i]``, branch ``b`` is column
    ``i * hc + b``). Sequences longer than ``block_size`` go through :func:`plan_windows`;
    windows are batched (right-padded: the model is causal and its MoE has no capacity limit, so
    padding after a token cannot change that token's gate).
    """

    progress = report(progress)
    block, hc = int(model.config.block_size), int(model.config.engram_hc_mult)
    n_cols = len(model.engram_layer_ids) * hc
    overlap = block // 2 if overlap is None else int(overlap)
    out = [np.zeros((len(m), n_cols), dtype=np.float32) for m in model_ids]
    items = [(s, *w) for s, m in enumerate(model_ids) for w in plan_windows(len(m), block, overlap)]
    items.sort(key=lambda it: it[1] - it[2])  # similar lengths together: little padding
    total, done = sum(len(m) for m in model_ids), 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b0 in range(0, len(items), batch_windows):
                batch = items[b0:b0 + batch_windows]
                g = _forward_windows(model, batch, model_ids, canonical_ids)  # (B, W, L * hc)
                for r, (s, start, end, keep) in enumerate(batch):
                    out[s][keep:end] = g[r, keep - start:end - start]
                    done += end - keep
                progress("forward", done, total, tokens=done)
    finally:
        model.train(was_training)
    return out


def _forward_windows(model: Any, batch: list[tuple[int, int, int, int]], model_ids: Sequence[np.ndarray],
                     canonical_ids: Sequence[np.ndarray]) -> np.ndarray:
    """One forward call over a batch of windows ``(sequence, start, end, keep)``, right-padded:
    the gates (B, W, L * hc) the model returned, float32 on the CPU."""

    layers = tuple(model.engram_layer_ids)
    width = max(end - start for _, start, end, _ in batch)
    idx = np.zeros((len(batch), width), dtype=np.int64)
    canon = np.full((len(batch), width), int(model.plan.canonical_pad_id), dtype=np.int64)
    for r, (s, start, end, _) in enumerate(batch):
        idx[r, :end - start] = model_ids[s][start:end]
        canon[r, :end - start] = canonical_ids[s][start:end]
    device = next(model.parameters()).device
    res = model(torch.from_numpy(idx).to(device), torch.from_numpy(canon).to(device), return_gates=True)
    g = torch.stack([res.gates[layer] for layer in layers], dim=2)  # (B, W, L, hc)
    return g.float().reshape(len(batch), width, -1).cpu().numpy()


def document_gates(run: LoadedRun, docs: Sequence[np.ndarray], *, separator: bool = True,
                   overlap: int | None = None, batch_windows: int = 16,
                   progress: ProgressFn | None = None) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Model ids, canonical ids and gates (T, L * hc) of documents given as original ids.

    With ``separator`` (and a run that has one) each document is read after the run's document
    separator, as in training, where every document follows an EOS token: the separator is fed
    first and its own gate dropped, so the first token's n-grams and attention see what they saw
    in training rather than the pad id and nothing.
    """
    sep = run.separator_id if separator else None
    model_ids = [np.asarray(run.to_model_ids(d), dtype=np.int64) for d in docs]
    canon = [np.asarray(run.vocab(d), dtype=np.int64) for d in docs]
    if sep is None:
        return model_ids, canon, forward_gates(run.model, model_ids, canon, overlap=overlap,
                                               batch_windows=batch_windows, progress=progress)
    sep_model = int(np.asarray(run.to_model_ids(np.array([sep])))[0])
    sep_canon = int(np.asarray(run.vocab(np.array([sep])))[0])
    gates = forward_gates(run.model, [np.concatenate([[sep_model], m]) for m in model_ids],
                          [np.concatenate([[sep_canon], c]) for c in canon], overlap=overlap,
                          batch_windows=batch_windows, progress=progress)
    return model_ids, canon, [g[1:] for g in gates]


# ---------------------------------------------------------------------------------------------
# the gates of one run on one text


@dataclass
class GateTrace:
    """The gates of one run on one text.

    ``gates`` is (R, T): row r is layer ``rows[r][0]``, branch ``rows[r][1]``; R = layers x hc.
    """

    model: str                        # run name (directory name)
    run_dir: str | None
    step: int | None
    text: str
    tokens: list[str]                 # each token's piece of the text ("" for byte continuations)
    ids: np.ndarray                   # (T,) original tokenizer ids
    model_ids: np.ndarray             # (T,) model-vocabulary ids (unknown tokens -> UNK)
    canonical_ids: np.ndarray         # (T,) canonical ids (what the tables hash)
    layer_ids: tuple[int, ...]
    hc_mult: int
    gates: np.ndarray                 # (R, T) float32 gate alpha in [0, 1]
    unknown: int = 0                  # tokens outside the model's vocabulary (fed as UNK)
    windows: int = 1                  # forward windows the text took

    @property
    def label(self) -> str:
        return self.model if self.step is None else f"{self.model} (step {self.step})"

    @property
    def rows(self) -> list[tuple[int, int]]:
        return [(layer, b) for layer in self.layer_ids for b in range(self.hc_mult)]

    @property
    def row_labels(self) -> list[str]:
        return row_labels(self.layer_ids, self.hc_mult)

    def gate(self, layer: int, branch: int = 0) -> np.ndarray:
        """(T,) gates of one layer (and branch)."""
        return self.gates[self.rows.index((layer, branch))]

    def records(self) -> list[dict[str, Any]]:
        """Per-token records: index, token text, ids, and the gate of every layer/branch."""
        labels = self.row_labels
        return [{"index": i, "token": tok, "id": int(self.ids[i]), "canonical_id": int(self.canonical_ids[i]),
                 "model_id": int(self.model_ids[i]),
                 "gates": {lab: round(float(self.gates[r, i]), 6) for r, lab in enumerate(labels)}}
                for i, tok in enumerate(self.tokens)]

    def summary(self) -> dict[str, dict[str, float]]:
        return {lab: {"mean": float(g.mean()), "min": float(g.min()), "max": float(g.max())}
                for lab, g in zip(self.row_labels, self.gates)}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "run_dir": self.run_dir, "step": self.step, "layer_ids": list(self.layer_ids),
                "hc_mult": self.hc_mult, "rows": self.row_labels, "tokens_count": len(self.tokens),
                "unknown_tokens": self.unknown, "windows": self.windows, "summary": self.summary(),
                "tokens": self.records()}


def encode_text(run: LoadedRun, text: str) -> tuple[np.ndarray, list[str]]:
    """Original ids and token pieces of ``text`` (no special tokens, as the corpus reader)."""
    enc = run.tokenizer.tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(enc.ids, dtype=np.int64), token_texts(text, enc.offsets)


def trace_text(run: LoadedRun, text: str, *, separator: bool = True, overlap: int | None = None,
               batch_windows: int = 16, progress: ProgressFn | None = None) -> GateTrace:
    """Tokenize ``text`` with the run's tokenizer and record the gates of the run's forward pass
    (after the run's document separator unless ``separator=False``; see :func:`document_gates`)."""
    if not text or not text.strip():
        raise InputError("the text is empty: there is nothing to inspect", "pass a non-empty TEXT, --file F or -")
    ids, pieces = encode_text(run, text)
    if ids.size == 0:
        raise InputError("the text has no tokens", "pass a non-empty TEXT, --file F or -")
    (model_ids,), (canon,), (g,) = document_gates(run, [ids], separator=separator, overlap=overlap,
                                                  batch_windows=batch_windows, progress=progress)
    block = run.block_size
    fed = len(ids) + (1 if separator and run.separator_id is not None else 0)
    n_windows = len(plan_windows(fed, block, block // 2 if overlap is None else overlap))
    unknown = int((model_ids == run.unk_id).sum()) if run.unk_id is not None else 0
    return GateTrace(model=run.name, run_dir=str(run.run_dir), step=run.step, text=text,
                     tokens=pieces, ids=ids, model_ids=model_ids, canonical_ids=canon,
                     layer_ids=run.layer_ids, hc_mult=run.hc_mult, gates=np.ascontiguousarray(g.T),
                     unknown=unknown, windows=n_windows)
