"""A quantized resident matrix times a decode batch's rows (a few to 64) on the tensor cores, reading the codes once.

dot4_gemv serves one to a few rows: its dp4a work grows with the rows while the bytes do not. Here a program
dequantizes block_k columns of its block_n rows of W in the tile (code x scale + bias in float32, rounded to x's
dtype, as GPTQ/Marlin-style W4A16 kernels do) and meets the batch's rows in one matrix-unit product a step. The
first version kept the codes raw and applied each group's scale to its own small product: a product and its wait a
group, 1.3-2.2x slower than this at 8-16 rows on every resident shape of a 397B step (H200, RESULTS.md, seventeenth
session). Codes, scales and biases are AffineMatrix's one blob (quant.pack's order: code 2i in a byte's low nibble).
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
    """Output rows of the matrix a program, columns a K step (whole groups; the widest that divides the row, up to
    this), warps, pipeline stages, and K splits: programs that each take a share of the row's steps, their float32
    partials summed after (more programs for a matrix of few rows: 4096 rows in 32s are 128 programs for 132 SMs)."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    split: int = 1


def supported(bits: int, group_size: int) -> bool:
    """4- or 8-bit affine codes in groups of 32 or more, a power of two (groups of 16 with bf16 activations gave
    wrong products on the H200 in the first version, undiagnosed: they stay on moe_triton.affine_gemm)."""
    return bits in (4, 8) and group_size >= 32 and group_size & (group_size - 1) == 0


def tile_for(shape: tuple[int, int]) -> MMTile:
    """The tile for a matrix [N, K], from the sweep over every resident shape of a 397B step at 8 and 16 rows
    (`resident_gemv.py --rows`, H200, RESULTS.md): 64 rows and 128 columns a step on the large matrices (the 248k
    head, DeltaNet's fused inputs), 32 rows and 256 columns on the rest."""
    return MMTile(block_n=64, block_k=128) if shape[0] >= 16384 else MMTile(block_n=32, block_k=256)


def step_columns(in_features: int, group_size: int, want: int) -> int:
    """The widest K step up to `want` columns that is whole groups and divides the row."""
    groups, step = in_features // group_size, max(1, want // group_size)
    while groups % step:
        step //= 2
    return step * group_size


if triton is not None:

    @triton.jit
    def _resident_mm_kernel(x_ptr, blob_ptr, out_ptr, T, N, K, split_k, packed_off, scales_off, biases_off,
                            BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_N: tl.constexpr, SCALE_KIND: tl.constexpr, IEEE: tl.constexpr):
        """Columns split_k * s .. split_k * (s + 1) of K for split s (program axis 2), into out's plane s."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < T
        per_byte: tl.constexpr = 8 // BITS
        G: tl.constexpr = BLOCK_K // GROUP  # groups a step
        row_bytes = K // per_byte
        groups = K // GROUP
        scale_ptr, bias_ptr = _affine_pointers(blob_ptr, scales_off, biases_off, SCALE_KIND)
        codes_ptr = (blob_ptr + packed_off + n[:, None].to(tl.int64) * row_bytes
                     + tl.arange(0, BLOCK_K // per_byte)[None, :])
        x_rows = x_ptr + t[:, None].to(tl.int64) * K + tl.arange(0, BLOCK_K)[None, :]
        at = n[:, None] * groups + tl.arange(0, G)[None, :]  # the step's scales and biases, [rows, G]
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        split = tl.program_id(2)
        for k0 in range(split * split_k, tl.minimum(split * split_k + split_k, K), BLOCK_K):
            packed = tl.load(codes_ptr + k0 // per_byte, mask=n_mask[:, None], other=0).to(tl.int32)
            if BITS == 4:  # column 2b + i is byte b's nibble i
                codes = tl.interleave(packed & 15, packed >> 4)
            else:
                codes = packed
            scales = tl.load(scale_ptr + at + k0 // GROUP, mask=n_mask[:, None], other=0.0).to(tl.float32)
            biases = tl.load(bias_ptr + at + k0 // GROUP, mask=n_mask[:, None], other=0.0).to(tl.float32)
            w = tl.reshape(codes.to(tl.float32), (BLOCK_N, G, GROUP)) * scales[:, :, None] + biases[:, :, None]
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
            x = tl.load(x_rows + k0, mask=t_mask[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(w, tl.trans(x.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(w.to(x.dtype), tl.trans(x))
        out = tl.trans(acc)
        out_ptr += split.to(tl.int64) * T * N
        tl.store(out_ptr + t[:, None].to(tl.int64) * N + n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & n_mask[None, :])


def resident_mm(x: torch.Tensor, blob: torch.Tensor, shape: tuple[int, int], bits: int, group_size: int,
                offsets: tuple[int, int, int], scale_bf16: bool, tile: MMTile = MMTile()) -> torch.Tensor:
    """x [T, K] @ W^T for a quantized resident matrix W [N, K] (AffineMatrix's blob), T rows of a decode batch: W
    read once for every MAX_ROWS of them."""
    n, k = shape
    rows = x.shape[0]
    block_t = min(MAX_ROWS, max(16, triton.next_power_of_2(rows)))  # the matrix units' N: 16 at least
    block_k = step_columns(k, group_size, tile.block_k)
    steps = k // block_k
    split_k = -(-steps // max(1, min(tile.split, steps))) * block_k  # whole steps a split
    split = -(-k // split_k)  # splits that have steps
    out = torch.empty((split, rows, n) if split > 1 else (rows, n), dtype=torch.float32 if split > 1 else x.dtype,
                      device=x.device)
    _resident_mm_kernel[(triton.cdiv(n, tile.block_n), triton.cdiv(rows, block_t), split)](
        x.contiguous(), blob, out, rows, n, k, split_k, *offsets, BITS=bits, GROUP=group_size, BLOCK_K=block_k,
        BLOCK_T=block_t, BLOCK_N=tile.block_n,
        # Triton's CPU interpreter multiplies bf16 tiles wrongly (3.9): there the products run in float32
        SCALE_KIND=1 if scale_bf16 else 0, IEEE=x.dtype == torch.float32 or interpreting(), num_warps=tile.num_warps,
        num_stages=tile.num_stages)
    return out.sum(0).to(x.dtype) if split > 1 else out
