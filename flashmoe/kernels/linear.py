"""x @ w^T for a resident weight, whatever form it is kept in: a tensor, or a compressed matrix that multiplies
itself (kernels/cpu_int4.py: bf16 or packed codes on the CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    return F.linear(x, weight) if isinstance(weight, torch.Tensor) else weight(x)

