"""FP8 experts kept as they are (`flashmoe convert SRC DST --bits fp8` on an FP8 block-scaled checkpoint): e4m3 codes,
one a byte, and each row's scale for every group of weight_block_size[1] columns (its block's scale_inv, repeated
down the block's rows) in float32. Store scheme "fp8": `{name}.packed` uint8 [rows, cols], `{name}.scales` float32
[rows, cols / group], no biases. The GPU's expert kernels decode e4m3 (kernels/moe_triton.py, SCALE_KIND 3); the CPU
dequantizes an expert when it runs (e4m3's values are not a uniform grid, so torch's int4 kernel cannot take them)."""

from __future__ import annotations

import torch

from .quant import QuantizedTensor


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    group = packed.shape[1] // scales.shape[1]
    w = packed.view(torch.float8_e4m3fn).float() * scales.float().repeat_interleave(group, dim=1)
    return w.to(dtype)


def from_blocks(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> QuantizedTensor:
    """An FP8 [rows, cols] weight and its [ceil(rows / br), cols / bc] block scales -> codes as bytes, row scales."""
    rows = codes.shape[0]
    scales = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].contiguous()
    return QuantizedTensor(codes.contiguous().view(torch.uint8), scales, None, 8, block[1])
