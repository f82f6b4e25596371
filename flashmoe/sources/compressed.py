"""compressed-tensors checkpoints (`quantization_config.quant_method == "compressed-tensors"`, format "pack-quantized":
Kimi-K2-Thinking / K2.5's native INT4, llm-compressor's W4A16 and W8A16 exports).

A quantized Linear is `X.weight_packed` (int32 words, each code stored as q + 2^(bits-1) and packed little end
first), `X.weight_scale` (one per group of the input), `X.weight_shape` and, for an asymmetric scheme,
`X.weight_zero_point`: w = (q - zero_point) * scale. For 4 and 8 bits the words' bytes are flashmoe's packing, so a
symmetric group scheme with bf16/fp16 scales imports losslessly as affine: scale as stored, bias = -2^(bits-1) *
scale (a power-of-two multiple of a stored value: exact). Anything else is dequantized as read, like FP8.
Format "nvfp4-pack-quantized" (NVFP4: e2m1 codes two a byte, low nibble first, in `X.weight_packed` uint8, an e4m3
`X.weight_scale` per 16 inputs and an fp32 `X.weight_global_scale`: w = e2m1 x scale / global_scale) has no scheme in
the store: dequantized as read, its experts quantized to --bits (activations stay float).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .. import mxfp4
from ..errors import FlashMoeError
from ..quant import QuantizedTensor, unpack_codes
from .fp8 import quantization_config

PACKED, SCALE, SHAPE, ZERO_POINT, G_IDX = "_packed", "_scale", "_shape", "_zero_point", "_g_idx"
GLOBAL_SCALE = "_global_scale"  # NVFP4's per-tensor divisor of its group scales
NVFP4_GROUP = 16
REPACKED_BITS = (4, 8)  # widths whose words are flashmoe's packing (2-bit would be too, but no release uses it)
EXACT_SCALES = ("BF16", "F16")


@dataclass(frozen=True)
class IntScheme:
    """One config group's weight quantization."""
    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    targets: tuple[str, ...]
    nvfp4: bool = False  # e2m1 codes, e4m3 group scales and a global scale (format nvfp4-pack-quantized)

    def lossless(self, scale_dtype: str) -> bool:
        return (not self.nvfp4 and self.symmetric and self.group_size is not None and self.bits in REPACKED_BITS
                and scale_dtype in EXACT_SCALES)


def compressed_schemes(raw: dict, where: str) -> list[IntScheme] | None:
    """The weight schemes of config.json's compressed-tensors quantization_config (None for another checkpoint); one
    clear line for what flashmoe does not read."""
    q = quantization_config(raw)
    if q is None or q.get("quant_method") != "compressed-tensors":
        return None
    fmt = q.get("format")
    if fmt == "float-quantized":  # FP8 weights: dequantized as read (fp8.compressed_fp8)
        return None
    if fmt == "nvfp4-pack-quantized":
        return _nvfp4_schemes(q, where)
    if fmt != "pack-quantized":
        raise FlashMoeError(f"{where}: compressed-tensors format {fmt!r} is not supported yet; flashmoe reads "
                            "'pack-quantized' (integer weights, W4A16/W8A16), 'nvfp4-pack-quantized' and "
                            "'float-quantized' (FP8 weights)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise FlashMoeError(f"{where}: compressed-tensors quantization_config has no config_groups")
    out = []
    for name, group in groups.items():
        w = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict):
            raise FlashMoeError(f"{where}: config_groups.{name} has no weights scheme")
        if w.get("type", "int") != "int" or not isinstance(w.get("num_bits"), int) or not 1 <= w["num_bits"] <= 8:
            raise FlashMoeError(f"{where}: config_groups.{name} quantizes weights as {w.get('type')!r} "
                                f"{w.get('num_bits')!r}-bit; flashmoe reads integer weights of 1 to 8 bits")
        if group.get("input_activations") is not None:
            raise FlashMoeError(f"{where}: config_groups.{name} also quantizes activations; flashmoe reads "
                                "weight-only schemes (W4A16, W8A16)")
        strategy = w.get("strategy")
        if strategy not in ("group", "channel"):
            raise FlashMoeError(f"{where}: config_groups.{name} has strategy {strategy!r}; flashmoe reads 'group' "
                                "and 'channel'")
        if w.get("actorder") not in (None, "weight", "static"):
            raise FlashMoeError(f"{where}: config_groups.{name} uses activation-ordered groups "
                                f"(actorder {w['actorder']!r}); flashmoe does not read weight_g_idx yet")
        size = w.get("group_size") if strategy == "group" else None
        if strategy == "group" and not (type(size) is int and size > 0):
            raise FlashMoeError(f"{where}: config_groups.{name} has group_size {size!r}, not a positive integer")
        out.append(IntScheme(w["num_bits"], size, bool(w.get("symmetric", True)), tuple(group.get("targets") or ())))
    return out


