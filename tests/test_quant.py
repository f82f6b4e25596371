"""Group-wise affine quantization: packing round-trips, error bounds, awkward shapes."""

from __future__ import annotations

import pytest
import torch

from flashmoe.errors import FlashMoeError
from flashmoe.quant import check_quant_params, dequantize, pack, quantize, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 64), (3, 128), (17, 192)])
def test_pack_unpack_round_trip(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (shape[0], shape[1] * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits,bound", [(8, 0.008), (4, 0.12), (2, 0.6)])
def test_quantization_error_shrinks_with_bits(bits, bound):
    w = torch.randn(37, 256, generator=torch.Generator().manual_seed(0)) * 0.02  # rms error ~ step / sqrt(12)
    q = quantize(w, bits, 64)
    err = float((dequantize(q) - w).norm() / w.norm())
    assert err < bound
    # each weight is within half a step of its group's grid
    step = q.scales.float().repeat_interleave(64, dim=1)
    assert torch.all((dequantize(q) - w).abs() <= step / 2 + 1e-3 * w.abs().max())


def test_group_extremes_within_fp16_rounding():
    w = torch.zeros(2, 64)
    w[0, :32] = torch.linspace(-1, 1, 32)  # one spread group; the rest constant
    d = dequantize(quantize(w, 4, 32))
    assert torch.equal(d[0, 32:], w[0, 32:]) and torch.equal(d[1], w[1])
    assert d[0, 0] == -1  # the min is the bias
    assert 0 < 1 - d[0, 31] <= 15 * 2**-14  # the max is off by the scale's fp16 rounding, times 15 levels


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_extremes_are_off_by_at_most_the_fp16_rounding_of_scale_and_bias(bits):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(bits)) * 0.02
    q = quantize(w, bits, 64)
    d, groups = dequantize(q).view(64, 8, 64), w.view(64, 8, 64)
    half_ulp = lambda x: x.abs() * 2**-11 + 2**-25  # noqa: E731  fp16: 10 stored mantissa bits; subnormals
    lo, hi = groups.amin(-1), groups.amax(-1)
    at_lo, at_hi = groups.argmin(-1, keepdim=True), groups.argmax(-1, keepdim=True)
    scale = q.scales.float()
    assert torch.all((d.gather(-1, at_lo).squeeze(-1) - lo).abs() <= half_ulp(lo))
    assert torch.all((d.gather(-1, at_hi).squeeze(-1) - hi).abs() <= half_ulp(lo) + ((1 << bits) - 1) * half_ulp(scale))
    assert not torch.equal(d.gather(-1, at_hi), groups.gather(-1, at_hi))  # so "exact" would be a false claim


def test_bad_parameters_are_named():
    with pytest.raises(FlashMoeError, match="--bits"):
        check_quant_params(3, 64, 128, "gate/up")
    with pytest.raises(FlashMoeError, match=r"does not divide.*not a multiple of 8"):
        check_quant_params(4, 64, 100, "down")
    with pytest.raises(FlashMoeError, match=r"64 does not divide down's input size 160.*\(8, 16, 32, 40, 80, 160\)"):
        check_quant_params(4, 64, 160, "down")  # the suggestions divide it
