"""Group-wise affine quantization (the MLX scheme): w ~= q * scale + bias, one scale and bias per group.

Groups run along the input dimension (the last axis of a [out, in] weight), so one group is a
contiguous run of `group_size` weights that a matrix-vector kernel reads together. Codes are packed
little-end first: for 4-bit, element 2j is the low nibble of byte j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16


@dataclass
class QuantizedTensor:
    packed: torch.Tensor  # uint8 [out, in * bits / 8]
    scales: torch.Tensor  # float16 [out, in / group_size]
    biases: torch.Tensor | None  # float16 [out, in / group_size]; None for MXFP4 (mxfp4.py)
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 8 // self.bits


def check_quant_params(bits: int, group_size: int, in_features: int, what: str) -> None:
    from .errors import FlashMoeError

    if bits not in SUPPORTED_BITS:
        raise FlashMoeError(f"--bits must be one of {SUPPORTED_BITS}, not {bits}")
    if group_size <= 0 or group_size % 8:
        raise FlashMoeError(f"--group-size must be a positive multiple of 8, not {group_size}")
    if in_features % group_size:
        fits = [g for g in range(8, in_features + 1, 8) if in_features % g == 0]
        raise FlashMoeError(
            f"group size {group_size} does not divide {what}'s input size {in_features}; "
            f"pick a --group-size that does ({', '.join(map(str, fits[:6])) or 'none: it is not a multiple of 8'})"
        )


def quantize(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Quantize a 2-D [out, in] weight; bias = the group's min and scale = its range / (2^bits - 1), both stored
    as float16: the min comes back off by the bias's fp16 rounding, the max by that plus (2^bits - 1) times the
    scale's (tests/test_quant.py holds these bounds)."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    levels = (1 << bits) - 1
    w_min = w.amin(dim=-1, keepdim=True)
    w_max = w.amax(dim=-1, keepdim=True)
    scale = (w_max - w_min) / levels
    # round scale/bias to their stored dtype first, so codes are chosen against what dequant will see
    scale = scale.to(SCALE_DTYPE).float()
    bias = w_min.to(SCALE_DTYPE).float()
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round((w - bias) / safe_scale), 0, levels).to(torch.uint8)
    codes = codes.reshape(out_features, in_features)
    return QuantizedTensor(
        packed=pack(codes, bits),
        scales=scale.squeeze(-1).to(SCALE_DTYPE),
        biases=bias.squeeze(-1).to(SCALE_DTYPE),
        bits=bits,
        group_size=group_size,
    )


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [out, in] (each < 2**bits) -> uint8 [out, in * bits / 8]."""
    if bits == 8:
        return codes.contiguous()
    per_byte = 8 // bits
    c = codes.reshape(codes.shape[0], -1, per_byte)
    out = c[..., 0].clone()
    for i in range(1, per_byte):  # in uint8, one pass a code position: a quarter of an int32 sum's time
        out |= c[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack: uint8 [out, n] -> uint8 codes [out, n * 8 / bits]."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Codes of any width packed as MLX and compressed-tensors pack them (3, 5 and 6 bits run across byte
    boundaries): element i of a row is bits [i * bits, (i + 1) * bits) of the row's little-endian bit stream.
    uint8 [rows, n] -> uint8 codes [rows, cols]."""
    if bits in SUPPORTED_BITS:
        return unpack(packed, bits)[:, :cols]
    stream = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [rows, n, 8], LSB first
    stream = stream.reshape(packed.shape[0], -1)[:, : cols * bits].reshape(packed.shape[0], cols, bits)
    return (stream.to(torch.int32) << torch.arange(bits, dtype=torch.int32)).sum(-1).to(torch.uint8)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization to a dense [out, in] weight."""
    codes = unpack(q.packed, q.bits).to(dtype)
    out_features, in_features = codes.shape
    codes = codes.reshape(out_features, in_features // q.group_size, q.group_size)
    w = codes * q.scales.to(dtype).unsqueeze(-1) + q.biases.to(dtype).unsqueeze(-1)
    return w.reshape(out_features, in_features)


def blob_tensors(gate_up: list[QuantizedTensor], down: list[QuantizedTensor]) -> dict[str, torch.Tensor]:
    """An expert blob's quantized tensors from a source's own codes: gate and up rows stacked into gate_up."""
    out = {}
    for name, parts in (("gate_up", gate_up), ("down", down)):
        for field in ("packed", "scales", "biases"):
            if getattr(parts[0], field) is not None:  # MXFP4 has no biases
                out[f"{name}.{field}"] = torch.cat([getattr(q, field) for q in parts])
    return out
