"""Resident matrices kept quantized, as an MLX checkpoint has them (group-wise affine codes, scales, biases), and the
forms the model treats like weight tensors through kernels/linear.py: `linear`, `embedding`, `cat_rows`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import QuantizedTensor, dequantize, quantize
from . import moe_triton as mt

GEMV_MAX_ROWS = 2  # the GPU's matrix-vector kernel reads the matrix once per row of x; up to mt.GEMM_MAX_ROWS
# (a decode batch) one grouped kernel reads it once for all (mt.affine_gemm); past it (prompts), dequantized slices
DEQUANT_CHUNK_ELEMENTS = 1 << 26  # a GEMM's dequantized float32 slice at most 256 MB (a 248k-row head is 4 GB)
ALIGN = 64


class AffineMatrix:
    """A [N, K] matrix as codes, scales and biases, held in one buffer (a kernel reads all three from one pointer);
    multiplies itself. `dtype` is what it hands back: products and dequantized rows. On a GPU one or two rows of x
    go through a Triton matrix-vector kernel that reads the codes (moe_triton.affine_gemv), up to mt.GEMM_MAX_ROWS
    through one grouped kernel (moe_triton.affine_gemm), more dequantize a slice at a time into one GEMM."""

    def __init__(self, q: QuantizedTensor, dtype: torch.dtype):
        self.dtype, self.shape = dtype, q.shape
        parts, offsets, total = (q.packed, q.scales, q.biases), [], 0
        for t in parts:
            offsets.append(total)
            total = -(-(total + t.numel() * t.element_size()) // ALIGN) * ALIGN
        self.blob = torch.empty(total, dtype=torch.uint8, device=q.packed.device)
        views = []
        for t, offset in zip(parts, offsets):
            view = self.blob[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            view.copy_(t)
            views.append(view)
        self.q = QuantizedTensor(*views, q.bits, q.group_size)
        self.offsets = tuple(offsets)
        self.block_b = (mt.affine_gemv_block_bytes(q.bits, q.group_size, self.shape[1])
                        if self.device.type == "cuda" and mt.triton_available() else None)
        # the grouped kernel's K step stays within a group and tl.dot needs 16 columns or more
        self.gemm = self.block_b is not None and q.group_size % 16 == 0
        if self.gemm:
            mt.resident_tables(self.device)

    @classmethod
    def quantized(cls, weight, bits: int, dtype: torch.dtype, group_size: int = 32, device=None):
        """A float resident matrix quantized on `device` (where it lies by default), a slice of rows at a time:
        quantize's float32 temporaries of a 248k-row head would be 4 GB each, and a matrix waiting in RAM reaches the
        GPU a slice at a time. A form that is not a float tensor (one the store keeps quantized, a stack of them) and
        rows whose width the group does not divide stay as they are, where they are."""
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.shape[1] % group_size:
            return weight
        step = max(1, DEQUANT_CHUNK_ELEMENTS // weight.shape[1])
        parts = [quantize(weight[i : i + step].to(device or weight.device), bits, group_size)
                 for i in range(0, weight.shape[0], step)]
        return cls(QuantizedTensor(*(torch.cat([getattr(p, f) for p in parts]) for f in ("packed", "scales", "biases")),
                                   bits, group_size), dtype)

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
        if self.block_b is not None and rows.shape[0] <= GEMV_MAX_ROWS:
            y = mt.affine_gemv(rows.contiguous(), self.blob, self.shape, self.q.bits, self.q.group_size, self.offsets,
                               self.q.scales.dtype == torch.bfloat16, self.block_b)
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
