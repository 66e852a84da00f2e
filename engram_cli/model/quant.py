"""Engram table rows at serving precision: bf16, or fp8 e4m3 with power-of-two (ue8m0) group scales,
quantized and dequantized back to float32 so that a trained model can be scored as a server would
hold its tables (``engram eval --table-dtype``).

* ``fp32``: the rows as trained (a copy).
* ``bf16``: each value cast to bfloat16 (round to nearest, ties to even) and back.
* ``fp8-e4m3``: how DeepSeek V4.1-Flash stores its Engram rows (``engram_cli.tables.presets``:
  fp8 rows with ue8m0 scales). Every row is cut into groups of ``FP8_GROUP`` = 32 consecutive
  values (a row of D values has ceil(D / 32) groups, the last one shorter when 32 does not divide
  D); each group gets one scale, a power of two (ue8m0: an 8-bit exponent, no mantissa)::

      amax  = max(|x| over the group, 1e-4)
      s     = 2 ** ceil(log2(amax * fp32(1/448)))      # the group's max maps inside e4m3's range
      q     = e4m3(clamp(x / s, -448, 448))            # round to nearest e4m3fn value, ties to even
      x'    = q * s

  This is DeepSeek's block quantizer with ``scale_fmt="ue8m0"`` (DeepSeek-V3.2-Exp
  ``inference/kernel.py``: ``act_quant_kernel`` clamps the block's absolute maximum at 1e-4 and,
  with ``round_scale``, takes ``fast_round_scale(amax, 1/448) = fast_pow2(fast_log2_ceil(amax *
  (1/448)))``: the float32 product's exponent, plus one when its mantissa is not zero); only the
  group size differs (32 values, one ue8m0 scale per 32 as in the MX formats, instead of the
  kernel's 128). 448 is the largest finite float8_e4m3fn value.

The rounding to e4m3 is written out here in float32 arithmetic (:func:`round_to_e4m3`: the value's
binade from ``frexp``, its quantum 2^(e-3), ``torch.round``'s ties-to-even), so that the tests can
check it against PyTorch's own ``torch.float8_e4m3fn`` cast bit for bit; dividing and multiplying
by the power-of-two scale is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from engram_cli.core.errors import ConfigError, InputError

TABLE_DTYPES = ("fp32", "bf16", "fp8-e4m3")   # what --table-dtype accepts; fp32 = as trained
FP8_GROUP = 32            # values per ue8m0 scale (one scale per 32 consecutive values of a row)
E4M3_MAX = 448.0          # largest finite float8_e4m3fn value (1.75 * 2^8)
AMAX_FLOOR = 1e-4         # DeepSeek's kernel clamps a group's absolute maximum here (all-zero groups)
_E4M3_MANTISSA_BITS = 3   # e4m3: 3 stored mantissa bits
_E4M3_MIN_EXP = -6        # smallest normal exponent; below it the subnormals step by 2^-9
_ROWS_PER_BLOCK = 1 << 16  # rows quantized at a time (bounds the temporaries of a large table)


def check_table_dtype(dtype: str) -> str:
    """``dtype`` itself when it is one of :data:`TABLE_DTYPES`, else a ConfigError naming them."""
    if dtype not in TABLE_DTYPES:
        raise ConfigError(f"unknown table dtype {dtype!r}", f"use one of: {', '.join(TABLE_DTYPES)}")
    return dtype


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^e for integer exponents in [-126, 127], exactly: the float32 with that exponent field and
    a zero mantissa (DeepSeek's ``fast_pow2``)."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) of positive normal float32 values, exactly, from their bits: the exponent
    field, plus one when the mantissa is not zero (DeepSeek's ``fast_log2_ceil``). int32."""
    bits = x.to(torch.float32).view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)


def ue8m0_scales(rows: torch.Tensor) -> torch.Tensor:
    """One power-of-two scale per group of ``FP8_GROUP`` consecutive values of each row (the
    last dim): float32 (..., ceil(D / 32)), ``2 ** ceil(log2(max(amax, 1e-4) * fp32(1/448)))``."""
    groups = _groups(rows.to(torch.float32))                                  # (..., G, 32)
    amax = groups.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)                    # (..., G)
    return pow2(ceil_log2(amax * torch.tensor(1 / E4M3_MAX, dtype=torch.float32)))


def round_to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """The float8_e4m3fn value nearest to each float32 in [-448, 448] (ties to even), as float32.

    A value |y| in [2^e, 2^(e+1)) has 3 mantissa bits, so its quantum is 2^(e-3); below the
    smallest normal binade (e < -6) the subnormals keep the quantum 2^-9. ``y / quantum`` and the
    product back are exact (powers of two); ``torch.round`` rounds halves to even. The sign is
    kept, -0.0 included.
    """
    a = y.abs()
    _, e = torch.frexp(a)                                     # a = m * 2^e, m in [0.5, 1): binade e - 1
    binade = (e - 1).clamp_min(_E4M3_MIN_EXP)
    quantum = pow2(binade - _E4M3_MANTISSA_BITS)
    return torch.copysign(torch.round(a / quantum) * quantum, y)


