"""AWQ checkpoints (`quantization_config.quant_method == "awq"`, version "gemm": AutoAWQ's exports, the `-AWQ` releases
vLLM users download).

A quantized Linear X is `X.qweight` (int32 [in, out * bits / 32]: the codes of 8 outputs a word, in AWQ's order
0 2 4 6 1 3 5 7 from the low nibble), `X.qzeros` (int32 [groups, out * bits / 32], the same packing) and `X.scales`
([groups, out], fp16): w[o, i] = (q[i, o] - z[i / group, o]) * s[i / group, o]. Repacked as flashmoe's affine like an
asymmetric GPTQ weight (gptq.affine_from_zeros): codes put back in output order and transposed into rows, scale as
stored, bias = -zero * scale rounded to fp16 (within 2^-11 of it: under 1% of a 4-bit step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FlashMoeError
from ..quant import QuantizedTensor
from .fp8 import quantization_config
from .compressed import EXACT_SCALES, unpack_words
from .gptq import affine_from_zeros, weights_from_zeros

PARTS = ("qweight", "qzeros", "scales")
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output j of a word's 8 sits at nibble ORDER.index(j)


@dataclass(frozen=True)
class AwqScheme:
    bits: int
    group_size: int


def awq_scheme(raw: dict, where: str) -> AwqScheme | None:
    """config.json's AWQ quantization_config as a scheme (None for another checkpoint); one clear line for what
    flashmoe does not read."""
    q = quantization_config(raw)
    if q is None or q.get("quant_method") != "awq":
        return None
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise FlashMoeError(f"{where}: AWQ version {version!r} is not read (flashmoe reads 'gemm', AutoAWQ's default); "
                            "convert the original release instead")
    bits, zero_point = q.get("bits", q.get("w_bit")), q.get("zero_point", True)
    if bits != 4 or not zero_point:
        raise FlashMoeError(f"{where}: AWQ at {bits!r} bits{'' if zero_point else ' without zero points'} is not read "
                            "(flashmoe reads AutoAWQ's 4-bit GEMM format with zero points)")
    group = q.get("group_size", q.get("q_group_size"))
    if type(group) is not int or group <= 0:
        raise FlashMoeError(f"{where}: AWQ group_size {group!r} is not a positive integer")
    return AwqScheme(4, group)


def _in_output_order(words: torch.Tensor, count: int) -> torch.Tensor:
    """int32 [rows, n] of AWQ-ordered 4-bit codes -> uint8 [rows, count] in output order."""
    codes = unpack_words(words, 4, count)  # nibble order
    back = torch.tensor([ORDER.index(j) for j in range(8)])
    return codes.view(codes.shape[0], -1, 8)[:, :, back].reshape(codes.shape[0], count)


@dataclass
class AwqTensor:
    """One AWQ weight's parts (TensorInfos inside the files) and the scheme; [out, in] = shape."""
    qweight: object
    qzeros: object
    scales: object
    scheme: AwqScheme
    shape: tuple[int, int]

    @property
    def group(self) -> int:
        return self.scheme.group_size

    @property
    def parts(self) -> tuple:
        return self.qweight, self.qzeros, self.scales

    def repackable(self) -> bool:
        return self.scales.dtype in EXACT_SCALES

    def codes_and_zeros(self, qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 codes [out, in] and float zeros [groups, out]."""
        rows = self.shape[0]
        return _in_output_order(qweight, rows).t().contiguous(), _in_output_order(qzeros, rows).float()

    def quantized(self, qweight, qzeros, scales) -> QuantizedTensor:
        codes, zeros = self.codes_and_zeros(qweight, qzeros)
        return affine_from_zeros(codes, zeros, scales, 4, self.group)

    def dequantize(self, qweight, qzeros, scales) -> torch.Tensor:
        return weights_from_zeros(*self.codes_and_zeros(qweight, qzeros), scales,
                                  torch.arange(self.shape[1]) // self.group)


def check_parts(name: str, parts: dict, scheme: AwqScheme) -> tuple[int, int]:
    """The [out, in] shape an AWQ weight's parts hold, or one clear line on what does not fit."""
    missing = [p for p in PARTS if parts.get(p) is None]
    if missing:
        raise FlashMoeError(f"AWQ tensor {name}.qweight has no {name}.{missing[0]} beside it: the checkpoint is "
                            "incomplete")
    qweight, qzeros, scales = (parts[p] for p in PARTS)
    cols, rows = qweight.shape[0], qweight.shape[1] * 8
    if (qweight.dtype != "I32" or qzeros.dtype != "I32" or cols % scheme.group_size
            or scales.shape != (cols // scheme.group_size, rows) or qzeros.shape != (cols // scheme.group_size, rows // 8)):
        raise FlashMoeError(f"AWQ tensor {name}: qweight {qweight.dtype}{list(qweight.shape)}, qzeros "
                            f"{qzeros.dtype}{list(qzeros.shape)}, scales {list(scales.shape)} do not hold a 4-bit weight "
                            f"in groups of {scheme.group_size}: config.json's quantization_config does not match the file")
    return rows, cols
