"""A quantized resident matrix times a decode batch's rows (a few to 64) on the tensor cores, reading the codes once.

dot4_gemv serves one to a few rows: its dp4a work grows with the rows while the bytes do not, and at 8 rows bf16
through cuBLAS beats it on every large matrix; the grouped MoE kernel with the matrix as its one expert
(moe_triton.affine_gemm) was slower than bf16 at every row count (RESULTS.md, fifteenth session). Here each group
of codes meets the rows in one matrix-unit product on the raw codes, exact in bf16 up to 8 bits, and the group's
scale and bias are applied to that product, not to every weight:

    y[t, n] = sum_g s[n,g] * (sum_{k in g} c[n,k] x[t,k]) + b[n,g] * (sum_{k in g} x[t,k])

so a weight costs an unpack and a conversion, and no float multiply-add of its own. Codes, scales and biases are
AffineMatrix's one blob (quant.pack's order: code 2i in a byte's low nibble).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    from .dot4_gemv import _affine_pointers, interpreting
except ImportError:
    triton = None

MAX_ROWS = 64  # a program's rows at most (more rows: more programs along the rows, the codes read again)


@dataclass(frozen=True)
class MMTile:
    """Output rows of the matrix a program, groups a K step (unrolled: their loads in flight together), warps and
    pipeline stages."""

    block_n: int = 64
    groups: int = 2
    num_warps: int = 4
    num_stages: int = 3


def supported(bits: int, group_size: int) -> bool:
    """4- or 8-bit affine codes in groups of 32 or more, a power of two (the matrix units' K; groups of 16 with bf16
    activations gave wrong products on the H200, undiagnosed: they stay on moe_triton.affine_gemm)."""
    return bits in (4, 8) and group_size >= 32 and group_size & (group_size - 1) == 0


def tile_for(shape: tuple[int, int]) -> MMTile:
    """The tile for a matrix [N, K], from the sweep over every resident shape of a 397B step at 4-64 rows
    (`resident_gemv.py --rows`, H200, RESULTS.md): two groups a step won everywhere, wider programs on more rows."""
    n = shape[0]
    return MMTile(block_n=128 if n >= 65536 else 64 if n >= 4096 else 32, groups=2)


def step_groups(in_features: int, group_size: int, want: int) -> int:
    """The most groups a K step takes, up to `want`, that divide the row's groups."""
    groups = in_features // group_size
    while groups % want:
        want //= 2
    return want


if triton is not None:

    @triton.jit
    def _resident_mm_kernel(x_ptr, blob_ptr, out_ptr, T, N, K, packed_off, scales_off, biases_off,
                            BITS: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_N: tl.constexpr, SCALE_KIND: tl.constexpr, IEEE: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < T
        per_byte: tl.constexpr = 8 // BITS
        group_bytes: tl.constexpr = GROUP // per_byte
        row_bytes = K // per_byte
        groups = K // GROUP
        scale_ptr, bias_ptr = _affine_pointers(blob_ptr, scales_off, biases_off, SCALE_KIND)
        codes_ptr = blob_ptr + packed_off + n[:, None].to(tl.int64) * row_bytes + tl.arange(0, group_bytes)[None, :]
        x_rows = x_ptr + t[:, None].to(tl.int64) * K + tl.arange(0, GROUP)[None, :]
        g_cols = tl.arange(0, GROUPS)
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for g0 in range(0, groups, GROUPS):
            # the step's scales and biases as [rows, GROUPS]: one contiguous run a row, not GROUPS strided loads
            at = n[:, None] * groups + g0 + g_cols[None, :]
            scales = tl.load(scale_ptr + at, mask=n_mask[:, None], other=0.0).to(tl.float32)
            biases = tl.load(bias_ptr + at, mask=n_mask[:, None], other=0.0).to(tl.float32)
            for j in tl.static_range(GROUPS):
                g = g0 + j
                packed = tl.load(codes_ptr + g * group_bytes, mask=n_mask[:, None], other=0).to(tl.int32)
                if BITS == 4:  # column 2b + i is byte b's nibble i
                    codes = tl.interleave(packed & 15, packed >> 4)
                else:
                    codes = packed
                x = tl.load(x_rows + g * GROUP, mask=t_mask[:, None], other=0.0)
                if IEEE:
                    part = tl.dot(codes.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
                else:  # codes below 256 are exact in bf16 and fp16
                    part = tl.dot(codes.to(tl.float32).to(x.dtype), tl.trans(x))
                x_sum = tl.sum(x.to(tl.float32), axis=1)
                s = tl.sum(tl.where(g_cols[None, :] == j, scales, 0.0), axis=1)
                b = tl.sum(tl.where(g_cols[None, :] == j, biases, 0.0), axis=1)
                acc += part * s[:, None] + b[:, None] * x_sum[None, :]
        out = tl.trans(acc)
        tl.store(out_ptr + t[:, None].to(tl.int64) * N + n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & n_mask[None, :])


def resident_mm(x: torch.Tensor, blob: torch.Tensor, shape: tuple[int, int], bits: int, group_size: int,
                offsets: tuple[int, int, int], scale_bf16: bool, tile: MMTile = MMTile()) -> torch.Tensor:
    """x [T, K] @ W^T for a quantized resident matrix W [N, K] (AffineMatrix's blob), T rows of a decode batch: W
    read once for every MAX_ROWS of them."""
    n, k = shape
    rows = x.shape[0]
    block_t = min(MAX_ROWS, max(16, triton.next_power_of_2(rows)))  # the matrix units' N: 16 at least
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, tile.block_n), triton.cdiv(rows, block_t))
    _resident_mm_kernel[grid](
        x.contiguous(), blob, out, rows, n, k, *offsets, BITS=bits, GROUP=group_size,
        GROUPS=step_groups(k, group_size, tile.groups), BLOCK_T=block_t, BLOCK_N=tile.block_n,
        # Triton's CPU interpreter multiplies bf16 tiles wrongly (3.9): there the products run in float32, the same
        # numbers (a bf16 times a code is exact in float32) summed in another order
        SCALE_KIND=1 if scale_bf16 else 0, IEEE=x.dtype == torch.float32 or interpreting(), num_warps=tile.num_warps,
        num_stages=tile.num_stages)
    return out
