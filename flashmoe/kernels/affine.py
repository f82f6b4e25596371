"""Resident matrices kept quantized, as an MLX checkpoint has them (group-wise affine codes, scales, biases), and the
forms the model treats like weight tensors through kernels/linear.py: `linear`, `embedding`, `cat_rows`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..quant import SCALE_DTYPE, QuantizedTensor, dequantize, quantize
from . import dot4_gemv, resident_mm
from . import moe_triton as mt

GEMV_MAX_ROWS = 2  # the GPU's matrix-vector kernel reads the matrix once per row of x; up to mt.GEMM_MAX_ROWS
# (a decode batch) one tensor-core kernel reads it once for all (resident_mm; mt.affine_gemm where it cannot);
# past it (prompts), dequantized slices
# dot4's reach in a batch (resident_gemv.py --rows, H200, RESULTS.md): at 8 rows resident_mm beat it on the 397B
# step's matrices but one (the head 427 against 977 us, 4096x8192 41 against 56; 2561x4096 25 against 18)
DOT4_MAX_ROWS = 4
DEQUANT_CHUNK_ELEMENTS = 1 << 26  # a GEMM's dequantized float32 slice at most 256 MB (a 248k-row head is 4 GB)
QUANTIZE_SLICE_ELEMENTS = 1 << 24  # quantize's float32 temporaries of a slice: a few 64 MB ones at a time
ALIGN = 64


class AffineMatrix:
    """A [N, K] matrix as codes, scales and biases, held in one buffer (a kernel reads all three from one pointer);
    multiplies itself. `dtype` is what it hands back: products and dequantized rows. On a GPU a few rows of x go
    through a matrix-vector kernel that reads the codes (dot4_gemv, or moe_triton.affine_gemv), up to
    mt.GEMM_MAX_ROWS through one tensor-core kernel (resident_mm), more dequantize a slice at a time into one GEMM."""

    def __init__(self, q: QuantizedTensor, dtype: torch.dtype):
        parts = (q.packed, q.scales, q.biases)
        self._allocate([(t.shape, t.dtype) for t in parts], q.bits, q.group_size, q.packed.device, dtype)
        for view, t in zip((self.q.packed, self.q.scales, self.q.biases), parts):
            view.copy_(t)

    def _allocate(self, parts: list[tuple[tuple[int, ...], torch.dtype]], bits: int, group_size: int, device,
                  dtype: torch.dtype) -> None:
        """One buffer for codes, scales and biases of these shapes and dtypes, self.q their views into it."""
        offsets, total = [], 0
        for shape, t_dtype in parts:
            offsets.append(total)
            total = -(-(total + math.prod(shape) * t_dtype.itemsize) // ALIGN) * ALIGN
        self.blob = torch.empty(total, dtype=torch.uint8, device=device)
        views = [self.blob[offset : offset + math.prod(shape) * t_dtype.itemsize].view(t_dtype).view(shape)
                 for (shape, t_dtype), offset in zip(parts, offsets)]
        self.q = QuantizedTensor(*views, bits, group_size)
        self.dtype, self.shape, self.offsets = dtype, self.q.shape, tuple(offsets)
        self.gemv_tile = (mt.affine_gemv_tile(bits, group_size, self.shape)
                          if self.device.type == "cuda" and mt.triton_available() else None)
        # up to dot4_gemv.MAX_ROWS rows through integer dot products over int8-rounded activations (dot4_gemv.py:
        # its tile, or None); FLASHMOE_GPU_DOT4=0 keeps the float kernel
        self.dot4 = (dot4_gemv.resident_tile(bits, group_size, self.shape)
                     if self.gemv_tile is not None and dot4_gemv.enabled() and dtype != torch.float32 else None)
        self.mm = self.gemv_tile is not None and resident_mm.supported(bits, group_size)
        # the rows dot4 takes: past them resident_mm, or (where it cannot) all dot4's
        self.dot4_rows = DOT4_MAX_ROWS if self.mm else dot4_gemv.MAX_ROWS
        # the grouped kernel's K step stays within a group and tl.dot needs 16 columns or more
        self.gemm = self.gemv_tile is not None and not self.mm and group_size % 16 == 0
        if self.gemm:
            mt.resident_tables(self.device)

    @classmethod
    def quantized(cls, weight, bits: int, dtype: torch.dtype, group_size: int = 32, device=None):
        """A float resident matrix quantized on `device` (where it lies by default) a slice of rows at a time, each
        written into the one buffer: a matrix waiting in RAM reaches the GPU a slice at a time, and the GPU holds at
        most the codes and a slice's temporaries (quantize's float32 copies of a 248k-row head would be 4 GB each).
        A form that is not a float tensor (one the store keeps quantized, a stack of them) and rows whose width the
        group does not divide stay as they are, where they are."""
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.shape[1] % group_size:
            return weight
        rows, cols = weight.shape
        m = cls.__new__(cls)
        groups = (rows, cols // group_size)
        m._allocate([((rows, cols * bits // 8), torch.uint8), (groups, SCALE_DTYPE), (groups, SCALE_DTYPE)], bits,
                    group_size, device or weight.device, dtype)
        step = max(1, QUANTIZE_SLICE_ELEMENTS // cols)
        for i in range(0, rows, step):
            part = quantize(weight[i : i + step].to(m.device), bits, group_size)
            for view, t in zip((m.q.packed, m.q.scales, m.q.biases), (part.packed, part.scales, part.biases)):
                view[i : i + step] = t
        return m

    @property
    def device(self) -> torch.device:
        return self.blob.device

    @property
    def scheme(self) -> tuple:
        """Matrices of one scheme stack into one (cat)."""
        return self.q.bits, self.q.group_size, self.q.scales.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.q, torch.float32).to(dtype or self.dtype)

    def _slice(self, rows) -> QuantizedTensor:
        return QuantizedTensor(self.q.packed[rows], self.q.scales[rows], self.q.biases[rows], self.q.bits,
                               self.q.group_size)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` dequantized: an embedding lookup, [*ids.shape, K]."""
        return dequantize(self._slice(ids.reshape(-1)), torch.float32).to(self.dtype).view(*ids.shape, self.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (n, k), rows = self.shape, x.reshape(-1, x.shape[-1])
        if self.dot4 and rows.shape[0] <= self.dot4_rows:
            y = dot4_gemv.dot4_gemv(rows, self.blob, self.shape, self.q.bits, self.q.group_size, self.offsets,
                                    self.q.scales.dtype == torch.bfloat16, **self.dot4)
        elif self.gemv_tile is not None and rows.shape[0] <= GEMV_MAX_ROWS:
            block_n, block_b, warps = self.gemv_tile
            y = mt.affine_gemv(rows.contiguous(), self.blob, self.shape, self.q.bits, self.q.group_size, self.offsets,
                               self.q.scales.dtype == torch.bfloat16, block_b, block_n, warps)
        elif self.mm and rows.shape[0] <= mt.GEMM_MAX_ROWS:
            y = resident_mm.resident_mm(rows, self.blob, self.shape, self.q.bits, self.q.group_size, self.offsets,
                                        self.q.scales.dtype == torch.bfloat16, resident_mm.tile_for(self.shape))
        elif self.gemm and rows.shape[0] <= mt.GEMM_MAX_ROWS:
            y = mt.affine_gemm(rows.contiguous(), self.blob, self.shape, self.q.bits, self.q.group_size, self.offsets,
                               self.q.scales.dtype == torch.bfloat16)
        else:
            step = max(1, DEQUANT_CHUNK_ELEMENTS // k)
            y = torch.cat([F.linear(rows, dequantize(self._slice(slice(i, i + step)), torch.float32).to(x.dtype))
                           for i in range(0, n, step)], dim=-1)
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def cat(parts: list["AffineMatrix"]) -> "AffineMatrix":
        """Row-stacked matrices of one scheme: one matrix whose product is the parts' products side by side."""
        q = [p.q for p in parts]
        return AffineMatrix(QuantizedTensor(torch.cat([t.packed for t in q]), torch.cat([t.scales for t in q]),
                                            torch.cat([t.biases for t in q]), q[0].bits, q[0].group_size), parts[0].dtype)


class RowStack:
    """Matrices of different forms that read one input (an MLX router at 8 bits beside a 4-bit shared expert): the
    product is theirs side by side."""

    def __init__(self, parts: list):
        self.parts = parts

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .linear import linear

        return torch.cat([linear(x, p) for p in self.parts], dim=-1)
