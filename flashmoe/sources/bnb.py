"""bitsandbytes 4-bit checkpoints (`quantization_config.quant_method == "bitsandbytes"`, load_in_4bit: the
`-bnb-4bit` releases, NF4 or FP4, with or without double quantization), as transformers saves them.

A quantized Linear is `X.weight` (uint8 [n / 2, 1]: two 4-bit codes a byte, the first in the high nibble, over the
weight flattened row by row) beside `X.weight.absmax` (one scale per `blocksize` weights), `X.weight.quant_map` (the
16 values a code stands for), `X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`: a JSON of shape, dtype, block
sizes) and, double-quantized, `X.weight.nested_absmax` and `X.weight.nested_quant_map`: the absmax then is uint8
codes of nested_quant_map, one nested_absmax per nested_blocksize of them, plus nested_offset. w = quant_map[code] x
absmax[block], bit for bit bitsandbytes' dequantize_4bit (tests/test_bnb_import.py). No store scheme holds NF4: the
weights are dequantized as read and the experts quantized to --bits, as from a float checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import FlashMoeError
from .fp8 import quantization_config

STATE = ".quant_state.bitsandbytes__"  # + nf4 / fp4
PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class BnbScheme:
    quant_type: str  # nf4 or fp4
    double_quant: bool


def bnb_scheme(raw: dict, where: str) -> BnbScheme | None:
    """config.json's bitsandbytes quantization_config (None for another checkpoint); one clear line for its 8-bit."""
    q = quantization_config(raw)
    if q is None or q.get("quant_method") != "bitsandbytes":
        return None
    if not q.get("load_in_4bit", q.get("_load_in_4bit", False)):
        raise FlashMoeError(f"{where}: bitsandbytes 8-bit (LLM.int8) checkpoints are not read; flashmoe reads its "
                            "4-bit ones (NF4, FP4): convert the original release instead")
    kind = q.get("bnb_4bit_quant_type", "fp4")
    if kind not in ("nf4", "fp4"):
        raise FlashMoeError(f"{where}: bitsandbytes 4-bit quant type {kind!r} is not nf4 or fp4")
    return BnbScheme(kind, bool(q.get("bnb_4bit_use_double_quant", False)))


@dataclass
class BnbTensor:
    """One 4-bit weight's parts (TensorInfos) and its quant state."""
    weight: object
    parts: dict  # PARTS name -> TensorInfo (the nested two only when double-quantized)
    state: dict  # the JSON: quant_type, blocksize, dtype, shape, nested_blocksize, nested_offset

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.state["shape"])

    @property
    def dtype(self) -> str:
        return DTYPES.get(self.state.get("dtype"), "BF16")

    def dequantize(self, packed: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = packed.reshape(-1)
        index = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1).long()
        absmax = parts["absmax"].float()
        if "nested_absmax" in parts:
            nested = parts["nested_absmax"].float().repeat_interleave(self.state["nested_blocksize"])
            absmax = parts["nested_quant_map"].float()[parts["absmax"].long()] * nested[: absmax.numel()]
            absmax = absmax + self.state["nested_offset"]
        scale = absmax.repeat_interleave(self.state["blocksize"])[: len(index)]  # the last block may be short
        w = parts["quant_map"].float()[index] * scale
        return w.reshape(self.shape).to({"BF16": torch.bfloat16, "F16": torch.float16}.get(self.dtype, torch.float32))


def pair(tensors: dict, name: str, read_state, scheme: BnbScheme) -> BnbTensor | None:
    """The 4-bit weight `name` ("X.weight") with its parts popped from `tensors`, or None when it has no quant state
    (a float weight). read_state(info) -> the state tensor's bytes."""
    state_info = next((tensors.pop(f"{name}{STATE}{kind}") for kind in ("nf4", "fp4")
                       if f"{name}{STATE}{kind}" in tensors), None)
    if state_info is None:
        return None
    try:
        state = json.loads(bytes(read_state(state_info)).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FlashMoeError(f"tensor {state_info.source_name} is not a bitsandbytes quant state ({exc})") from None
    parts = {p: tensors.pop(f"{name}.{p}") for p in PARTS if f"{name}.{p}" in tensors}
    weight = tensors[name]
    missing = [p for p in PARTS[: 4 if "nested_offset" in state else 2] if p not in parts]
    if missing:
        raise FlashMoeError(f"bitsandbytes tensor {weight.source_name} has no {name}.{missing[0]} beside it: the "
                            "checkpoint is incomplete")
    shape, block = state.get("shape"), state.get("blocksize")
    n = 1
    for d in shape or []:
        n *= d
    if (weight.dtype != "U8" or not shape or not block or weight.shape[0] * (weight.shape[1] if len(weight.shape) > 1
                                                                              else 1) * 2 != n
            or parts["absmax"].shape[0] != -(-n // block)):
        raise FlashMoeError(f"bitsandbytes tensor {weight.source_name} {weight.dtype}{list(weight.shape)} with absmax "
                            f"{list(parts['absmax'].shape)} does not hold its quant state's {shape} in blocks of "
                            f"{block}: the checkpoint is damaged")
    if state.get("quant_type") != scheme.quant_type:
        raise FlashMoeError(f"bitsandbytes tensor {weight.source_name} is {state.get('quant_type')}, but config.json "
                            f"says {scheme.quant_type}: the checkpoint does not match its config")
    return BnbTensor(weight, parts, state)
