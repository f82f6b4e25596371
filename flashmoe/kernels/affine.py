"""Resident matrices kept quantized, as an MLX checkpoint has them (group-wise affine codes, scales, biases), and the
dispatch that lets the model treat them like weight tensors: `linear`, `embedding`, `cat_rows`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant import QuantizedTensor, dequantize


@dataclass
class AffineMatrix:
    """A [N, K] matrix as codes, scales and biases; multiplies itself (kernels/linear.py). `dtype` is what it hands
    back: activations and dequantized rows."""

    q: QuantizedTensor
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.packed.device

    @property
    def scheme(self) -> tuple:
        """Matrices of one scheme stack into one (cat)."""
        return self.q.bits, self.q.group_size, self.q.scales.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.q, torch.float32).to(dtype or self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` dequantized: an embedding lookup, [*ids.shape, K]."""
        flat = ids.reshape(-1)
        q = QuantizedTensor(self.q.packed[flat], self.q.scales[flat], self.q.biases[flat], self.q.bits, self.q.group_size)
        return dequantize(q, torch.float32).to(self.dtype).view(*ids.shape, self.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    @staticmethod
    def cat(parts: list["AffineMatrix"]) -> "AffineMatrix":
        """Row-stacked matrices of one scheme: one matrix whose product is the parts' products side by side."""
        q = [p.q for p in parts]
        return AffineMatrix(QuantizedTensor(torch.cat([t.packed for t in q]), torch.cat([t.scales for t in q]),
                                            torch.cat([t.biases for t in q]), q[0].bits, q[0].group_size), parts[0].dtype)


@dataclass
class RowStack:
    """Matrices of different forms that read one input (an MLX router at 8 bits beside a 4-bit shared expert): the
    product is theirs side by side."""

    parts: list

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .linear import linear

        return torch.cat([linear(x, p) for p in self.parts], dim=-1)
