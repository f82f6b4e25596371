"""Experts and resident matrices on the CPU through torch's int4 kernel, which reads packed codes (no float copy).

torch's `_weight_int4pack_mm_for_cpu` computes x @ ((q - 8) * scale + zero)^T per group of the input dimension with
vectorised bf16 (its fp16 and fp32 versions are scalar loops: 11x and 160x slower on an AVX2 machine). Our affine
codes map onto it exactly: zero = bias + 8 * scale. A 2-bit code q is the int4 code q + 8 with zero = bias. An 8-bit
code is 16 * high + low, so an 8-bit [N, K] matrix is one int4 matrix of 2N rows, the high nibbles' (scale 16s) above
the low ones' (s): one kernel call, whose two output halves add up to the product; their zeros add up to b + 136s, one
of them exact and the other rounded (prepare() picks the split that rounds the smaller value).

An expert is prepared once, when its read lands, into the RAM slot that caches it ("kernel form"): torch's packed
layout (which depends on the machine's vector width) and bf16 scale/zero pairs. bf16 rounds a scale by up to 2^-9
of itself, the same for a whole group: measured on random experts (tests/test_cpu_int4.py holds the bounds), the
kernel form adds under a tenth of the store's own quantization error at 2 and 4 bits, and at 8 bits 0.5-0.7x of it
(the tests bound it at 1x). llama.cpp's CPU path trades the same way: it rounds the activations to 8 bits for speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .. import mxfp4
from ..quant import QuantizedTensor, quantize, unpack
from .affine import AffineMatrix, RowStack
from .cpu_native import NativeMatrix
from .moe import PLAIN, ExpertMath
from ..store import BLOCK_BYTES, SEGMENT_ALIGN, BlobLayout, round_up

GROUP_SIZES = (32, 64, 128, 256)  # the kernel's K-blocks


def supported(bits: int | None, group_size: int | None, hidden: int, inter: int) -> bool:
    """Whether the int4 kernel can run a store's experts ([2I, H] and [H, I] matrices); else they are dequantized."""
    if bits is None or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    return _fits(2 * inter, hidden, group_size) and _fits(hidden, inter, group_size)


def _fits(n: int, k: int, group_size: int) -> bool:
    """Whether the kernel takes an [n, k] matrix: it tiles the output rows by 16 and the input by whole groups of a
    size it knows, and our packing must be torch's for this shape."""
    return group_size in GROUP_SIZES and n % 16 == 0 and k % group_size == 0 and _layout_for(n, k) is not None


def _rows(bits: int) -> int:
    """Kernel rows per matrix row: an 8-bit row is a high-nibble row and a low-nibble row."""
    return 2 if bits == 8 else 1


