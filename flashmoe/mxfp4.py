"""MXFP4 (the OCP microscaling format GPT-OSS ships its experts in): e2m1 codes, two a byte (low nibble first),
one e8m0 scale 2^(s - 127) per 32 weights along the input. A store of scheme "mxfp4" keeps them as they are
(`{name}.packed` uint8 [rows, cols / 2], `{name}.scales` uint8 [rows, cols / 32], no biases) and the GPU kernels
decode them (kernels/moe_triton.py, SCALE_KIND 2). On the CPU an expert becomes 8-bit affine, exactly: an e2m1
value doubled is an integer in [-12, 12], so code 2v + 128 with scale 2^(s - 128) and bias -128 x scale."""

from __future__ import annotations

import torch

from .quant import QuantizedTensor

GROUP = 32
# e2m1: sign, two exponent bits, one mantissa bit
VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2] -> e2m1 codes uint8 [rows, cols], low nibble first."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """e8m0 -> float32 2^(s - 127)."""
    return torch.exp2(scales.float() - 127)


def values(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2] -> the e2m1 values float32 [rows, cols] (NVFP4 packs its codes the same way)."""
    return torch.tensor(VALUES, dtype=torch.float32, device=packed.device)[codes(packed).long()]


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    v = values(packed)
    w = v.view(v.shape[0], -1, GROUP) * scale_values(scales).unsqueeze(-1)
    return w.view(v.shape).to(dtype)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] -> (packed, scales), the OCP recipe: the group's scale is 2^(floor(log2(amax)) - 2) (so its largest
    weight lands in [4, 8), clamped to 6), each weight rounded to the nearest e2m1 value."""
    g = w.float().reshape(w.shape[0], -1, GROUP)
    amax = g.abs().amax(-1, keepdim=True).clamp(min=2.0 ** -125)
    exponent = torch.floor(torch.log2(amax)) - 2
    scaled = g / torch.exp2(exponent)
    grid = torch.tensor(VALUES[:8], dtype=torch.float32, device=w.device)
    magnitude = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(-1)  # index into the positive half
    c = (magnitude + 8 * (scaled < 0)).to(torch.uint8).reshape(w.shape[0], -1)
    packed = (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()
    return packed, (exponent.squeeze(-1) + 127).clamp(0, 254).to(torch.uint8)


def as_affine8(packed: torch.Tensor, scales: torch.Tensor) -> QuantizedTensor:
    """The same weights as 8-bit affine, group 32, bf16 scales: exact for every e8m0 scale up to 2^121 (s <= 248;
    the bias, -2^(s - 121), is bf16's largest power of two there). Real checkpoints' scales are near 2^-7."""
    values = torch.tensor(VALUES, dtype=torch.float32, device=packed.device)
    c8 = (2 * values[codes(packed).long()] + 128).to(torch.uint8)
    scale = torch.exp2(scales.float() - 128)
    return QuantizedTensor(c8, scale.to(torch.bfloat16), (-128 * scale).to(torch.bfloat16), 8, GROUP)
