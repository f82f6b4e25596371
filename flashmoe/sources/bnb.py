"""bitsandbytes checkpoints (`quantization_config.quant_method == "bitsandbytes"`: the `-bnb-4bit` releases, NF4 or
FP4, with or without double quantization, and LLM.int8's 8-bit ones), as transformers saves them.

8-bit: `X.weight` int8 [out, in] with `X.SCB` (float32 [out]: each row's absolute maximum) and `X.weight_format`
(0: rows as they are; the GPU tile layouts are not read): w = q x SCB / 127, as bitsandbytes' int8_vectorwise_dequant
computes it (q x SCB x 7.874015718698502e-3 in float32).

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
import math
from dataclasses import dataclass

import torch

from ..errors import FlashMoeError
from ..store import SOURCE_DTYPES
from .fp8 import quantization_config

STATE = ".quant_state.bitsandbytes__"  # + nf4 / fp4
PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
INT8_STEP = 7.874015718698502e-3  # bitsandbytes' 1 / 127, as its int8_vectorwise_dequant multiplies


@dataclass(frozen=True)
class BnbScheme:
    quant_type: str  # nf4, fp4 or int8 (LLM.int8)
    double_quant: bool


def bnb_scheme(raw: dict, where: str) -> BnbScheme | None:
    """config.json's bitsandbytes quantization_config (None for another checkpoint); one clear line for its 8-bit."""
    q = quantization_config(raw)
    if q is None or q.get("quant_method") != "bitsandbytes":
        return None
    if not q.get("load_in_4bit", q.get("_load_in_4bit", False)):
        if not q.get("load_in_8bit", q.get("_load_in_8bit", False)):
            raise FlashMoeError(f"{where}: a bitsandbytes quantization_config loads neither 4 nor 8 bits")
        return BnbScheme("int8", False)
    kind = q.get("bnb_4bit_quant_type", "fp4")
    if kind not in ("nf4", "fp4"):
        raise FlashMoeError(f"{where}: bitsandbytes 4-bit quant type {kind!r} is not nf4 or fp4")
    return BnbScheme(kind, bool(q.get("bnb_4bit_use_double_quant", False)))


@dataclass
class BnbTensor:
    """One quantized weight's parts (TensorInfos) and its quant state."""
    weight_name: str  # "X.weight"
    weight: object
    parts: dict  # PARTS name -> TensorInfo (the nested two only when double-quantized); int8: "SCB"
    state: dict  # 4-bit, the JSON: quant_type, blocksize, dtype, shape, nested_blocksize, nested_offset

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.state["shape"])

    @property
    def dtype(self) -> str:
        return DTYPES.get(self.state.get("dtype"), "BF16")

    def dequantize(self, packed: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.state["quant_type"] == "int8":
            w = packed * parts["SCB"].float().view(-1, 1) * INT8_STEP
        else:
            codes = packed.reshape(-1)
            index = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1).long()
            absmax = parts["absmax"].float()
            if "nested_absmax" in parts:
                nested = parts["nested_absmax"].float().repeat_interleave(self.state["nested_blocksize"])
                absmax = parts["nested_quant_map"].float()[parts["absmax"].long()] * nested[: absmax.numel()]
                absmax = absmax + self.state["nested_offset"]
            scale = absmax.repeat_interleave(self.state["blocksize"])[: len(index)]  # the last block may be short
            w = parts["quant_map"].float()[index] * scale
        return w.reshape(self.shape).to(SOURCE_DTYPES[self.dtype])


def pair(tensors: dict, state_name: str, read, scheme: BnbScheme) -> BnbTensor:
    """The 4-bit weight whose quant state is `state_name` ("X.weight.quant_state.bitsandbytes__nf4"), with its parts
    popped from `tensors`; read(info) -> the tensor."""
    name = state_name.split(STATE)[0]
    state_info = tensors.pop(state_name)
    try:
        state = json.loads(read(state_info).numpy().tobytes().decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FlashMoeError(f"tensor {state_info.source_name} is not a bitsandbytes quant state ({exc})") from None
    parts = {p: tensors.pop(f"{name}.{p}") for p in PARTS if f"{name}.{p}" in tensors}
    weight = tensors[name]
    missing = [p for p in PARTS[: 4 if "nested_offset" in state else 2] if p not in parts]
    if missing:
        raise FlashMoeError(f"bitsandbytes tensor {weight.source_name} has no {name}.{missing[0]} beside it: the "
                            "checkpoint is incomplete")
    shape, block = state.get("shape"), state.get("blocksize")
    n = math.prod(shape or [0])
    if (weight.dtype != "U8" or not n or not block or math.prod(weight.shape) * 2 != n
            or parts["absmax"].shape[0] != -(-n // block)):
        raise FlashMoeError(f"bitsandbytes tensor {weight.source_name} {weight.dtype}{list(weight.shape)} with absmax "
                            f"{list(parts['absmax'].shape)} does not hold its quant state's {shape} in blocks of "
                            f"{block}: the checkpoint is damaged")
    if state.get("quant_type") != scheme.quant_type:
        raise FlashMoeError(f"bitsandbytes tensor {weight.source_name} is {state.get('quant_type')}, but config.json "
                            f"says {scheme.quant_type}: the checkpoint does not match its config")
    return BnbTensor(name, weight, parts, state)


def pair_int8(tensors: dict, scb_name: str, read, scheme: BnbScheme) -> BnbTensor:
    """The LLM.int8 weight whose row scales are `scb_name` ("X.SCB"), with them and its weight_format popped from
    `tensors`; read(info) -> the tensor."""
    name = scb_name.removesuffix("SCB") + "weight"
    scb = tensors.pop(scb_name)
    fmt = tensors.pop(name + "_format", None)
    weight = tensors.get(name)
    if scheme.quant_type != "int8":
        raise FlashMoeError(f"bitsandbytes tensor {scb.source_name} is LLM.int8's, but config.json says 4-bit "
                            f"{scheme.quant_type}: the checkpoint does not match its config")
    if weight is None or weight.dtype != "I8" or len(weight.shape) != 2 or scb.shape != (weight.shape[0],):
        raise FlashMoeError(f"bitsandbytes tensor {scb.source_name} {list(scb.shape)} has no int8 [rows, columns] "
                            f"{name} of {scb.shape[0] if scb.shape else '?'} rows beside it: the checkpoint is damaged")
    if fmt is not None and int(read(fmt)) != 0:
        raise FlashMoeError(f"bitsandbytes tensor {weight.source_name} is stored in a GPU tile layout "
                            f"(weight_format {int(read(fmt))}); flashmoe reads the row layout (0) transformers saves")
    return BnbTensor(name, weight, {"SCB": scb}, {"quant_type": "int8", "shape": list(weight.shape),
                                                  "dtype": "bfloat16"})