@dataclass(frozen=True)
class KernelForm:
    """An expert's kernel form and where it sits in its RAM slot: per matrix, int4 codes uint8 [N, K/2] in torch's
    layout and scale/zero pairs bf16 [K/group, N, 2] (N doubled at 8 bits: high-nibble rows, then low). The fetcher
    sizes RAM slots by `slot_bytes` and calls `prepare(slot)` on each blob as it lands; `forward(x, slot)` then runs
    the expert."""

    blob: BlobLayout
    fields: dict[str, tuple[int, tuple[int, ...], torch.dtype]]
    nbytes: int
    bits: int
    group_size: int
    expert_math: ExpertMath = PLAIN  # GPT-OSS: the output biases (kept float32 beside the codes) and the clamped SwiGLU

    @classmethod
    def for_store(cls, blob: BlobLayout, hidden: int, inter: int, bits: int | None, group_size: int | None,
                  expert_math: ExpertMath = PLAIN) -> "KernelForm | None":
        """None when the int4 kernel cannot run these experts (they are then dequantized per token). MXFP4 blobs (no
        quantization biases) run as 8-bit affine."""
        segments = {seg.name: seg for seg in blob.segments} if blob is not None else {}
        if bits is not None and segments and "gate_up.biases" not in segments:
            if segments["gate_up.scales"].dtype != "uint8":  # FP8: not a uniform grid
                return None
            bits = 8
        if not supported(bits, group_size, hidden, inter):
            return None
        fields, offset = {}, 0
        for name, (n, k) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
            rows = _rows(bits) * n
            for part, shape, dtype in (("int4", (rows, k // 2), torch.uint8),
                                       ("scale_zero", (k // group_size, rows, 2), torch.bfloat16)):
                fields[f"{name}.{part}"] = (offset, shape, dtype)
                offset = round_up(offset + math.prod(shape) * dtype.itemsize, SEGMENT_ALIGN)
            if "gate_up.bias" in segments:
                fields[f"{name}.bias"] = (offset, (n,), torch.float32)
                offset = round_up(offset + n * 4, SEGMENT_ALIGN)
        return cls(blob, fields, round_up(offset, BLOCK_BYTES), bits, group_size, expert_math)

    @property
    def slot_bytes(self) -> int:
        """A slot holds the blob as read, then the kernel form."""
        return max(self.nbytes, self.blob.blob_bytes)

    def views(self, slot: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: slot[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for name, (offset, shape, dtype) in self.fields.items()}

    def prepare(self, slot: torch.Tensor) -> None:
        """The blob at the start of `slot` -> its kernel form, in the same slot (an MXFP4 blob's as the 8-bit affine
        matrices it equals)."""
        raw = self.blob.unpack(slot[: self.blob.blob_bytes].clone())
        for name in ("gate_up", "down"):
            if f"{name}.biases" not in raw:
                q = mxfp4.as_affine8(raw.pop(f"{name}.packed"), raw.pop(f"{name}.scales"))
                raw.update({f"{name}.packed": q.packed, f"{name}.scales": q.scales, f"{name}.biases": q.biases})
        views = self.views(slot)
        prepare(raw, self.bits, views)
        for name in ("gate_up.bias", "down.bias"):
            if name in views:
                views[name].copy_(raw[name])

    def forward(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        return expert_forward(x, self.views(slot), self.bits, self.group_size, self.expert_math)


# ---- torch's packed layout ------------------------------------------------------------------------
def _pairs(codes: torch.Tensor) -> torch.Tensor:
    """Rows (n, n+1) share a byte, row n in the low nibble; per column k: [K, rows / 2]."""
    c = codes.view(-1, 2, codes.shape[1])
    return (c[:, 0] | (c[:, 1] << 4)).t()


def _lanes(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Whole blocks of `block` rows, 16-row lanes paired (lane i with lane i + block/32), per block and column:
    [blocks, K, block / 2]."""
    lanes = codes.view(-1, 2, block // 32, 16, codes.shape[1])
    return (lanes[:, 0] | (lanes[:, 1] << 4)).permute(0, 3, 1, 2).reshape(-1, codes.shape[1], block // 2)


def _candidate_pack(codes: torch.Tensor, block: int, lane_paired: bool) -> torch.Tensor:
    n, k = codes.shape
    whole = n - n % block
    parts = []
    if whole:  # every whole block in one go
        blocks = codes[:whole]
        if lane_paired:
            parts.append(_lanes(blocks, block).reshape(-1))
        else:
            c = blocks.view(-1, block // 2, 2, k)
            parts.append((c[:, :, 0] | (c[:, :, 1] << 4)).transpose(1, 2).reshape(-1))
    if whole < n:  # a last, partial block pairs adjacent rows
        parts.append(_pairs(codes[whole:]).reshape(-1))
    return torch.cat(parts).view(n, k // 2) if len(parts) > 1 else parts[0].view(n, k // 2)


# (block of rows, whether full blocks pair 16-row lanes): AVX512, AVX2, scalar builds of torch's weight_to_int4pack
_LAYOUTS = ((64, True), (32, True), (32, False))


@lru_cache(maxsize=None)
def _layout_for(n: int, k: int) -> tuple[int, bool] | None:
    """The layout that torch's own packing op produces on this machine for [n, k], found by comparing on random
    codes; None: none of ours matches, so every expert goes through the op (slower, always right)."""
    probe = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n * 7 + k))
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    for layout in _LAYOUTS:
        if torch.equal(_candidate_pack(probe, *layout), want):
            return layout
    return None


def int4pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (each < 16) -> torch's CPU int4 layout [N, K/2], as its packing op writes it."""
    return _candidate_pack(codes, *_layout_for(*codes.shape))


def int4unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of int4pack: torch's layout [N, K/2] -> uint8 codes [N, K]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    block, lane_paired = _layout_for(n, k)
    flat, parts = packed.reshape(-1), []
    for start in range(0, n, block):
        rows = min(block, n - start)
        b = flat[start * k // 2 : (start + rows) * k // 2]
        if rows == block and lane_paired:  # [K, lane pairs, 16] -> [2, lane pairs, 16, K]
            b = b.view(k, block // 32, 16).permute(1, 2, 0)
            parts.append(torch.stack([b & 15, b >> 4]).reshape(block, k))
        else:  # [K, rows / 2] -> [rows / 2, 2, K]
            b = b.view(k, rows // 2).t()
            parts.append(torch.stack([b & 15, b >> 4], dim=1).reshape(rows, k))
    return torch.cat(parts)


# ---- preparing an expert ------------------------------------------------------------------------
def prepare(raw: dict[str, torch.Tensor], bits: int, out: dict[str, torch.Tensor],
            names: tuple[str, ...] = ("gate_up", "down")) -> None:
    """Quantized matrices (`{name}.packed/.scales/.biases`, as in a store blob) -> their kernel form, written into
    `out` (views of a slot). `raw` must not overlap `out`."""
    for name in names:
        codes = unpack(raw[f"{name}.packed"], bits)
        scale, bias = raw[f"{name}.scales"].float().t(), raw[f"{name}.biases"].float().t()  # [K/group, N]
        if bits == 8:  # high rows, then low rows; the zeros must add up to b + 136s
            c = torch.cat([codes >> 4, codes & 15])
            # one of them exact (128s, or 0), the other rounded to bf16: whichever leaves the smaller one to round,
            # b + 8s or b + 136s (a symmetric group's b is about -127.5s: 8.5s to round instead of 119.5s)
            low_zero = bias + 8 * scale
            whole = (bias + 136 * scale).abs() < low_zero.abs()
            z_high = torch.where(whole, bias + 136 * scale, 128 * scale)
            s, z = torch.cat([16 * scale, scale], dim=1), torch.cat([z_high, torch.where(whole, 0.0, low_zero)], dim=1)
        elif bits == 2:  # codes 8..11: the zero is the bias itself, whose bf16 rounding is 10x smaller than b + 8s's
            c, s, z = codes + 8, scale, bias
        else:
            c, s, z = codes, scale, bias + 8 * scale
        out[f"{name}.int4"].copy_(int4pack(c))
        sz = out[f"{name}.scale_zero"]
        sz[..., 0].copy_(s)
        sz[..., 1].copy_(z)


# ---- running experts ----------------------------------------------------------------------------
# above this many rows, dequantizing to float32 and one GEMM beats the int4 kernel (1024x2048 at 4 bits, 2 AVX2
# cores: 64 rows 4.9 ms vs 9.4 ms, 256 rows 19.7 ms vs 14.7 ms)
KERNEL_MAX_ROWS = 128


def dequantize(form: dict[str, torch.Tensor], name: str, bits: int, group_size: int) -> torch.Tensor:
    """The kernel form of matrix `name` -> float32 [N, K], exactly what the kernel multiplies by."""
    codes = int4unpack(form[f"{name}.int4"]).float()
    rows, k = codes.shape
    sz = form[f"{name}.scale_zero"].float().transpose(0, 1)  # [rows, K/group, 2]
    w = ((codes.view(rows, k // group_size, group_size) - 8) * sz[..., :1] + sz[..., 1:]).view(rows, k)
    return w.view(_rows(bits), -1, k).sum(0)


def linear(x: torch.Tensor, form: dict[str, torch.Tensor], name: str, bits: int, group_size: int) -> torch.Tensor:
    """x [T, K] bf16 @ the dequantized matrix `name`^T -> [T, N] bf16."""
    if x.shape[0] > KERNEL_MAX_ROWS:
        return F.linear(x.float(), dequantize(form, name, bits, group_size)).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, form[f"{name}.int4"], group_size, form[f"{name}.scale_zero"])
    if bits == 8:
        high, low = y.float().chunk(2, dim=-1)
        return (high + low).to(torch.bfloat16)
    return y


def expert_forward(x: torch.Tensor, form: dict[str, torch.Tensor], bits: int, group_size: int,
                   expert_math: ExpertMath = PLAIN) -> torch.Tensor:
    """One expert's SwiGLU MLP on rows x [T, H] (any float dtype) -> [T, H] in x's dtype; with the form's output
    biases and `expert_math`'s activation where it has them (GPT-OSS)."""
    h = linear(x.to(torch.bfloat16).contiguous(), form, "gate_up", bits, group_size).float()
    if "gate_up.bias" in form:
        h = h + form["gate_up.bias"]
    gate, up = h.chunk(2, dim=-1)
    y = linear(expert_math.activation(gate, up).to(torch.bfloat16), form, "down", bits, group_size)
    return (y.float() + form["down.bias"] if "down.bias" in form else y).to(x.dtype)


# ---- resident matrices --------------------------------------------------------------------------
@dataclass
class PackedMatrix:
    """A resident [N, K] weight in the kernel form (quantized at load, group-wise affine as the store's experts):
    matrix-vector products read 1.25 bytes a weight at 8 bits (0.63 at 4) instead of float32's 4."""

    form: dict[str, torch.Tensor]
    bits: int
    group_size: int
    shape: tuple[int, int]

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int) -> "PackedMatrix | None":
        """None when the kernel cannot take the shape (rows not a multiple of 16, or the groups do not divide K)."""
        n, k = weight.shape
        if not _fits(n, k, group_size):
            return None
        return cls.from_quantized(quantize(weight, bits, group_size))

    @classmethod
    def from_quantized(cls, q: QuantizedTensor) -> "PackedMatrix | None":
        """A matrix kept quantized in the store (MLX imports), its codes as they are; None when the kernel cannot
        take its shape."""
        (n, k), bits, group_size = q.shape, q.bits, q.group_size
        if q.packed.device.type != "cpu" or not _fits(n, k, group_size):
            return None
        rows = _rows(bits) * n
        form = {"w.int4": torch.empty(rows, k // 2, dtype=torch.uint8),
                "w.scale_zero": torch.empty(k // group_size, rows, 2, dtype=torch.bfloat16)}
        prepare({"w.packed": q.packed, "w.scales": q.scales, "w.biases": q.biases}, bits, form, names=("w",))
        return cls(form, bits, group_size, (n, k))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        rows = x.reshape(-1, self.shape[1])
        y = linear(rows.to(torch.bfloat16).contiguous(), self.form, "w", self.bits, self.group_size)
        return y.to(x.dtype).view(*x.shape[:-1], self.shape[0])


@dataclass
class Bf16Matrix:
    """A resident weight kept in bf16 (half float32's bytes) under float32 activations: one token multiplies in bf16;
    many tokens upcast the weight and run one float32 GEMM (bf16 GEMMs are 7x slower than float32 on CPUs without
    bf16 instructions: 512x2048 by 2048x3072, 300 ms vs 42 ms on 2 AVX2 cores)."""

    weight: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if rows > KERNEL_MAX_ROWS:
            return F.linear(x.float(), self.weight.float()).to(x.dtype)
        return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


RESIDENT_FORMATS = ("float", "bf16", "int8", "int4")


def compress_matrix(weight, resident_format: str):
    """A resident projection weight in `resident_format` (see RESIDENT_FORMATS), multiplied by our kernels
    (kernels/cpu_native.py) where they are built, else by torch's int4 one; shapes neither takes stay float. A matrix
    the store keeps quantized keeps its own codes (our form or the kernel form, else dequantized once)."""
    if isinstance(weight, RowStack):
        return RowStack([compress_matrix(p, resident_format) for p in weight.parts])
    if isinstance(weight, AffineMatrix):
        packed = NativeMatrix.from_quantized(weight.q) or PackedMatrix.from_quantized(weight.q)
        return weight.dequantize() if packed is None else packed
    if resident_format == "bf16":
        return Bf16Matrix(weight.to(torch.bfloat16))
    if resident_format in ("int8", "int4"):
        bits = 8 if resident_format == "int8" else 4
        packed = NativeMatrix.from_float(weight, bits, 32) or PackedMatrix.from_float(weight, bits, 32)
        return weight if packed is None else packed
    return weight
