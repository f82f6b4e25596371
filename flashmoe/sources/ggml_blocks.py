"""ggml block types that already are flashmoe's affine scheme, in groups of 32: their codes, scales and mins are
repacked instead of dequantized and quantized again (which would add a second rounding to the file's).

  Q8_0  w = d * q, q int8             -> 8-bit codes q + 128, scale d, bias -128 d   (exact)
  Q4_0  w = d * (q - 8)               -> 4-bit codes q, scale d, bias -8 d           (exact)
  Q4_1  w = d * q + m                 -> 4-bit codes q, scale d, bias m              (exact)
  Q4_K  w = d sc_j * q - dmin m_j     -> 4-bit codes q, scale d sc_j, bias -dmin m_j (sub-block j of 32; the products
        of an fp16 and a 6-bit integer are rounded to fp16: a relative 2^-11 of a scale, against the half step a
        requantization costs)
Codes come out in element order (ggml stores a block's low nibbles, then its high ones) and are packed flashmoe's way.

  MXFP4 (GPT-OSS's experts) -> flashmoe's mxfp4 scheme (mxfp4.py): the same e2m1 codes and e8m0 exponents (ggml's
        table holds each e2m1 value doubled and its scale is halved: the same weights), the codes reordered
"""

from __future__ import annotations

import torch

from ..quant import SCALE_DTYPE, QuantizedTensor, pack

Q4_0, Q4_1, Q8_0, Q4_K, MXFP4 = 2, 3, 8, 12, 39
REPACK_BITS = {Q4_0: 4, Q4_1: 4, Q4_K: 4, Q8_0: 8}
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34, Q4_K: 144, MXFP4: 17}
GROUP = 32


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """[nb, n] bytes -> [nb, 2n] codes: of each `run` bytes, the low nibbles, then the high ones."""
    q = qs.reshape(qs.shape[0], -1, 1, run)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(qs.shape[0], -1)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit scales and mins of Q4_K's 8 sub-blocks from its 12 bytes (ggml's get_scale_min_k4)."""
    scale = torch.cat([s[:, :4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    minimum = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return scale.float(), minimum.float()


def repack(raw: torch.Tensor, ggml_type: int, rows: int, cols: int) -> QuantizedTensor:
    """uint8 bytes of a [rows, cols] tensor of one of REPACK_BITS's types -> flashmoe's affine, group 32."""
    blocks = raw.reshape(-1, BLOCK_BYTES[ggml_type])
    if ggml_type == Q8_0:
        d = _half(blocks, 0)
        codes = (blocks[:, 2:34].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        scale, bias = d, -128 * d
    elif ggml_type == Q4_0:
        d = _half(blocks, 0)
        codes, scale, bias = _nibbles(blocks[:, 2:18], 16), d, -8 * d
    elif ggml_type == Q4_1:
        codes, scale, bias = _nibbles(blocks[:, 4:20], 16), _half(blocks, 0), _half(blocks, 2)
    else:  # Q4_K: 256 weights in 8 sub-blocks of 32
        sc, mn = _k_scales(blocks[:, 4:16])
        codes, scale, bias = _nibbles(blocks[:, 16:144], 32), _half(blocks, 0) * sc, -_half(blocks, 2) * mn
    bits = REPACK_BITS[ggml_type]
    return QuantizedTensor(pack(codes.reshape(rows, cols), bits), scale.reshape(rows, -1).to(SCALE_DTYPE),
                           bias.reshape(rows, -1).to(SCALE_DTYPE), bits, GROUP)


def repack_mxfp4(raw: torch.Tensor, rows: int, cols: int) -> QuantizedTensor:
    """uint8 bytes of a [rows, cols] MXFP4 tensor (per 32 weights: an e8m0 byte, then 16 bytes whose byte j holds
    elements j and j + 16) -> codes packed two a byte in element order, e8m0 scales [rows, cols / 32], no biases."""
    blocks = raw.reshape(-1, BLOCK_BYTES[MXFP4])
    codes = _nibbles(blocks[:, 1:], 16)
    return QuantizedTensor(pack(codes.reshape(rows, cols), 4), blocks[:, 0].reshape(rows, -1).contiguous(), None, 4,
                           GROUP)
