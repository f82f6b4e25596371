"""Read a Hugging Face safetensors checkpoint lazily: headers first, one tensor (or one expert slice) at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FlashMoeError
from .. import fp8block, mxfp4
from ..quant import QuantizedTensor
from ..store import SOURCE_DTYPES
from .compressed import G_IDX, GLOBAL_SCALE, PACKED, SCALE, SHAPE, ZERO_POINT, IntScheme, PackedTensor, scheme_for
from . import awq, bnb, gptq
from .fp8 import ACTIVATION_SUFFIXES, FP8_DTYPES, SCALE_SUFFIX, FloatScheme, check_scale, dequantize_fp8
from .shards import Remote, Shards

# prefixes of the multimodal Qwen3.5 layout and of parts a text decoder does not use
LANGUAGE_MODEL_PREFIX = "model.language_model."
LEFT_OUT_PREFIXES = {"model.visual.": "vision tower", "mtp.": "multi-token-prediction head"}

BYTES_PER_DTYPE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U32": 4, "U8": 1, "I8": 1, "BOOL": 1,
                   "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = {"BF16", "F16", "F32"}
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"  # MXFP4 (GPT-OSS): X_blocks + X_scales


@dataclass
class TensorInfo:
    file: Path
    source_name: str  # the name inside the file
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    stored_bytes: int | None = None  # what a quantized source holds for it (sources/mlx.py), else dtype x shape

    @property
    def nbytes(self) -> int:
        if self.stored_bytes is not None:
            return self.stored_bytes
        n = BYTES_PER_DTYPE.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


def canonical_name(name: str) -> str:
    """Map the multimodal layout (model.language_model.*) onto the text-only one (model.*)."""
    if name.startswith(LANGUAGE_MODEL_PREFIX):
        return "model." + name[len(LANGUAGE_MODEL_PREFIX) :]
    return name


class Checkpoint:
    """The tensors of a checkpoint folder, by canonical name, read on demand. An FP8 block-scaled checkpoint
    (fp8_block: its weight_block_size) reads as bf16: each FP8 weight is dequantized with its scales as it is read.
    A compressed-tensors one (schemes: its config groups) reads the same way, and `quant(name)` / `get_quantized`
    hand over the codes of a weight that imports losslessly (sources/compressed.py); a GPTQ or AWQ one (qweights:
    its scheme) likewise (sources/gptq.py, sources/awq.py)."""

    def __init__(self, folder: Path, fp8_block: tuple[int, int] | None = None, schemes: list[IntScheme] | None = None,
                 remote: Remote | None = None, mxfp4: bool = False,
                 qweights: gptq.GptqScheme | awq.AwqScheme | None = None, fp8_float: FloatScheme | None = None,
                 bnb_4bit: bnb.BnbScheme | None = None):
        self.folder, self.fp8_block, self.fp8_float = folder, fp8_block, fp8_float
        self.shards = Shards(folder, remote)
        self.tensors: dict[str, TensorInfo] = {}
        self.left_out: dict[str, list[int]] = {}  # what -> [tensor count, bytes]
        self.fp8_scales: dict[str, TensorInfo] = {}  # FP8 weight -> its scale_inv
        self.fp8_dtypes: dict[str, str] = {}  # FP8 weight -> F8_E4M3 or F8_E5M2
        self.fp8_blocks: dict[str, tuple[int, int]] = {}  # FP8 weight -> the block one of its scales covers
        self.packed: dict[str, PackedTensor] = {}  # compressed-tensors weight -> its parts
        self.mx: dict[str, tuple[TensorInfo, TensorInfo]] = {}  # MXFP4 weight -> its blocks and scales
        self.qweights: dict[str, gptq.GptqTensor | awq.AwqTensor] = {}  # GPTQ / AWQ weight -> its parts
        self.bnb: dict[str, bnb.BnbTensor] = {}  # bitsandbytes 4-bit weight -> its parts
        self.keep_fp8 = False  # --bits fp8: FP8 weights hand over their codes (quant, get_quantized) as they are
        for file in self.shards.files:
            self._index_file(file)
        self._pair_fp8_scales()
        self._pair_packed(schemes)
        self._pair_mxfp4(mxfp4)
        self._pair_qweights(qweights)
        self._pair_bnb(bnb_4bit)

    def _pair_qweights(self, scheme: gptq.GptqScheme | awq.AwqScheme | None) -> None:
        """Each GPTQ / AWQ `X.qweight` with its qzeros, scales (and GPTQ's g_idx), in any shard; it then reads as
        `X.weight`."""
        names = [n for n in self.tensors if n.endswith(".qweight")]
        if names and scheme is None:
            raise FlashMoeError(f"tensor {self.tensors[names[0]].source_name} is a GPTQ/AWQ qweight, but config.json "
                                "has no GPTQ or AWQ quantization_config to read it with")
        kind = gptq if isinstance(scheme, gptq.GptqScheme) else awq
        make = gptq.GptqTensor if kind is gptq else awq.AwqTensor
        for name in names:
            base = name.removesuffix(".qweight")
            parts = {p: self.tensors.pop(f"{base}.{p}", None) for p in kind.PARTS}
            own = scheme
            if kind is gptq:  # GPTQModel's dynamic rules, by the module's name in the checkpoint
                module = parts["qweight"].source_name.removesuffix(".qweight")
                own = scheme.for_module(module)
                if own is None:
                    raise FlashMoeError(f"GPTQ tensor {parts['qweight'].source_name}: config.json's dynamic rules leave "
                                        f"{module} unquantized, but the file holds its qweight: the checkpoint does "
                                        "not match its config")
            shape = kind.check_parts(base, parts, own)
            self.qweights[base + ".weight"] = make(*(parts[p] for p in kind.PARTS), own, shape)
            stored = sum(t.nbytes for t in parts.values() if t is not None)
            self.tensors[base + ".weight"] = TensorInfo(parts["qweight"].file, parts["qweight"].source_name,
                                                        parts["scales"].dtype, shape, stored)

    def _pair_bnb(self, scheme: bnb.BnbScheme | None) -> None:
        """Each bitsandbytes 4-bit `X.weight` with its absmax, quant map, quant state (and nested ones): it then reads
        as the float weight it stands for."""
        states = [n for n in self.tensors if bnb.STATE in n or n.endswith(".SCB")]
        if states and scheme is None:
            raise FlashMoeError(f"tensor {self.tensors[states[0]].source_name} is a bitsandbytes quant state, but "
                                "config.json has no bitsandbytes quantization_config to read it with")
        for state in states:
            pair = bnb.pair_int8 if state.endswith(".SCB") else bnb.pair
            t = pair(self.tensors, state, lambda info: self._read(info, None), scheme)
            name = t.weight_name
            self.bnb[name] = t
            stored = t.weight.nbytes + sum(p.nbytes for p in t.parts.values())
            self.tensors[name] = TensorInfo(t.weight.file, t.weight.source_name, t.dtype, t.shape, stored)

    def _qweight_parts(self, name: str, index: int | None) -> list:
        return [None if t is None else self._read(t, index) for t in self.qweights[name].parts]

    def _pair_mxfp4(self, expected: bool) -> None:
        """Each MXFP4 `X_blocks` (uint8 [..., rows, cols / 32, 16]) with its `X_scales` ([..., rows, cols / 32]); it
        then reads as `X`."""
        names = [n for n in self.tensors if n.endswith(MX_BLOCKS)]
        if names and not expected:
            raise FlashMoeError(f"tensor {self.tensors[names[0]].source_name} holds MXFP4 blocks, but config.json's "
                                "quantization_config is not quant_method 'mxfp4'")
        for name in names:
            base, blocks = name.removesuffix(MX_BLOCKS), self.tensors.pop(name)
            scales = self.tensors.pop(base + MX_SCALES, None)
            if scales is None:
                raise FlashMoeError(f"MXFP4 tensor {blocks.source_name} has no {base}{MX_SCALES} beside it: the "
                                    "checkpoint is incomplete")
            if (blocks.dtype, scales.dtype) != ("U8", "U8") or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
                raise FlashMoeError(f"MXFP4 tensor {blocks.source_name} is {blocks.dtype}{list(blocks.shape)} with scales "
                                    f"{scales.dtype}{list(scales.shape)}; expected uint8 [..., rows, cols / 32, 16] and "
                                    "uint8 [..., rows, cols / 32]")
            self.mx[base] = (blocks, scales)
            shape = (*blocks.shape[:-2], blocks.shape[-2] * 32)
            self.tensors[base] = TensorInfo(blocks.file, blocks.source_name, "BF16", shape, blocks.nbytes + scales.nbytes)

    def _pair_packed(self, schemes: list[IntScheme] | None) -> None:
        """Each `X.weight_packed` with its scale (and zero point) in any shard; it then reads as `X.weight`."""
        names = [n for n in self.tensors if n.endswith(PACKED)]
        if names and schemes is None:
            raise FlashMoeError(f"tensor {self.tensors[names[0]].source_name} is packed, but config.json has no "
                                "compressed-tensors quantization_config to read it with")
        for name in names:
            base = name.removesuffix(PACKED)  # "X.weight"
            packed = self.tensors.pop(name)
            scale, shape, zero_point = (self.tensors.pop(base + s, None) for s in (SCALE, SHAPE, ZERO_POINT))
            if self.tensors.pop(base + G_IDX, None) is not None:
                raise FlashMoeError(f"tensor {packed.source_name} has activation-ordered groups ({base}{G_IDX}); "
                                    "flashmoe does not read them yet")
            scheme = scheme_for(schemes, packed.source_name.removesuffix(".weight" + PACKED))
            if scheme.nvfp4:
                self._pair_nvfp4(base, packed, scale, scheme)
                continue
            if scale is None or shape is None:
                raise FlashMoeError(f"tensor {packed.source_name} has no {base}{SCALE if scale is None else SHAPE} "
                                    "beside it: the checkpoint is incomplete")
            dims = tuple(int(d) for d in self._read(shape, None).tolist())
            rows, cols = dims[-2:]
            group = cols if scheme.group_size is None else scheme.group_size
            want_words = -(-cols * scheme.bits // 32)
            if (packed.dtype != "I32" or packed.shape != (*dims[:-1], want_words) or cols % group
                    or scale.shape != (*dims[:-1], cols // group)):
                raise FlashMoeError(f"tensor {packed.source_name} {packed.dtype}{list(packed.shape)} with scales "
                                    f"{list(scale.shape)} does not hold a {list(dims)} weight at {scheme.bits} bits in "
                                    f"groups of {group}: config.json's quantization_config does not match the file")
            if scheme.symmetric != (zero_point is None):
                raise FlashMoeError(f"tensor {packed.source_name}: its scheme is {'a' if scheme.symmetric else 'not'} "
                                    f"symmetric but it has {'a' if zero_point else 'no'} {base}{ZERO_POINT}")
            self.packed[base] = PackedTensor(packed, scale, zero_point, scheme)
            stored = sum(t.nbytes for t in (packed, scale, zero_point) if t is not None)
            self.tensors[base] = TensorInfo(packed.file, packed.source_name, scale.dtype, dims, stored)

    def _pair_nvfp4(self, base: str, packed: TensorInfo, scale: TensorInfo | None, scheme: IntScheme) -> None:
        """An NVFP4 weight: uint8 codes [out, in / 2], its e4m3 scales [out, in / 16] and global scale; read as bf16."""
        global_scale = self.tensors.pop(base + GLOBAL_SCALE, None)
        if scale is None or global_scale is None:
            missing = SCALE if scale is None else GLOBAL_SCALE
            raise FlashMoeError(f"tensor {packed.source_name} has no {base}{missing} beside it: the checkpoint is "
                                "incomplete")
        dims = (*packed.shape[:-1], packed.shape[-1] * 2)
        if (packed.dtype != "U8" or scale.dtype != "F8_E4M3" or scale.shape != (*dims[:-1], dims[-1] // 16)
                or dims[-1] % 16 or math.prod(global_scale.shape) != 1):
            raise FlashMoeError(f"tensor {packed.source_name} {packed.dtype}{list(packed.shape)} with scales "
                                f"{scale.dtype}{list(scale.shape)} and global scale {list(global_scale.shape)} is not "
                                "NVFP4 (uint8 codes, e4m3 scales per 16 inputs, one global scale): config.json's "
                                "quantization_config does not match the file")
        self.packed[base] = PackedTensor(packed, scale, None, scheme, global_scale)
        stored = packed.nbytes + scale.nbytes + global_scale.nbytes
        self.tensors[base] = TensorInfo(packed.file, packed.source_name, "BF16", dims, stored)

    def quant(self, name: str) -> tuple[int, int] | None:
        """(bits, group_size) of a weight whose codes import as they are, else None (float, or dequantized as read)."""
        if name in self.mx:
            return 4, mxfp4.GROUP
        if self.keep_fp8 and name in self.fp8_scales:
            return 8, self.fp8_block[1]
        g = self.qweights.get(name)
        if g is not None:
            return (g.scheme.bits, g.group) if g.repackable() else None
        p = self.packed.get(name)
        return (p.scheme.bits, p.scheme.group_size) if p and p.scheme.lossless(p.scale.dtype) else None

    def scale_dtype_of(self, name: str) -> torch.dtype:
        """The dtype of the scales a repacked weight keeps (MXFP4's e8m0 exponents are uint8)."""
        if name in self.mx:
            return torch.uint8
        if name in self.fp8_scales:
            return torch.float32
        # (a GPTQ / AWQ weight's TensorInfo carries its scales' dtype)
        return SOURCE_DTYPES[self.packed[name].scale.dtype if name in self.packed else self.tensors[name].dtype]

    def get_quantized(self, name: str, index: int | None = None) -> QuantizedTensor:
        if name in self.mx:  # MXFP4: the codes as they are, e8m0 scales, no biases
            blocks, scales = (self._read(t, index) for t in self.mx[name])
            return QuantizedTensor(blocks.reshape(*blocks.shape[:-2], -1), scales, None, 4, mxfp4.GROUP)
        if name in self.fp8_scales:  # FP8 kept: e4m3 bytes, each row's block scales
            return fp8block.from_blocks(self._read(self._fp8_info(name), index),
                                        self._read(self.fp8_scales[name], index), self.fp8_block)
        if name in self.qweights:
            return self.qweights[name].quantized(*self._qweight_parts(name, index))
        p = self.packed[name]
        return p.quantized(self._read(p.packed, index), self._read(p.scale, index))

    def _pair_fp8_scales(self) -> None:
        """Each FP8 weight with its scales (in any shard); the weight then reads as the bf16 it stands for."""
        for name in [n for n in self.tensors if n.endswith(ACTIVATION_SUFFIXES)]:
            del self.tensors[name]
        scales = {n.removesuffix(SCALE_SUFFIX): self.tensors.pop(n) for n in list(self.tensors) if n.endswith(SCALE_SUFFIX)}
        for name, info in list(self.tensors.items()):
            if info.dtype not in FP8_DTYPES:
                continue
            if name.endswith(SCALE) and name.removesuffix(SCALE) + PACKED in self.tensors:
                continue  # an NVFP4 weight's e4m3 group scales (_pair_packed)
            if self.fp8_block is None and self.fp8_float is None:
                raise FlashMoeError(f"tensor {info.source_name} is {info.dtype}, but config.json has no FP8 "
                                    "quantization_config (quant_method 'fp8', weight_block_size; or compressed-tensors "
                                    "float-quantized) to read it with")
            if self.fp8_float is not None:  # compressed-tensors: X.weight_scale, its block by the strategy
                suffix, block = "_scale", self.fp8_float.block_of(info.shape)
                scale = self.tensors.pop(name + suffix, None)
            else:
                suffix, block = SCALE_SUFFIX, self.fp8_block
                scale = scales.pop(name, None)
            if scale is None:
                raise FlashMoeError(f"FP8 tensor {info.source_name} has no {info.source_name}{suffix} beside it: "
                                    "the checkpoint is incomplete")
            check_scale(info.source_name, info.shape, scale.shape, block, suffix)
            self.fp8_scales[name] = scale
            self.fp8_blocks[name] = block
            self.fp8_dtypes[name] = info.dtype
            self.tensors[name] = TensorInfo(info.file, info.source_name, "BF16", info.shape, info.nbytes + scale.nbytes)

    def _index_file(self, file: Path) -> None:
        for key, dtype, shape in self.shards.entries(file):
            info = TensorInfo(file, key, dtype, shape)
            left_out = next((what for p, what in LEFT_OUT_PREFIXES.items() if key.startswith(p)), None)
            if left_out:
                count = self.left_out.setdefault(left_out, [0, 0])
                count[0] += 1
                count[1] += info.nbytes
                continue
            self.tensors[canonical_name(key)] = info

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def _read(self, info: TensorInfo, index: int | None) -> torch.Tensor:
        return self.shards.read(info.file, info.source_name, index)

    def _fp8_info(self, name: str) -> TensorInfo:
        info = self.tensors[name]
        if self.fp8_dtypes[name] != "F8_E4M3":
            raise FlashMoeError(f"tensor {info.source_name} is {self.fp8_dtypes[name]}; --bits fp8 keeps e4m3 weights: "
                                "convert with --bits 4 or 8 instead")
        return info

    def files_of(self, name: str) -> set[Path]:
        """The files a tensor is read from (an FP8 weight's scales or a packed weight's parts may lie elsewhere)."""
        parts = [self.tensors[name], self.fp8_scales.get(name), *self.mx.get(name, ())]
        if name in self.packed:
            p = self.packed[name]
            parts += [p.packed, p.scale, p.zero_point, p.global_scale]
        if name in self.qweights:
            parts += list(self.qweights[name].parts)
        if name in self.bnb:
            parts += list(self.bnb[name].parts.values())
        return {t.file for t in parts if t is not None}

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """A tensor (or its slice `index` along the first axis), FP8 and packed ones dequantized."""
        info = self.tensors[name]
        if name in self.mx:
            q = self.get_quantized(name, index)
            return mxfp4.dequantize(q.packed.reshape(-1, q.packed.shape[-1]), q.scales.reshape(-1, q.scales.shape[-1]),
                                    torch.bfloat16).reshape(info.shape if index is None else info.shape[1:])
        if name in self.qweights:
            return self.qweights[name].dequantize(*self._qweight_parts(name, index))
        if name in self.bnb:
            t = self.bnb[name]
            return t.dequantize(self._read(t.weight, None), {k: self._read(v, None) for k, v in t.parts.items()})
        if name in self.packed:
            p = self.packed[name]
            zero_point = None if p.zero_point is None else self._read(p.zero_point, index)
            global_scale = None if p.global_scale is None else self._read(p.global_scale, None)
            return p.dequantize(self._read(p.packed, index), self._read(p.scale, index), zero_point, info.shape[-1],
                                global_scale)
        if name in self.fp8_scales:
            return dequantize_fp8(self._read(info, index), self._read(self.fp8_scales[name], index),
                                  self.fp8_blocks[name])
        return self._read(info, index)

    def get_row(self, name: str, index: int) -> torch.Tensor:
        """One slice along the first axis (one expert of a fused [experts, ...] tensor) without reading the rest."""
        return self.get(name, index)

    def close(self) -> None:
        self.shards.close()