def quantize_dequantize(rows: torch.Tensor, dtype: str) -> torch.Tensor:
    """``rows`` (any shape, one row per last-dim vector) stored at ``dtype`` and read back: float32,
    same shape and device. See the module docstring for each dtype's rule."""
    check_table_dtype(dtype)
    x = rows.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise InputError("the table rows hold NaN or infinite values, which no storage dtype can quantize",
                         "check the run's checkpoint (retrain from an earlier step)")
    if dtype == "fp32":
        return x.clone()
    if dtype == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    flat = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    out = torch.empty_like(flat)
    for r in range(0, flat.shape[0], _ROWS_PER_BLOCK):
        block = flat[r:r + _ROWS_PER_BLOCK]
        scales = ue8m0_scales(block).unsqueeze(-1)                                 # (R, G, 1)
        q = round_to_e4m3((_groups(block) / scales).clamp(-E4M3_MAX, E4M3_MAX))   # (R, G, 32)
        out[r:r + _ROWS_PER_BLOCK] = (q * scales).flatten(-2)[:, :flat.shape[1]]
    return out.reshape(x.shape)


def quantization_error(rows: torch.Tensor, dtype: str) -> tuple[float, float]:
    """(relative L2 error, largest absolute error) of storing ``rows`` at ``dtype``:
    ``||x' - x|| / ||x||`` (0 for all-zero rows, which every dtype keeps exactly) and
    ``max |x' - x|``, computed in float64."""
    acc = QuantError(dtype)
    acc.add(rows)
    return acc.rel_l2, acc.max_abs


class QuantError:
    """The error of storing rows at a serving dtype, accumulated block by block of rows: every row
    quantizes on its own (its groups of 32 values), so the sums over blocks equal the whole table's."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.err_sq = self.norm_sq = self.max_abs = 0.0

    def add(self, rows: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(np.ascontiguousarray(rows)) if isinstance(rows, np.ndarray) else rows.detach()
        x64 = x.to(torch.float64)
        diff = quantize_dequantize(x, self.dtype).to(torch.float64) - x64
        self.err_sq += float((diff * diff).sum())
        self.norm_sq += float((x64 * x64).sum())
        self.max_abs = max(self.max_abs, float(diff.abs().max()) if diff.numel() else 0.0)

    @property
    def rel_l2(self) -> float:
        """``||x' - x|| / ||x||`` over everything added (0 for all-zero rows)."""
        return math.sqrt(self.err_sq / self.norm_sq) if self.norm_sq else 0.0


def head_quantization_errors(weight, head_sizes: list[int], dtype: str,
                             block_rows: int = 1 << 16) -> list[tuple[float, float]]:
    """:func:`quantization_error` of every head's table in one layer's concatenated table, heads one
    after another as ``TablePlan.head_offsets`` lays them. ``weight``: the (sum(head_sizes), D)
    rows as a tensor, or a function ``(start, stop) -> rows`` (a row store's gather), read
    ``block_rows`` rows at a time so a table larger than memory is never held whole."""
    read = weight if callable(weight) else (lambda a, b: weight[a:b])
    out, start = [], 0
    for size in head_sizes:
        acc = QuantError(dtype)
        for a in range(start, start + size, block_rows):
            acc.add(read(a, min(a + block_rows, start + size)))
        out.append((acc.rel_l2, acc.max_abs))
        start += size
    return out


@contextmanager
def quantized_tables(model, dtype: str) -> Iterator[None]:
    """Inside the block, every Engram table of ``model`` holds its rows at ``dtype`` (quantized
    and dequantized): the parameters of ``nn.Embedding`` tables are replaced and the trained rows
    come back after it, bit for bit, also when the block raises; tables in row stores are read
    through the quantizer (the stores are not written)."""
    check_table_dtype(dtype)
    params = model.engram_table_parameters()
    saved = [p.data for p in params]
    stored = [t for t in getattr(model, "engram_tables", dict)().values() if t.store_backed]
    try:
        with torch.no_grad():
            for p in params:
                p.data = quantize_dequantize(p.data, dtype).to(p.dtype)
        for t in stored:
            t.read_transform = lambda rows: quantize_dequantize(rows, dtype).to(rows.dtype)
        yield
    finally:
        for p, d in zip(params, saved):
            p.data = d
        for t in stored:
            t.read_transform = None


def _groups(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., ceil(D / 32), 32): the last dim cut into groups of ``FP8_GROUP``, the last
    group padded with zeros (which change neither its maximum nor any other value)."""
    d = x.shape[-1]
    pad = -d % FP8_GROUP
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, FP8_GROUP)
