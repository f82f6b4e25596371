"""A quantized matrix times a few activation rows through integer dot products (PTX dp4a), for the GPU.

The float matrix-vector kernel (moe_triton's _gemv_tile) turns every code into a float and multiplies it: at 4 bits
two codes a byte, and the H200 then tops out near 2.3 TB/s of its 4.4 (benchmarks/resident_gemv.py --sweep: the
instructions per code bound it, not the bytes). Here, as llama.cpp's MMVQ does, the activations are rounded to int8
per 32 values first (a scale each, and each weight group's exact float sum kept for the affine bias), and each 32-bit
word of codes meets four activations in one dp4a: a word of 4-bit codes is two masks and two dp4a for eight codes.

    y[n] = sum_g s[n,g] * (sum_{b in g} d_b * (sum_{k in b} c[n,k] q_k) + m * (X_g - R_g)) + bias[n,g] * X_g

X_g is the group's exact sum of x, R_g that of the rounded x (d_b q_k), m = 2^(bits-1) the codes' middle: so the
rounding meets only the centred codes c - m (as llama.cpp's signed Q4_0 codes), and the mean code the exact sum;
with the raw unsigned codes the rounding error scaled with the mean code and cost 2-4% of a product.

Codes are packed as quant.pack does (a byte holds codes 2i and 2i+1 in its low and high nibble), so a word holds
codes 8w..8w+7 with the even ones in its low nibbles: the activations are packed to match, evens and odds apart.
Rounding the activations costs 0.4-1% of a product (the CPU kernels' int8 path makes the same trade); where Triton runs
in its CPU interpreter the dp4a is emulated in Triton ops, so tests check the whole scheme there.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 32  # activations per int8 scale
MAX_ROWS = 16  # activation rows a program applies to each step's codes (more rows: more programs, the codes re-read)
SCALE_FP16, SCALE_BF16 = 0, 1  # moe_triton's SCALE_KIND values of affine blobs (it imports these kernels' pieces)
# "0" keeps resident matrices and decode experts on the float kernels. On by default: in CUDA graphs on an H200 a
# 397B decode step took 0.629 ms against 0.812 (benchmarks/device/dot4_ab.sh, RESULTS.md). By default every kernel
# rounds its activations itself (the same integers as a quantize_rows launch before it, which "rows" keeps): with
# resident_tile's tiles the faster of the two for every resident shape and both decode expert kernels (RESULTS.md)
ENV = "FLASHMOE_GPU_DOT4"


def mode() -> str:
    """"off" (FLASHMOE_GPU_DOT4=0), "rows" (activations rounded by quantize_rows launches) or "fused" (inside the
    kernels: the default, also "1" or "fused")."""
    value = os.environ.get(ENV, "fused")
    return "off" if value == "0" else "rows" if value == "rows" else "fused"


def enabled() -> bool:
    return mode() != "off"


def supported(bits: int, group_size: int, in_features: int, block_w: int = 64) -> bool:
    """Affine codes of 4 or 8 bits whose groups hold whole blocks of 32, in rows of whole steps of block_w words, a
    step of whole groups."""
    step = block_w * 32 // bits
    return bits in (4, 8) and group_size % BLOCK == 0 and step % group_size == 0 and in_features % step == 0


def resident_tile(bits: int, group_size: int, shape: tuple[int, int]) -> dict | None:
    """dot4_gemv's tile for a resident matrix of `shape` (AffineMatrix's): rows a program, words a step, warps, K
    splits, activations rounded in the kernel or not; None where supported() takes no width. From the sweep in CUDA
    graphs over every resident shape of a 397B step (`resident_gemv.py --dot4`, H200, RESULTS.md): 8 rows and the
    widest step won or came within 2% everywhere, 8 warps where few rows leave few programs (2561 and 4096 rows: 4.8
    and 8.9 us against 9.4 and 16.3 at the first run's 16 rows / 64 words), K splits never, in-kernel rounding in
    all but the 248k head (equal there)."""
    words = block_words(bits, group_size, shape[1])
    if words is None:
        return None
    warps = 8 if shape[0] <= 8192 and 8 * words >= 2048 else 4
    return dict(block_n=8, block_w=words, num_warps=warps, split=1, fused=mode() == "fused")


def block_words(bits: int, group_size: int, in_features: int) -> int | None:
    """Words a row per step for a matrix of these codes: the most of 256, 128, 64, 32, 16, 8 that supported() takes;
    None if none (the float kernels then)."""
    return next((w for w in (256, 128, 64, 32, 16, 8) if supported(bits, group_size, in_features, w)), None)


if triton is not None:

    @triton.jit
    def _dot4(a, b, c, ASM: tl.constexpr):
        """c + the dot product of a's four unsigned bytes with b's four signed ones (int32 each)."""
        if ASM:
            c = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                          is_pure=True, pack=1)
        else:  # no early return above: Triton's compiler refused one in a constexpr branch that its interpreter ran
            for i in tl.static_range(4):
                c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return c

    @triton.jit
    def _affine_pointers(base, scales_off, biases_off, SCALE_KIND: tl.constexpr):
        """An affine blob's scales and biases as typed pointers: bf16 (MLX imports) or fp16. A constexpr branch:
        each compiled kernel has one pointer type."""
        if SCALE_KIND == 1:
            scale_ptr = (base + scales_off).to(tl.pointer_type(tl.bfloat16))
            bias_ptr = (base + biases_off).to(tl.pointer_type(tl.bfloat16))
        else:
            scale_ptr = (base + scales_off).to(tl.pointer_type(tl.float16))
            bias_ptr = (base + biases_off).to(tl.pointer_type(tl.float16))
        return scale_ptr, bias_ptr

    @triton.jit
    def _dot4_tile(base, packed_off, scales_off, biases_off, rows, row_mask, w0, row_words, groups,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_W: tl.constexpr, SCALE_KIND: tl.constexpr):
        """Words w0 .. w0 + BLOCK_W of W[rows] (an affine blob at `base`) and their groups' scales and biases:
        (codes [rows, BLOCK_W] int32, scales and biases [rows, groups a step] float32)."""
        codes_per_word: tl.constexpr = 32 // BITS
        groups_per_step: tl.constexpr = BLOCK_W * codes_per_word // GROUP
        code_ptr = (base + packed_off).to(tl.pointer_type(tl.int32))
        scale_ptr, bias_ptr = _affine_pointers(base, scales_off, biases_off, SCALE_KIND)
        w = w0 + tl.arange(0, BLOCK_W)
        word = tl.load(code_ptr + rows[:, None].to(tl.int64) * row_words + w[None, :], mask=row_mask[:, None],
                       other=0)
        g = w0 * codes_per_word // GROUP + tl.arange(0, groups_per_step)
        scale = tl.load(scale_ptr + rows[:, None] * groups + g[None, :], mask=row_mask[:, None], other=0.0)
        bias = tl.load(bias_ptr + rows[:, None] * groups + g[None, :], mask=row_mask[:, None], other=0.0)
        return word, scale.to(tl.float32), bias.to(tl.float32)

    @triton.jit
    def _dot4_load_x(words_ptr, odd_ptr, d_ptr, sums_ptr, w0, groups, t, T, BITS: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_W: tl.constexpr):
        """Activation row t of T as quantize_rows left it (its pointers at that row; t >= T: a padding row, read as
        zeros), words w0 .. w0 + BLOCK_W: (words, odd words (4-bit), block scales, group sums, what rounding took)."""
        codes_per_word: tl.constexpr = 32 // BITS
        blocks: tl.constexpr = BLOCK_W * codes_per_word // 32
        groups_per_step: tl.constexpr = BLOCK_W * codes_per_word // GROUP
        w = w0 + tl.arange(0, BLOCK_W)
        b = w0 * codes_per_word // 32 + tl.arange(0, blocks)
        g = w0 * codes_per_word // GROUP + tl.arange(0, groups_per_step)
        # masks compared as vectors (the interpreter takes no scalar mask), constant along each: loads stay vectors.
        # Cast to _dot4_round_x's types: a kernel whose branch on ROUND is compiled both ways must see one type
        xa = tl.load(words_ptr + w, mask=w * 0 + t < T, other=0).to(tl.int32)
        if BITS == 4:
            xo = tl.load(odd_ptr + w, mask=w * 0 + t < T, other=0).to(tl.int32)
        else:  # 8-bit codes: one word of four activations each
            xo = xa
        d = tl.load(d_ptr + b, mask=b * 0 + t < T, other=0.0).to(tl.float32)
        x_sum = tl.load(sums_ptr + g, mask=g * 0 + t < T, other=0.0).to(tl.float32)
        lost = tl.load(sums_ptr + groups + g, mask=g * 0 + t < T, other=0.0).to(tl.float32)
        return xa, xo, d, x_sum, lost

    @triton.jit
    def _dot4_round_x(x_ptr, w0, t, T, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_W: tl.constexpr):
        """The same five as _dot4_load_x, rounded here from the float activations of row t (x_ptr at that row), as
        _quantize_rows_kernel rounds them: no kernel before, no round trip through memory."""
        codes_per_word: tl.constexpr = 32 // BITS
        values: tl.constexpr = BLOCK_W * codes_per_word
        blocks: tl.constexpr = values // 32
        groups_per_step: tl.constexpr = values // GROUP
        k = w0 * codes_per_word + tl.arange(0, values)
        x = tl.reshape(tl.load(x_ptr + k, mask=k * 0 + t < T, other=0.0).to(tl.float32), (blocks, 32))
        d = tl.max(tl.abs(x), axis=1) / 127.0
        q = tl.floor(x / tl.where(d == 0.0, 1.0, d)[:, None] + 0.5).to(tl.int32)  # in -127..127
        x_sum = tl.sum(tl.reshape(tl.sum(x, axis=1), (groups_per_step, GROUP // 32)), axis=1)
        rounded = tl.sum(q, axis=1).to(tl.float32) * d
        lost = x_sum - tl.sum(tl.reshape(rounded, (groups_per_step, GROUP // 32)), axis=1)
        byte = q & 0xFF
        shift = tl.arange(0, 4)[None, :] * 8
        if BITS == 4:  # codes 8w..8w+7 of word w: evens in one word, odds in the other
            even, odd = tl.split(tl.reshape(byte, (BLOCK_W, 4, 2)))
            xa = tl.sum(even << shift, axis=1)
            xo = tl.sum(odd << shift, axis=1)
        else:
            xa = tl.sum(tl.reshape(byte, (BLOCK_W, 4)) << shift, axis=1)
            xo = xa
        return xa, xo, d, x_sum, lost

    @triton.jit
    def _dot4_sum(word, scale, bias, xa, xo, d, x_sum, lost, BITS: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_W: tl.constexpr, ASM: tl.constexpr):
        """A _dot4_tile against one activation row's step (_dot4_load_x or _dot4_round_x) -> [rows] float32."""
        codes_per_word: tl.constexpr = 32 // BITS
        words_per_block: tl.constexpr = 32 // codes_per_word
        blocks: tl.constexpr = BLOCK_W // words_per_block
        groups_per_step: tl.constexpr = BLOCK_W * codes_per_word // GROUP
        xa = tl.broadcast_to(xa[None, :], word.shape)
        zero = tl.zeros(word.shape, dtype=tl.int32)
        if BITS == 4:
            xo = tl.broadcast_to(xo[None, :], word.shape)
            dots = _dot4(word & 0x0F0F0F0F, xa, zero, ASM)
            dots = _dot4((word >> 4) & 0x0F0F0F0F, xo, dots, ASM)
        else:
            dots = _dot4(word, xa, zero, ASM)
        per_block = tl.sum(tl.reshape(dots, (word.shape[0], blocks, words_per_block)), axis=2).to(tl.float32)
        per_group = tl.sum(tl.reshape(per_block * d[None, :], (word.shape[0], groups_per_step, GROUP // 32)), axis=2)
        # the codes' middle meets the exact sums, not the rounded ones: only the centred codes carry the rounding
        residual = lost * (1 << (BITS - 1))
        return tl.sum((per_group + residual[None, :]) * scale + bias * x_sum[None, :], axis=1)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, words_ptr, odd_ptr, d_ptr, sums_ptr, K, BITS: tl.constexpr, GROUP: tl.constexpr):
        """One weight group of one row, rounded as every dot4 kernel rounds (_dot4_round_x): its blocks' int8 values
        packed into words (4-bit: evens and odds apart) and their scales; the group's exact float sum and what
        rounding took from it."""
        t = tl.program_id(1)
        grp = tl.program_id(0)
        words_per_group: tl.constexpr = GROUP * BITS // 32
        blocks: tl.constexpr = GROUP // 32
        xa, xo, d, x_sum, lost = _dot4_round_x(x_ptr + t * K, grp * words_per_group, 0, 1, BITS, GROUP,
                                               words_per_group)
        w = t * (K * BITS // 32) + grp * words_per_group + tl.arange(0, words_per_group)
        tl.store(words_ptr + w, xa)
        if BITS == 4:
            tl.store(odd_ptr + w, xo)
        tl.store(d_ptr + t * (K // 32) + grp * blocks + tl.arange(0, blocks), d)
        groups = K // GROUP
        tl.store(sums_ptr + t * 2 * groups + grp + tl.arange(0, 1), x_sum)
        tl.store(sums_ptr + t * 2 * groups + groups + grp + tl.arange(0, 1), lost)

    @triton.jit
    def _dot4_gemv_kernel(x_ptr, words_ptr, odd_ptr, d_ptr, sums_ptr, blob_ptr, out_ptr, T, N, K, row_words, groups,
                          split_words, packed_off, scales_off, biases_off, BITS: tl.constexpr, GROUP: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr, SCALE_KIND: tl.constexpr,
                          ASM: tl.constexpr, ROUND: tl.constexpr):
        """out[s, t, n] for BLOCK_N rows of W, ROWS activation rows t (the last ones masked past T) and the s-th
        split_words of K's words (program axis 2; one split: all of them): each step's codes read once for all
        rows. The activations as quantize_rows left them (words_ptr ...), or with ROUND the float ones (x_ptr [T, K])
        rounded here, step by step, in every program. row_words (K's words), groups and split_words come as
        arguments, not K's quotients, so Triton sees their divisibility and reads the codes as vectors."""
        t0 = tl.program_id(1) * ROWS
        split = tl.program_id(2)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        r = tl.arange(0, ROWS)
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        w_end = tl.minimum(split * split_words + split_words, row_words)
        for w0 in range(split * split_words, w_end, BLOCK_W):
            word, scale, bias = _dot4_tile(blob_ptr, packed_off, scales_off, biases_off, n, n_mask, w0, row_words,
                                           groups, BITS, GROUP, BLOCK_W, SCALE_KIND)
            for i in tl.static_range(ROWS):
                t = (t0 + i).to(tl.int64)
                if ROUND:
                    xa, xo, d, x_sum, lost = _dot4_round_x(x_ptr + t * K, w0, t, T, BITS, GROUP, BLOCK_W)
                else:
                    xa, xo, d, x_sum, lost = _dot4_load_x(words_ptr + t * row_words, odd_ptr + t * row_words,
                                                          d_ptr + t * (K // 32), sums_ptr + t * 2 * groups, w0,
                                                          groups, t, T, BITS, GROUP, BLOCK_W)
                part = _dot4_sum(word, scale, bias, xa, xo, d, x_sum, lost, BITS, GROUP, BLOCK_W, ASM)
                acc = tl.where(r[:, None] == i, acc + part[None, :], acc)
        rows_t = (t0 + r).to(tl.int64)
        out_ptr += split.to(tl.int64) * T * N
        tl.store(out_ptr + rows_t[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows_t < T)[:, None] & n_mask[None, :])


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def quantize_rows(x: torch.Tensor, bits: int, group_size: int):
    """x [T, K] -> (words, odd words (4-bit; at 8 bits the words again, never read), scales [T, K/32] float32, sums
    [T, 2 * K/group] float32: each group's exact sum, then what rounding took from it): the activations as the
    dot-product kernels read them."""
    t, k = x.shape
    per_word = 32 // bits
    words = torch.empty(t, k // per_word, dtype=torch.int32, device=x.device)
    odd = torch.empty_like(words) if bits == 4 else words
    d = torch.empty(t, k // BLOCK, dtype=torch.float32, device=x.device)
    sums = torch.empty(t, 2 * (k // group_size), dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(k // group_size, t)](x, words, odd, d, sums, k, BITS=bits, GROUP=group_size, num_warps=1)
    return words, odd, d, sums


def dot4_gemv(x: torch.Tensor, blob: torch.Tensor, shape: tuple[int, int], bits: int, group_size: int,
              offsets: tuple[int, int, int], scale_bf16: bool, block_n: int = 16, block_w: int = 64,
              num_warps: int = 4, split: int = 1, fused: bool = False) -> torch.Tensor:
    """x [T, K] @ W^T for a matrix stored as one uint8 blob (codes, scales and biases at `offsets`, as AffineMatrix
    holds it; supported() must hold): the activations rounded to int8 per 32 values, the codes read as words, once
    for every MAX_ROWS rows of x (a decode batch's). split > 1 divides K's steps among that many programs per
    block of rows (more reads in flight for a matrix of few rows), their float32 partials summed after. fused: each
    program rounds the float activations itself (one launch, no quantize_rows), the same integers."""
    n, k = shape
    x = x.contiguous()
    words, odd, d, sums = (x, x, x, x) if fused else quantize_rows(x, bits, group_size)
    t = x.shape[0]
    rows = min(MAX_ROWS, triton.next_power_of_2(t))
    row_words = k * bits // 32
    steps = row_words // block_w
    split = max(1, min(split, steps))
    split_words = -(-steps // split) * block_w
    split = -(-row_words // split_words)  # splits that have steps
    out = torch.empty((split, t, n) if split > 1 else (t, n), dtype=torch.float32 if split > 1 else x.dtype,
                      device=x.device)
    _dot4_gemv_kernel[(triton.cdiv(n, block_n), triton.cdiv(t, rows), split)](
        x, words, odd, d, sums, blob, out, t, n, k, row_words, k // group_size, split_words, *offsets,
        BITS=bits, GROUP=group_size, BLOCK_N=block_n, BLOCK_W=block_w, ROWS=rows,
        SCALE_KIND=SCALE_BF16 if scale_bf16 else SCALE_FP16, ASM=not interpreting(), ROUND=fused,
        num_warps=num_warps)
    return out.sum(0).to(x.dtype) if split > 1 else out
