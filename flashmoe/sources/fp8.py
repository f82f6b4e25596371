"""FP8 block-scaled checkpoints (`quantization_config.quant_method == "fp8"`: DeepSeek-V3/R1, Kimi-K2, the Qwen3 and
Qwen3.5 `-FP8` releases): `X.weight` F8_E4M3 with `X.weight_scale_inv` F32, one scale per block of
`weight_block_size` (read from the config, never assumed), w = fp8 * scale_inv. The HF reader dequantizes them as
they are read, one tensor or one expert at a time, so the converter sees bf16 and quantizes the experts to --bits.

compressed-tensors' `float-quantized` format (llm-compressor's FP8 W8A8 exports, the `-FP8-dynamic` releases) is the
same weights with `X.weight_scale` by strategy: "channel" (one scale per output row), "tensor" (one) or "block"
(weights.block_structure). Its activation quantization (input_activations, dynamic or with `X.input_scale`) is not
applied: flashmoe runs activations in float."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FlashMoeError

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SCALE_SUFFIX = "_scale_inv"
# other tensors a static-activation FP8 checkpoint carries; flashmoe dequantizes weights and runs activations in float
ACTIVATION_SUFFIXES = (".input_scale", ".activation_scale")
READ_HERE = ("fp8", "compressed-tensors", "mxfp4", "gptq", "awq", "bitsandbytes")  # the HF quant methods flashmoe converts (hf.py pairs their parts)
KNOWN_ELSEWHERE = {"fbgemm_fp8": "FBGEMM FP8"}


def quantization_config(raw: dict) -> dict | None:
    q = raw.get("quantization_config") or raw.get("text_config", {}).get("quantization_config")
    return q if isinstance(q, dict) else None


def fp8_block_size(raw: dict) -> tuple[int, int] | None:
    """The checkpoint's FP8 block size from config.json, None for a float (or compressed-tensors) checkpoint; one
    clear line for a quantization flashmoe does not read."""
    q = quantization_config(raw)
    if q is None:
        return None
    method = q.get("quant_method")
    if method not in READ_HERE:
        named = KNOWN_ELSEWHERE.get(method, repr(method))
        raise FlashMoeError(f"config.json's quantization_config.quant_method is {named}, which flashmoe does not convert "
                            "yet; it converts bf16/fp16/fp32, FP8 block-scaled, compressed-tensors INT4/INT8/FP8/NVFP4, "
                            "GPTQ, AWQ, bitsandbytes, MXFP4 and MLX checkpoints")
    if method != "fp8":
        return None
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise FlashMoeError(f"config.json's FP8 quantization_config has weight_block_size {block!r}, not two positive "
                            "integers [rows, columns]: flashmoe needs it to dequantize (it is never assumed)")
    return block[0], block[1]


@dataclass(frozen=True)
class FloatScheme:
    """A compressed-tensors float-quantized checkpoint's FP8 weight scales."""
    strategy: str  # "channel", "tensor" or "block"
    block: tuple[int, int] | None  # the block strategy's [rows, columns]

    def block_of(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The block one scale covers in a weight of this shape: a row, the whole matrix, or the scheme's."""
        rows, cols = shape[-2:]
        return {"channel": (1, cols), "tensor": (rows, cols)}.get(self.strategy, self.block)


def compressed_fp8(raw: dict, where: str) -> FloatScheme | None:
    """config.json's compressed-tensors float-quantized quantization_config (None for another checkpoint); one clear
    line for what flashmoe does not read."""
    q = quantization_config(raw)
    if q is None or q.get("quant_method") != "compressed-tensors" or q.get("format") != "float-quantized":
        return None
    groups = q.get("config_groups")
    schemes = set()
    for name, group in (groups or {}).items():
        w = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict) or w.get("type") != "float" or w.get("num_bits") != 8:
            raise FlashMoeError(f"{where}: config_groups.{name} of a float-quantized checkpoint quantizes weights as "
                                f"{(w or {}).get('type')!r} {(w or {}).get('num_bits')!r}-bit; flashmoe reads 8-bit "
                                "float (FP8) weights")
        strategy, block = w.get("strategy"), w.get("block_structure")
        if strategy not in ("channel", "tensor", "block") or (strategy == "block" and not (
                isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block))):
            raise FlashMoeError(f"{where}: config_groups.{name} has FP8 strategy {strategy!r} (block_structure "
                                f"{block!r}); flashmoe reads 'channel', 'tensor' and 'block' with [rows, columns]")
        schemes.add(FloatScheme(strategy, tuple(block) if strategy == "block" else None))
    if len(schemes) != 1:
        raise FlashMoeError(f"{where}: a float-quantized quantization_config needs one weight scheme in its "
                            f"config_groups; it has {len(schemes)}")
    return schemes.pop()


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def check_scale(name: str, shape: tuple[int, ...], scale_shape_: tuple[int, ...], block: tuple[int, int],
                suffix: str = SCALE_SUFFIX) -> None:
    """One line when a weight's scales do not cover it in blocks of `block` (a tensor-wide [1] or [] counts as
    [1, 1], as compressed-tensors stores it)."""
    want = scale_shape(shape, block)
    if tuple(scale_shape_) != want and not (want[-2:] == (1, 1) and math.prod(scale_shape_) == math.prod(want)):
        raise FlashMoeError(f"tensor {name}{suffix} is {list(scale_shape_)}, but {name} {list(shape)} in blocks of "
                            f"{list(block)} needs {list(want)}: config.json's quantization_config does not match the "
                            "file")


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[..., R, C] fp8 and [..., ceil(R/br), ceil(C/bc)] scales -> bf16 (the last block of a row or column may be short)."""
    rows, cols = w.shape[-2:]
    scale_inv = scale_inv.reshape(scale_shape(w.shape, block))
    s = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    s = s.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (w.float() * s).to(torch.bfloat16)
