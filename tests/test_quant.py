"""engram_cli.model.quant: Engram table rows at serving precision (bf16; fp8 e4m3 with one ue8m0
scale per 32 values), checked against PyTorch's own float8_e4m3fn and bfloat16 casts."""

from __future__ import annotations

import math

import pytest
import torch

from engram_cli.core.errors import ConfigError, InputError
from engram_cli.model import quant as Q


def e4m3_values() -> torch.Tensor:
    """Every finite float8_e4m3fn value, as float32 (both zeros included)."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    return v[torch.isfinite(v)]


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def torch_fp8(rows: torch.Tensor) -> torch.Tensor:
    """The same scaling, with PyTorch's float8_e4m3fn cast doing the rounding."""
    d = rows.shape[-1]
    pad = torch.nn.functional.pad(rows, (0, -d % 32)).reshape(*rows.shape[:-1], -1, 32)
    s = Q.ue8m0_scales(rows).unsqueeze(-1)
    back = (pad / s).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * s
    return back.flatten(-2)[..., :d]


def test_rounding_equals_torch_float8_e4m3fn_on_every_value_and_every_tie():
    v = torch.sort(e4m3_values().unique()).values              # -448 .. 448
    mids = (v[1:] + v[:-1]) / 2                                  # exact ties: rounded to the even neighbour
    up, down = torch.nextafter(mids, torch.tensor(math.inf)), torch.nextafter(mids, torch.tensor(-math.inf))
    tiny = torch.tensor([2.0 ** -10, 2.0 ** -9 * 0.75, 2.0 ** -12, 1e-30, -0.0, 0.0])  # subnormals, underflow
    x = torch.cat([e4m3_values(), mids, up, down, tiny, -tiny])
    assert x.abs().max() == 448 and x.numel() > 1000
    assert torch.equal(bits(Q.round_to_e4m3(x)), bits(x.to(torch.float8_e4m3fn).to(torch.float32)))


@pytest.mark.parametrize("width", [8, 32, 72, 256])
def test_fp8_equals_the_torch_round_trip_bit_for_bit(width):
    torch.manual_seed(width)
    rows = torch.randn(600, width) * torch.logspace(-9, 4, 600).unsqueeze(1)  # small groups, huge groups
    rows[0] = 0                                     # a row of zeros
    rows[1, :min(32, width)] = 0                    # a group of zeros beside others
    rows[2, 0] = -0.0
    rows[3, :] = 1e-6                               # a group whose max is below the 1e-4 floor
    got = Q.quantize_dequantize(rows, "fp8-e4m3")
    assert got.shape == rows.shape and got.dtype == torch.float32
    assert torch.equal(bits(got), bits(torch_fp8(rows)))
    assert torch.equal(bits(got[0]), bits(rows[0])) and got[2, 0].signbit()


def test_scales_are_the_smallest_powers_of_two_that_fit_the_group_max():
    torch.manual_seed(0)
    rows = torch.randn(300, 96) * torch.logspace(-3, 5, 300).unsqueeze(1)
    rows[0] = 0
    s = Q.ue8m0_scales(rows)                                                # (300, 3)
    mantissa, _ = torch.frexp(s)
    assert s.shape == (300, 3) and bool((mantissa == 0.5).all())            # exact powers of two
    amax = rows.reshape(300, 3, 32).abs().amax(-1).clamp_min(Q.AMAX_FLOOR).double()
    assert bool((s.double() * 448 >= amax).all()) and bool((s.double() * 224 < amax).all())
    assert s[0].tolist() == [2.0 ** -22] * 3                                # all zeros: ceil(log2(1e-4 / 448))
    assert Q.ceil_log2(torch.tensor([1.0, 1.5, 2.0, 0.75])).tolist() == [0, 1, 1, 0]


def test_values_at_the_edge_of_the_range():
    # a group whose max is 448 * 2^k keeps scale 2^k and maps its max onto 448 exactly
    row = torch.tensor([[448.0 * 4, -448.0 * 4, 3.0, 0.5] + [0.0] * 28])
    assert Q.ue8m0_scales(row).tolist() == [[4.0]]
    got = Q.quantize_dequantize(row, "fp8-e4m3")
    assert got[0, :3].tolist() == [1792.0, -1792.0, 3.0]   # 448 and 3 / 4 = 0.75 are e4m3 values
    assert got[0, 3].item() == 0.5                           # 0.5 / 4 = 2^-3: exact too
    # just above a power of two times 448, the next scale: the max lands just above 224, rounds to 224
    row = torch.tensor([[torch.nextafter(torch.tensor(448.0), torch.tensor(1e9)).item()] + [1.0] * 31])
    assert Q.ue8m0_scales(row).tolist() == [[2.0]] and Q.quantize_dequantize(row, "fp8-e4m3")[0, 0].item() == 448.0
    assert torch.equal(bits(Q.quantize_dequantize(row, "fp8-e4m3")), bits(torch_fp8(row)))


def test_bf16_and_fp32():
    torch.manual_seed(1)
    rows = torch.randn(50, 40)
    assert torch.equal(Q.quantize_dequantize(rows, "bf16"), rows.to(torch.bfloat16).float())
    assert torch.equal(Q.quantize_dequantize(rows, "fp32"), rows)
    assert Q.quantization_error(rows, "fp32") == (0.0, 0.0)


def test_quantization_error():
    torch.manual_seed(2)
    rows = torch.randn(200, 64)
    rel, mx = Q.quantization_error(rows, "fp8-e4m3")
    diff = (Q.quantize_dequantize(rows, "fp8-e4m3") - rows).double()
    assert rel == pytest.approx(float(diff.norm() / rows.double().norm()), rel=1e-12) and mx == float(diff.abs().max())
    assert 0 < rel < 2 ** -4                       # 3 mantissa bits: at most half a quantum, 1/16 of the value
    assert 0 < Q.quantization_error(rows, "bf16")[0] < 2 ** -8
    assert Q.quantization_error(torch.zeros(4, 32), "fp8-e4m3") == (0.0, 0.0)
    per_head = Q.head_quantization_errors(rows, [150, 50], "fp8-e4m3")
    assert per_head == [Q.quantization_error(rows[:150], "fp8-e4m3"), Q.quantization_error(rows[150:], "fp8-e4m3")]


def test_quantized_tables_restores_the_rows_also_on_error():
    emb = torch.nn.Embedding(10, 32)

    class Model:
        def engram_table_parameters(self):
            return [emb.weight]

    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError), Q.quantized_tables(Model(), "fp8-e4m3"):
        assert torch.equal(emb.weight, Q.quantize_dequantize(before, "fp8-e4m3")) and not torch.equal(emb.weight, before)
        raise RuntimeError("boom")
    assert torch.equal(emb.weight, before)


def test_bad_input():
    with pytest.raises(ConfigError, match="unknown table dtype 'fp16'"):
        Q.quantize_dequantize(torch.zeros(2, 2), "fp16")
    with pytest.raises(InputError, match="NaN or infinite"):
        Q.quantize_dequantize(torch.tensor([[1.0, math.nan]]), "fp8-e4m3")