def _nvfp4_schemes(q: dict, where: str) -> list[IntScheme]:
    out = []
    for name, group in (q.get("config_groups") or {}).items():
        w = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict) or (w.get("type"), w.get("num_bits"), w.get("group_size")) != ("float", 4, NVFP4_GROUP):
            raise FlashMoeError(f"{where}: config_groups.{name} of an nvfp4-pack-quantized checkpoint is not 4-bit float "
                                f"weights in groups of 16 ({w!r}): flashmoe reads NVFP4 as compressed-tensors writes it")
        out.append(IntScheme(4, NVFP4_GROUP, True, tuple(group.get("targets") or ()), nvfp4=True))
    if not out:
        raise FlashMoeError(f"{where}: compressed-tensors quantization_config has no config_groups")
    return out


def nvfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2], e4m3 [rows, cols / 16], fp32 [1] -> float32 [rows, cols]."""
    v = mxfp4.values(packed.reshape(-1, packed.shape[-1]))
    s = scale.float().reshape(v.shape[0], -1, 1) / global_scale.float().reshape(())
    return (v.view(v.shape[0], -1, NVFP4_GROUP) * s).reshape(*packed.shape[:-1], -1)


def scheme_for(schemes: list[IntScheme], module: str) -> IntScheme:
    """The scheme whose targets name `module`: a `re:` pattern first (compressed-tensors' own order), then a class
    name (a packed tensor is always a Linear's)."""
    for s in schemes:
        if any(t.startswith("re:") and re.match(t[3:], module) for t in s.targets):
            return s
    for s in schemes:
        if any(not t.startswith("re:") for t in s.targets):
            return s
    raise FlashMoeError(f"tensor {module}.weight_packed is quantized, but no config_groups entry targets it")


def unpack_words(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 words [..., n] -> uint8 codes [rows, cols] (the little-end bit stream of each row; GPTQ and AWQ pack
    their words the same way)."""
    b = words.contiguous().view(torch.uint8).reshape(-1, words.shape[-1] * 4)
    return unpack_codes(b, bits, cols)


@dataclass
class PackedTensor:
    """The parts of one packed weight (names inside the file) and its scheme."""
    packed: object  # TensorInfo
    scale: object
    zero_point: object | None
    scheme: IntScheme
    global_scale: object | None = None  # NVFP4's

    def quantized(self, words: torch.Tensor, scale: torch.Tensor) -> QuantizedTensor:
        """Symmetric group codes as flashmoe's affine: the same bytes, bias = -2^(bits-1) * scale."""
        packed = words.contiguous().view(torch.uint8).reshape(words.shape[-2], -1)
        bias = scale * -(1 << (self.scheme.bits - 1))
        return QuantizedTensor(packed, scale.contiguous(), bias.contiguous(), self.scheme.bits, self.scheme.group_size)

    def dequantize(self, words: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, cols: int,
                   global_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.scheme.nvfp4:  # uint8 codes, e4m3 scales: the float they stand for in bf16
            return nvfp4_dequantize(words, scale, global_scale).to(torch.bfloat16)
        bits, rows = self.scheme.bits, words.shape[-2]
        q = unpack_words(words, bits, cols).float() - (1 << (bits - 1))
        if zero_point is not None:  # packed along the output axis, with the same offset
            zp = unpack_words(zero_point.t(), bits, rows).t().float() - (1 << (bits - 1))
            zp = zp.reshape(rows, -1)
        group = cols if self.scheme.group_size is None else self.scheme.group_size
        q = q.reshape(rows, cols // group, group)
        if zero_point is not None:
            q = q - zp.unsqueeze(-1)
        return (q * scale.float().reshape(rows, -1, 1)).reshape(rows, cols).to(scale.dtype)
