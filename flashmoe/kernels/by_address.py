"""Copies between a batch's own tensors, found by device address, and one stacked tensor (for CUDA graphs).

A graph that steps any set of sequences cannot hold their tensors: it reads a table of their addresses, a graph
input the host rewrites when the set changes. These gather each sequence's tensor (a recurrent state, its conv
window) into row b of a stacked one and scatter the rows back, one launch each for the whole batch.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 1024

if triton is not None:

    @triton.jit
    def _copy_kernel(addr_ptr, addr_stride, rows_ptr, n, TO_ROWS: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        own = tl.load(addr_ptr + b * addr_stride).to(tl.pointer_type(rows_ptr.dtype.element_ty))
        row = rows_ptr + b.to(tl.int64) * n
        if TO_ROWS:
            tl.store(row + i, tl.load(own + i, mask=mask), mask=mask)
        else:
            tl.store(own + i, tl.load(row + i, mask=mask), mask=mask)


def gather(addresses: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """[B, *shape] whose row b is a copy of the contiguous `dtype` tensor at addresses[b] (int64 [B], any stride)."""
    rows = torch.empty(addresses.shape[0], *shape, dtype=dtype, device=addresses.device)
    n = rows[0].numel()
    _copy_kernel[(rows.shape[0], triton.cdiv(n, BLOCK))](addresses, addresses.stride(0), rows, n, TO_ROWS=True,
                                                          BLOCK=BLOCK)
    return rows


def scatter(rows: torch.Tensor, addresses: torch.Tensor) -> None:
    """Row b of `rows` (contiguous) written over the tensor at addresses[b]."""
    n = rows[0].numel()
    _copy_kernel[(rows.shape[0], triton.cdiv(n, BLOCK))](addresses, addresses.stride(0), rows.contiguous(), n,
                                                          TO_ROWS=False, BLOCK=BLOCK)
