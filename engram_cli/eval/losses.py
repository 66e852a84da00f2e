"""Per-token losses of a run over windows (with the memory on, or knocked out), and the
confidence interval of a mean loss from per-window sums."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from engram_cli.core.progress import ProgressFn, report
from engram_cli.train.runs import LoadedRun

Z95 = 1.959963984540054  # two-sided 95% quantile of the normal distribution


def token_losses(run: LoadedRun, stream: np.ndarray, windows: np.ndarray, *, knockout: bool = False,
                 batch_windows: int = 16, progress: ProgressFn | None = None) -> np.ndarray:
    """Next-token loss (nats, float64) of every target of every window, window after window
    (the order of :func:`engram_cli.eval.texts.target_positions`).

    ``stream`` holds original ids: inputs go to the model through the run's sub-vocabulary and
    to the tables through its vocab map, targets through the sub-vocabulary (a token outside it
    is scored as the run's UNK, as training scored it). Windows are batched and right-padded —
    the model is causal and its MoE drops no tokens, so padding cannot change a real token's
    logits. With ``knockout`` every Engram module adds nothing (``EngramModel.engram_knockout``).
    """


    progress = report(progress)
    model = run.model
    device = next(model.parameters()).device
    pad = int(run.plan.canonical_pad_id) if run.plan is not None else 0
    lengths = (windows[:, 1] - windows[:, 0]).astype(np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.float64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    task = "forward, no Engram" if knockout else "forward"
    switch = model.engram_knockout() if knockout else contextlib.nullcontext()
    with torch.no_grad(), switch:
        for b0 in range(0, windows.shape[0], batch_windows):
            batch = windows[b0:b0 + batch_windows]
            width = int(lengths[b0:b0 + batch_windows].max())
            idx = np.zeros((len(batch), width), dtype=np.int64)
            canon = np.full((len(batch), width), pad, dtype=np.int64)
            tgt = np.full((len(batch), width), -1, dtype=np.int64)
            for r, (s, e) in enumerate(batch):
                ids = np.asarray(stream[s:e + 1], dtype=np.int64)
                idx[r, :e - s] = run.to_model_ids(ids[:-1])
                canon[r, :e - s] = run.vocab.table[ids[:-1]]
                tgt[r, :e - s] = run.to_model_ids(ids[1:])
            logits = model(torch.from_numpy(idx).to(device), torch.from_numpy(canon).to(device)).logits
            t = torch.from_numpy(tgt).to(device)
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, W, V) float32, as the training loss
            nll = -logp.gather(-1, t.clamp_min(0).unsqueeze(-1)).squeeze(-1).double().cpu().numpy()  # (B, W)
            for r, (s, e) in enumerate(batch):
                j = b0 + r
                out[offsets[j]:offsets[j + 1]] = nll[r, :e - s]
            progress(task, int(offsets[min(b0 + batch_windows, windows.shape[0])]), int(out.size),
                     tokens=int(offsets[min(b0 + batch_windows, windows.shape[0])]))
    return out


def window_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-window sums of per-token ``values`` laid out window after window."""
    if lengths.size == 0:
        return np.zeros(0)
    return np.add.reduceat(values, np.concatenate([[0], np.cumsum(lengths)[:-1]]))


def mean_ci95(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float, float]:
    """Mean per token and its 95% confidence interval from per-window sums and token counts.

    The mean is ``sum(sums) / sum(counts)`` (every token weighs the same); windows are the
    independent units, so the standard error is the ratio estimator's,
    ``sqrt(sum((s_i - mean c_i)^2) / (m (m - 1))) / mean(c)`` over the m windows (with equal
    windows: the standard deviation of the window means over sqrt(m)), and the interval is
    mean ± 1.96 SE (normal approximation). Windows without tokens (of a bucket) count as
    windows that sampled none; with fewer than two windows holding tokens the bounds are NaN.
    """
    m = int(counts.size)
    total = float(counts.sum())
    mean = float(sums.sum() / total) if total else math.nan
    if np.count_nonzero(counts) < 2:
        return mean, math.nan, math.nan
    resid = sums - mean * counts
    se = math.sqrt(float((resid ** 2).sum()) / (m * (m - 1))) / (total / m)
    return mean, mean - Z95 * se, mean + Z95 * se


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Total nats over the UTF-8 bytes of the text: nats / ln 2 / bytes (NaN for no bytes)."""
    return total_nats / math.log(2) / n_bytes if n_bytes else math.nan
