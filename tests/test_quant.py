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


def test_extremes_and_constant_groups_are_exact():
    w = torch.zeros(2, 64)
    w[0, :32] = 1.0  # group of two values: both exact
    q = quantize(w, 4, 32)
    assert torch.equal(dequantize(q), w)


def test_bad_parameters_are_named():
    with pytest.raises(FlashMoeError, match="--bits"):
        check_quant_params(3, 64, 128, "gate/up")
    with pytest.raises(FlashMoeError, match="does not divide"):
        check_quant_params(4, 64, 100, "down")
