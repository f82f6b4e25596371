"""Routed experts on the GPU: Triton kernels that read 2/4/8-bit expert blobs straight from a slab of slots.

Every expert blob sits whole in one slot of a uint8 slab (the VRAM expert cache), in the layout of
store.BlobLayout; the kernels take the slab, each expert's slot and the segment offsets, and dequantize
group by group in registers, so the weights cross HBM once, still packed.

- gate_up_swiglu: act = silu(x @ gate^T) * (x @ up^T) for the tokens routed to each expert, gate and up
  rows read in the same pass (prefill: tokens grouped by expert; decode: one token per expert).
- down_weighted_sum: out = sum_k weight_k * act_k @ down_k^T for one token: the down projection, the
  routing weight and the sum over the K experts in one launch, summed in slot-list order (deterministic).
- down_grouped: weight * act @ down^T per (token, expert) pair for many tokens; the caller sums over K.

GPT-OSS's experts (QuantBlob.bias, .act): each projection's float32 output bias in the blob, and the clamped SwiGLU
(ACT 1: gate <= limit, |up| <= limit, (up + 1) * gate * sigmoid(alpha * gate)), as constexpr branches of the same
kernels.

The decode kernels read affine 4/8-bit codes through integer dot products over the activations rounded to int8
(dot4_gemv.py: the float path's per-code work caps 4-bit reads near 2.3 TB/s); FLASHMOE_GPU_DOT4=0 keeps the float
path (float32 activations always take it).

The torch references are reference_* below; tests compare both over awkward shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..store import BlobLayout
from . import dot4_gemv

try:
    import triton
    import triton.language as tl

    from .dot4_gemv import _affine_pointers, _dot4_load_x, _dot4_round_x, _dot4_sum, _dot4_tile
except ImportError:  # CPU-only installs: the torch path serves
    triton = None


def triton_available() -> bool:
    return triton is not None


SCALE_FP16, SCALE_BF16, SCALE_E8M0, SCALE_FP32 = 0, 1, 2, 3  # the kernels' SCALE_KIND (E8M0: MXFP4, FP32: FP8)
# a decode slot the GPU leaves out (the CPU computes that expert: cpu_share.py): read nothing, contribute zeros
SKIP = -(2 ** 31)


@dataclass(frozen=True)
class QuantBlob:
    """Where the quantized tensors of an expert lie inside its blob, plus the numbers the kernels need."""

    hidden: int
    intermediate: int
    bits: int
    group_size: int
    blob_bytes: int
    gate_up_packed: int
    gate_up_scales: int
    gate_up_biases: int
    down_packed: int
    down_scales: int
    down_biases: int
    scale_kind: int = 0  # SCALE_FP16 | SCALE_BF16 (MLX imports) | SCALE_E8M0 (MXFP4) | SCALE_FP32 (FP8); no biases: the last two
    # GPT-OSS: the projections' output biases (float32 [2I] and [H] in the blob) and the clamped SwiGLU (limit > 0)
    bias: bool = False
    gate_up_bias: int = 0
    down_bias: int = 0
    limit: float = 0.0
    alpha: float = 1.0

    @classmethod
    def from_layout(cls, layout: BlobLayout, bits: int, group_size: int, math=None) -> "QuantBlob":
        """math: the experts' moe.ExpertMath (its clamped SwiGLU), where not the plain one."""
        seg = {s.name: s for s in layout.segments}
        two_i, packed_h = seg["gate_up.packed"].shape
        kind = {"float16": SCALE_FP16, "bfloat16": SCALE_BF16, "uint8": SCALE_E8M0,
                "float32": SCALE_FP32}[seg["gate_up.scales"].dtype]
        return cls(
            hidden=packed_h * 8 // bits, intermediate=two_i // 2, bits=bits, group_size=group_size,
            blob_bytes=layout.blob_bytes, scale_kind=kind, bias="gate_up.bias" in seg,
            limit=math.limit if math is not None else 0.0, alpha=math.alpha if math is not None else 1.0,
            **{name.replace(".", "_"): seg[name].offset if name in seg else 0 for name in
               ("gate_up.packed", "gate_up.scales", "gate_up.biases", "down.packed", "down.scales", "down.biases",
                "gate_up.bias", "down.bias")},
        )

    @property
    def act(self) -> int:
        """The kernels' ACT: 1 for the clamped SwiGLU, 0 for the plain one."""
        return 1 if self.limit else 0

    @property
    def math(self):
        from .moe import ExpertMath  # moe.py -> linear.py -> affine.py -> this module

        return ExpertMath(self.bias, self.limit, self.alpha)

    @property
    def block_k(self) -> int:
        """The K step of the kernels: the largest power of two dividing the group size, at most 128, so one
        step never straddles two groups (one scale and bias per row per step)."""
        b = 128
        while self.group_size % b:
            b //= 2
        return b

    @property
    def supported(self) -> bool:
        return self.block_k >= 16  # tl.dot needs K >= 16


# ---- torch references ----------------------------------------------------------------------
def _expert_views(slab: torch.Tensor, slot: int, layout: BlobLayout, qb: QuantBlob, dtype: torch.dtype):
    """[gate_up, down, gate_up bias or None, down bias or None] of the expert in `slot`."""
    from .moe import expert_biases, expert_weights  # moe.py -> linear.py -> affine.py -> this module

    views = layout.unpack(slab[slot])
    return [*expert_weights(views, qb.bits, qb.group_size, dtype), *expert_biases(views, torch.float32)]


def reference_gate_up_swiglu(x, slab, slots, token_of, expert_start, layout, qb):
    """act[j] = silu(gate_e x[token_of[j]]) * up_e x[token_of[j]] for pairs j of expert e (rows expert_start[e]..); with
    qb's biases and clamped SwiGLU where it has them."""
    act = x.new_empty(token_of.numel(), qb.intermediate)
    starts = expert_start.tolist()
    for e, slot in enumerate(slots.tolist()):
        rows = slice(starts[e], starts[e + 1])
        gate_up, _, bias, _ = _expert_views(slab, slot, layout, qb, x.dtype)
        gu = F.linear(x[token_of[rows].long()].float(), gate_up.float())
        g, u = (gu if bias is None else gu + bias).chunk(2, dim=-1)
        act[rows] = qb.math.activation(g, u).to(x.dtype)
    return act


def reference_down_weighted_sum(act, slab, slots, weights, layout, qb):
    """out[H] = sum_e weights[e] * down_e act[e] for one token (act [G, I], one row per slot)."""
    out = torch.zeros(qb.hidden, dtype=torch.float32, device=act.device)
    for e, slot in enumerate(slots.tolist()):
        _, down, _, bias = _expert_views(slab, slot, layout, qb, act.dtype)
        y = F.linear(act[e].float(), down.float())
        out += weights[e].float() * (y if bias is None else y + bias)
    return out.to(act.dtype)


def reference_down_grouped(act, slab, slots, expert_start, pair_weight, layout, qb):
    """y[j] = pair_weight[j] * down_e act[j] for pairs j of expert e."""
    y = act.new_empty(act.shape[0], qb.hidden)
    starts = expert_start.tolist()
    for e, slot in enumerate(slots.tolist()):
        rows = slice(starts[e], starts[e + 1])
        _, down, _, bias = _expert_views(slab, slot, layout, qb, act.dtype)
        d = F.linear(act[rows].float(), down.float())
        y[rows] = ((d if bias is None else d + bias) * pair_weight[rows, None].float()).to(act.dtype)
    return y


# ---- Triton kernels -------------------------------------------------------------------------
if triton is not None:
    SKIP_SLOT = tl.constexpr(SKIP)  # tested as tl.where(slot != SKIP_SLOT, mask, False): Triton's interpreter
    # makes a bool scalar & a bool vector an integer mask

    @triton.jit
    def _e2m1(codes):
        """MXFP4's 4-bit floats: sign, two exponent bits, one mantissa bit -> float32."""
        e = (codes >> 1) & 3
        m = (codes & 1).to(tl.float32)
        magnitude = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32)))
        return tl.where((codes & 8) != 0, -magnitude, magnitude)

    @triton.jit
    def _e4m3(codes):
        """FP8 e4m3 (fn: no infinities) bytes -> float32: sign, four exponent bits (bias 7), three mantissa bits."""
        e = (codes >> 3) & 15
        m = (codes & 7).to(tl.float32) * 0.125
        magnitude = tl.where(e == 0, m * 0.015625, (1.0 + m) * tl.exp2((e - 7).to(tl.float32)))
        return tl.where((codes & 128) != 0, -magnitude, magnitude)

    @triton.jit
    def _step_columns(k0, m, BITS: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
        """The columns of a K step the grouped kernels multiply at once: all BLOCK_K from k0, or (SPLIT) those of bit
        position m within their bytes (every 8 / BITS-th)."""
        if SPLIT:
            k = k0 + tl.arange(0, BLOCK_K // (8 // BITS)) * (8 // BITS) + m
        else:
            k = k0 + tl.arange(0, BLOCK_K)
        return k

    @triton.jit
    def _dequant_tile(base, packed_off, scales_off, biases_off, rows, row_mask, k, k0, m, in_features,
                      BITS: tl.constexpr, GROUP: tl.constexpr, SCALE_KIND: tl.constexpr, WIDE: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
        """Rows `rows` x the columns k = _step_columns(k0, m) of a packed [out, in] weight -> float32 tile. The step's
        packed bytes are read as one contiguous run per row (vector loads) and split into codes in registers. The
        step is one group (from k0 within it) or (WIDE) several whole groups, each column then taking its own
        group's scale and bias."""
        per_byte: tl.constexpr = 8 // BITS
        row_bytes = in_features // per_byte
        byte = k0 // per_byte + tl.arange(0, BLOCK_K // per_byte)
        packed = tl.load(base + packed_off + rows[:, None] * row_bytes + byte[None, :], mask=row_mask[:, None],
                         other=0).to(tl.int32)
        low: tl.constexpr = (1 << BITS) - 1
        if SPLIT:  # one bit position of every byte
            codes = (packed >> (m * BITS)) & low
        elif BITS == 8:
            codes = packed
        elif BITS == 4:  # column 2b + j is byte b's nibble j
            codes = tl.interleave(packed & 15, packed >> 4)
        else:  # 2 bits: column 4b + j is byte b's pair j
            codes = tl.interleave(tl.interleave(packed & 3, (packed >> 4) & 3),
                                  tl.interleave((packed >> 2) & 3, packed >> 6))
        groups = in_features // GROUP
        if WIDE:  # [rows, k] of per-group numbers: a row's repeats within a group are the same address (cached)
            at = rows[:, None] * groups + (k // GROUP)[None, :]
            at_mask = row_mask[:, None]
        else:
            at = rows * groups + k0 // GROUP
            at_mask = row_mask
        if SCALE_KIND == 2:  # MXFP4: e2m1 values times 2^(e8m0 - 127); constexpr branches, one pointer type each
            exponent = tl.load(base + scales_off + at, mask=at_mask, other=127).to(tl.float32)
            return _e2m1(codes) * _per_row(tl.exp2(exponent - 127.0), WIDE)
        if SCALE_KIND == 3:  # FP8: e4m3 values times the row's block scale
            scale_ptr = (base + scales_off).to(tl.pointer_type(tl.float32))
            return _e4m3(codes) * _per_row(tl.load(scale_ptr + at, mask=at_mask, other=0.0), WIDE)
        scale_ptr, bias_ptr = _affine_pointers(base, scales_off, biases_off, SCALE_KIND)
        scale = tl.load(scale_ptr + at, mask=at_mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + at, mask=at_mask, other=0.0).to(tl.float32)
        return codes.to(tl.float32) * _per_row(scale, WIDE) + _per_row(bias, WIDE)

    @triton.jit
    def _per_row(v, WIDE: tl.constexpr):
        """_dequant_tile's per-group numbers as a tile's factor: already [rows, k] (WIDE), else [rows] -> [rows, 1]."""
        if WIDE:  # if/else, not an early return: Triton compiles the code after a constexpr-taken return too
            factor = v
        else:
            factor = v[:, None]
        return factor

    @triton.jit
    def _gemv_tile(base, packed_off, scales_off, biases_off, rows, row_mask, x_ptr, k0, in_features,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_B: tl.constexpr, SCALE_KIND: tl.constexpr,
                   EVEN: tl.constexpr):
        """sum_k W[rows, k] x[k] over k in [k0, k0 + BLOCK_B * 8 / BITS), W dequantized on the fly -> [rows].

        Decode is a matrix-vector product bound by bytes: each row's packed bytes are read as one contiguous
        run, the codes of each bit position multiply the matching strided x, and scale and bias are applied
        once per group: sum_g s_g (sum_k c_k x_k) + b_g (sum_k x_k). MXFP4 decodes each code to its e2m1 value
        and has no bias: sum_g s_g (sum_k v_k x_k). EVEN: the step divides in_features; else the last step's columns
        past it are masked (whole groups: in_features is a multiple of GROUP), so a row like GPT-OSS's 2880 values
        still reads 512 bytes a step, not the 32 that divide it."""
        per_byte: tl.constexpr = 8 // BITS
        block_k: tl.constexpr = BLOCK_B * per_byte
        n_groups: tl.constexpr = block_k // GROUP
        b = tl.arange(0, BLOCK_B)
        col_mask = row_mask[:, None] if EVEN else row_mask[:, None] & ((k0 + b * per_byte) < in_features)[None, :]
        packed = tl.load(base + packed_off + rows[:, None] * (in_features // per_byte) + (k0 // per_byte + b)[None, :],
                         mask=col_mask, other=0).to(tl.int32)
        acc = tl.zeros(packed.shape, dtype=tl.float32)
        for m in tl.static_range(per_byte):
            if EVEN:
                xm = tl.load(x_ptr + k0 + b * per_byte + m).to(tl.float32)
            else:
                xm = tl.load(x_ptr + k0 + b * per_byte + m, mask=(k0 + b * per_byte + m) < in_features,
                             other=0.0).to(tl.float32)
            code = (packed >> (m * BITS)) & ((1 << BITS) - 1)
            if SCALE_KIND == 2:
                acc += _e2m1(code) * xm[None, :]
            elif SCALE_KIND == 3:
                acc += _e4m3(code) * xm[None, :]
            else:
                acc += code.to(tl.float32) * xm[None, :]
        per_group = tl.sum(tl.reshape(acc, (acc.shape[0], n_groups, GROUP // per_byte)), axis=2)
        g = k0 // GROUP + tl.arange(0, n_groups)
        groups = in_features // GROUP
        g_mask = row_mask[:, None] if EVEN else row_mask[:, None] & (g < groups)[None, :]
        if SCALE_KIND == 2:
            exponent = tl.load(base + scales_off + rows[:, None] * groups + g[None, :], mask=g_mask,
                               other=127).to(tl.float32)
            return tl.sum(per_group * tl.exp2(exponent - 127.0), axis=1)
        if SCALE_KIND == 3:
            scale = tl.load((base + scales_off).to(tl.pointer_type(tl.float32)) + rows[:, None] * groups + g[None, :],
                            mask=g_mask, other=0.0)
            return tl.sum(per_group * scale, axis=1)
        kk = k0 + tl.arange(0, block_k)
        if EVEN:
            x_all = tl.load(x_ptr + kk).to(tl.float32)
        else:
            x_all = tl.load(x_ptr + kk, mask=kk < in_features, other=0.0).to(tl.float32)
        x_sum = tl.sum(tl.reshape(x_all, (n_groups, GROUP)), axis=1)
        scale_ptr, bias_ptr = _affine_pointers(base, scales_off, biases_off, SCALE_KIND)
        scale = tl.load(scale_ptr + rows[:, None] * groups + g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + rows[:, None] * groups + g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        return tl.sum(per_group * scale + bias * x_sum[None, :], axis=1)

    @triton.jit
    def _blob_base(slab_ptr, host_ptr, slot, blob_bytes):
        """Where an expert's blob starts: VRAM slot `slot` >= 0, or pinned-RAM slot -1 - slot, which the kernel then
        reads over PCIe itself (zero-copy: no host round trip, no copy into VRAM)."""
        if slot >= 0:
            base = slab_ptr + slot * blob_bytes
        else:
            base = host_ptr + (-1 - slot) * blob_bytes
        return base

    @triton.jit
    def _out_bias(base, bias_off, n, n_mask):
        """An expert's float32 output bias at rows n (GPT-OSS)."""
        return tl.load((base + bias_off).to(tl.pointer_type(tl.float32)) + n, mask=n_mask, other=0.0)

    @triton.jit
    def _swiglu(gate, up, ACT: tl.constexpr, limit, alpha):
        """silu(gate) * up, or (ACT 1, GPT-OSS's) (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with
        g = min(gate, limit)."""
        if ACT == 1:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            return (up + 1.0) * gate * tl.sigmoid(gate * alpha)
        return gate / (1.0 + tl.exp(-gate)) * up

    @triton.jit
    def _decode_gate_up_kernel(x_ptr, slab_ptr, host_ptr, slot_ptr, act_ptr, H, I, blob_bytes, gu_packed, gu_scales,
                               gu_biases, gu_bias, limit, alpha, per_row, xw_ptr, xo_ptr, xd_ptr, xs_ptr, h_words,
                               h_groups, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_B: tl.constexpr, SCALE_KIND: tl.constexpr, BIAS: tl.constexpr, ACT: tl.constexpr,
                               EVEN_K: tl.constexpr, DOT4: tl.constexpr = False, ASM: tl.constexpr = True,
                               ROUND: tl.constexpr = False):
        """act[e] = swiglu(gate_e x, up_e x) for pair e's expert. DOT4: x as dot4_gemv.quantize_rows left it (xw..xs,
        h_words / h_groups a token), or with ROUND rounded here from x, once a step for gate and up; the codes
        through integer dot products a step of BLOCK_B bytes."""
        e = tl.program_id(0)
        x_ptr += (e // per_row).to(tl.int64) * H  # pair e is token e // per_row's (several tokens' experts at once)
        slot = tl.load(slot_ptr + e)
        base = _blob_base(slab_ptr, host_ptr, slot.to(tl.int64), blob_bytes)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < I
        read = tl.where(slot != SKIP_SLOT, n_mask, False)  # a skipped expert reads nothing, stores silu(0) * 0
        gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
        up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if DOT4:
            token = (e // per_row).to(tl.int64)
            xw, xo, xd, xs = xw_ptr + token * h_words, xo_ptr + token * h_words, xd_ptr + token * (H // 32), \
                xs_ptr + token * 2 * h_groups
            for w0 in range(0, h_words, BLOCK_B // 4):
                if ROUND:
                    xa, xb, d, x_sum, lost = _dot4_round_x(x_ptr, w0, 0, 1, BITS, GROUP, BLOCK_B // 4)
                else:
                    xa, xb, d, x_sum, lost = _dot4_load_x(xw, xo, xd, xs, w0, h_groups, 0, 1, BITS, GROUP,
                                                          BLOCK_B // 4)
                word, scale, bias = _dot4_tile(base, gu_packed, gu_scales, gu_biases, n, read, w0, h_words, h_groups,
                                               BITS, GROUP, BLOCK_B // 4, SCALE_KIND)
                gate += _dot4_sum(word, scale, bias, xa, xb, d, x_sum, lost, BITS, GROUP, BLOCK_B // 4, ASM)
                word, scale, bias = _dot4_tile(base, gu_packed, gu_scales, gu_biases, I + n, read, w0, h_words,
                                               h_groups, BITS, GROUP, BLOCK_B // 4, SCALE_KIND)
                up += _dot4_sum(word, scale, bias, xa, xb, d, x_sum, lost, BITS, GROUP, BLOCK_B // 4, ASM)
        else:
            for k0 in range(0, H, BLOCK_B * (8 // BITS)):
                gate += _gemv_tile(base, gu_packed, gu_scales, gu_biases, n, read, x_ptr, k0, H, BITS, GROUP,
                                   BLOCK_B, SCALE_KIND, EVEN_K)
                up += _gemv_tile(base, gu_packed, gu_scales, gu_biases, I + n, read, x_ptr, k0, H, BITS, GROUP,
                                 BLOCK_B, SCALE_KIND, EVEN_K)
        if BIAS:
            gate += _out_bias(base, gu_bias, n, read)
            up += _out_bias(base, gu_bias, I + n, read)
        act = _swiglu(gate, up, ACT, limit, alpha)
        tl.store(act_ptr + e * I + n, act.to(act_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _tile_pairs(tile_expert_ptr, tile_row_ptr, expert_start_ptr, slot_ptr, slab_ptr, blob_bytes,
                    BLOCK_T: tl.constexpr):
        """The grouped kernels' tile: its rows of (token, expert) pairs, their mask, and where its expert's
        blob starts in the slab."""
        tile = tl.program_id(0)
        e = tl.load(tile_expert_ptr + tile)
        pairs = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_T)
        pair_mask = pairs < tl.load(expert_start_ptr + e + 1)
        base = slab_ptr + tl.load(slot_ptr + e).to(tl.int64) * blob_bytes
        return pairs, pair_mask, base

    @triton.jit
    def _dot_weights_t(a, w, IEEE: tl.constexpr, SWAP: tl.constexpr):
        """a @ w^T with the dequantized float32 w: exact float32 (IEEE) for float32 inputs, else in a's dtype. SWAP:
        computed as (w @ a^T)^T, the weights' rows as the matrix units' M side (a tile of a few tokens pads less)."""
        if SWAP:
            if IEEE:
                product = tl.dot(w, tl.trans(a), input_precision="ieee")
            else:
                product = tl.dot(w.to(a.dtype), tl.trans(a))
        elif IEEE:
            product = tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            product = tl.dot(a, tl.trans(w.to(a.dtype)))
        return product

    @triton.jit
    def _tile_acc(BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        return acc

    @triton.jit
    def _tile_result(acc, SWAP: tl.constexpr):
        """The accumulator as [pairs, outputs]."""
        if SWAP:
            result = tl.trans(acc)
        else:
            result = acc
        return result

    @triton.jit
    def _gate_up_swiglu_kernel(x_ptr, slab_ptr, slot_ptr, token_ptr, tile_expert_ptr, tile_row_ptr, expert_start_ptr,
                               act_ptr, H, I, blob_bytes, gu_packed, gu_scales, gu_biases, gu_bias, limit, alpha,
                               BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                               SCALE_KIND: tl.constexpr, BIAS: tl.constexpr, ACT: tl.constexpr, SWAP: tl.constexpr,
                               WIDE: tl.constexpr, SPLIT: tl.constexpr):
        pairs, pair_mask, base = _tile_pairs(tile_expert_ptr, tile_row_ptr, expert_start_ptr, slot_ptr, slab_ptr,
                                             blob_bytes, BLOCK_T)
        tokens = tl.load(token_ptr + pairs, mask=pair_mask, other=0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < I
        acc_g = _tile_acc(BLOCK_T, BLOCK_N, SWAP)
        acc_u = _tile_acc(BLOCK_T, BLOCK_N, SWAP)
        for k0 in range(0, H, BLOCK_K):
            for m in tl.static_range(8 // BITS if SPLIT else 1):  # SPLIT: a product per bit position of the bytes
                k = _step_columns(k0, m, BITS, BLOCK_K, SPLIT)
                xt = tl.load(x_ptr + tokens[:, None] * H + k[None, :], mask=pair_mask[:, None], other=0.0)
                wg = _dequant_tile(base, gu_packed, gu_scales, gu_biases, n, n_mask, k, k0, m, H, BITS, GROUP,
                                   SCALE_KIND, WIDE, BLOCK_K, SPLIT)
                wu = _dequant_tile(base, gu_packed, gu_scales, gu_biases, I + n, n_mask, k, k0, m, H, BITS, GROUP,
                                   SCALE_KIND, WIDE, BLOCK_K, SPLIT)
                acc_g += _dot_weights_t(xt, wg, IEEE, SWAP)
                acc_u += _dot_weights_t(xt, wu, IEEE, SWAP)
        gate = _tile_result(acc_g, SWAP)
        up = _tile_result(acc_u, SWAP)
        if BIAS:
            gate += _out_bias(base, gu_bias, n, n_mask)[None, :]
            up += _out_bias(base, gu_bias, I + n, n_mask)[None, :]
        act = _swiglu(gate, up, ACT, limit, alpha)
        tl.store(act_ptr + pairs[:, None].to(tl.int64) * I + n[None, :], act.to(act_ptr.dtype.element_ty),
                 mask=pair_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _layer_end(n, n_mask, base_ptr, shared_ptr, shared_gate_ptr, SHARED: tl.constexpr):
        """What a layer's end adds to the routed experts' sum: the residual, and the shared expert (SHARED: 0 none,
        1 plain, 2 times sigmoid of its gate logit)."""
        end = tl.load(base_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        if SHARED != 0:
            shared = tl.load(shared_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
            if SHARED == 2:
                shared = tl.sigmoid(tl.load(shared_gate_ptr).to(tl.float32)) * shared
            end += shared
        return end

    @triton.jit
    def _down_weighted_sum_kernel(act_ptr, slab_ptr, host_ptr, slot_ptr, weight_ptr, out_ptr, base_ptr, shared_ptr,
                                  shared_gate_ptr, n_experts, H, I, blob_bytes, d_packed, d_scales, d_biases, d_bias,
                                  BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                                  EPILOGUE: tl.constexpr, SHARED: tl.constexpr, SCALE_KIND: tl.constexpr,
                                  BIAS: tl.constexpr, EVEN_K: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < H
        out = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for e in range(n_experts):  # in slot-list order: the sum is deterministic
            slot = tl.load(slot_ptr + e)
            base = _blob_base(slab_ptr, host_ptr, slot.to(tl.int64), blob_bytes)
            read = tl.where(slot != SKIP_SLOT, n_mask, False)
            part = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, I, BLOCK_B * (8 // BITS)):
                part += _gemv_tile(base, d_packed, d_scales, d_biases, n, read, act_ptr + e * I, k0, I, BITS, GROUP,
                                   BLOCK_B, SCALE_KIND, EVEN_K)
            if BIAS:
                part += _out_bias(base, d_bias, n, read)
            out += tl.load(weight_ptr + e).to(tl.float32) * part
        if EPILOGUE:  # the layer's end: residual + shared expert (SHARED: 1 plain, 2 sigmoid-gated) + routed experts
            out += _layer_end(n, n_mask, base_ptr, shared_ptr, shared_gate_ptr, SHARED)
        tl.store(out_ptr + n, out.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _down_partial_kernel(act_ptr, slab_ptr, host_ptr, slot_ptr, weight_ptr, partial_ptr, H, I, blob_bytes,
                             d_packed, d_scales, d_biases, d_bias, chunk, n_chunks, aw_ptr, ao_ptr, ad_ptr, as_ptr,
                             i_words, i_groups, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_B: tl.constexpr, SCALE_KIND: tl.constexpr, BIAS: tl.constexpr,
                             EVEN_K: tl.constexpr, DOT4: tl.constexpr = False, ASM: tl.constexpr = True,
                             ROUND: tl.constexpr = False):
        """partial[e * n_chunks + c] = weights[e] * down_e[:, chunk c] act[e, chunk c]: one program per block of
        output rows per (expert, chunk of I), so a layer's few experts still fill the GPU. DOT4: act as
        dot4_gemv.quantize_rows left it (aw..as, i_words / i_groups a pair), or with ROUND rounded here from act,
        through integer dot products."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < H
        j = tl.program_id(1)
        e = j // n_chunks
        k_start = (j % n_chunks) * chunk
        slot = tl.load(slot_ptr + e)
        base = _blob_base(slab_ptr, host_ptr, slot.to(tl.int64), blob_bytes)
        read = tl.where(slot != SKIP_SLOT, n_mask, False)  # a skipped expert's partial is zeros
        part = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if DOT4:
            pair = e.to(tl.int64)
            per_word: tl.constexpr = 32 // BITS
            for w0 in range(k_start // per_word, tl.minimum(k_start + chunk, I) // per_word, BLOCK_B // 4):
                if ROUND:
                    xa, xb, d, x_sum, lost = _dot4_round_x(act_ptr + e * I, w0, 0, 1, BITS, GROUP, BLOCK_B // 4)
                else:
                    xa, xb, d, x_sum, lost = _dot4_load_x(aw_ptr + pair * i_words, ao_ptr + pair * i_words,
                                                          ad_ptr + pair * (I // 32), as_ptr + pair * 2 * i_groups,
                                                          w0, i_groups, 0, 1, BITS, GROUP, BLOCK_B // 4)
                word, scale, bias = _dot4_tile(base, d_packed, d_scales, d_biases, n, read, w0, i_words, i_groups,
                                               BITS, GROUP, BLOCK_B // 4, SCALE_KIND)
                part += _dot4_sum(word, scale, bias, xa, xb, d, x_sum, lost, BITS, GROUP, BLOCK_B // 4, ASM)
        else:
            for k0 in range(k_start, tl.minimum(k_start + chunk, I), BLOCK_B * (8 // BITS)):
                part += _gemv_tile(base, d_packed, d_scales, d_biases, n, read, act_ptr + e * I, k0, I, BITS, GROUP,
                                   BLOCK_B, SCALE_KIND, EVEN_K)
        if BIAS:
            if k_start == 0:  # with the expert's first chunk
                part += _out_bias(base, d_bias, n, read)
        tl.store(partial_ptr + j * H + n, tl.load(weight_ptr + e).to(tl.float32) * part, mask=n_mask)

    @triton.jit
    def _sum_partials_kernel(partial_ptr, out_ptr, base_ptr, shared_ptr, shared_gate_ptr, extra_ptr, rows, H,
                             base_stride, shared_stride, gate_stride, BLOCK_N: tl.constexpr, EPILOGUE: tl.constexpr,
                             SHARED: tl.constexpr, EXTRA: tl.constexpr):
        """out = the partials' sum in row order (deterministic), then (EXTRA) one more float32 row from extra_ptr,
        plus the layer's end as _down_weighted_sum_kernel. Token program_id(1): its `rows` partials follow the
        previous token's, its out row and layer's end too (at their strides)."""
        token = tl.program_id(1).to(tl.int64)
        partial_ptr += token * rows * H
        out_ptr += token * H
        base_ptr += token * base_stride
        shared_ptr += token * shared_stride
        shared_gate_ptr += token * gate_stride
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < H
        out = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r in range(rows):
            out += tl.load(partial_ptr + r * H + n, mask=n_mask, other=0.0)
        if EXTRA:
            out += tl.load(extra_ptr + n, mask=n_mask, other=0.0)
        if EPILOGUE:  # the layer's end: residual + shared expert (SHARED: 1 plain, 2 sigmoid-gated) + routed experts
            out += _layer_end(n, n_mask, base_ptr, shared_ptr, shared_gate_ptr, SHARED)
        tl.store(out_ptr + n, out.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _affine_gemv_kernel(x_ptr, blob_ptr, out_ptr, N, K, packed_off, scales_off, biases_off, BITS: tl.constexpr,
                            GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                            SCALE_KIND: tl.constexpr):
        """out[t] = W x[t] for a resident matrix kept quantized (one blob: codes, scales, biases); rows of t apart."""
        t = tl.program_id(1).to(tl.int64)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_B * (8 // BITS)):
            acc += _gemv_tile(blob_ptr, packed_off, scales_off, biases_off, n, n_mask, x_ptr + t * K, k0, K, BITS, GROUP,
                              BLOCK_B, SCALE_KIND, True)
        tl.store(out_ptr + t * N + n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _down_grouped_kernel(act_ptr, slab_ptr, slot_ptr, pair_weight_ptr, tile_expert_ptr, tile_row_ptr,
                             expert_start_ptr, y_ptr, H, I, blob_bytes, d_packed, d_scales, d_biases, d_bias,
                             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                             SCALE_KIND: tl.constexpr, BIAS: tl.constexpr, SWAP: tl.constexpr, WIDE: tl.constexpr,
                             SPLIT: tl.constexpr):
        pairs, pair_mask, base = _tile_pairs(tile_expert_ptr, tile_row_ptr, expert_start_ptr, slot_ptr, slab_ptr,
                                             blob_bytes, BLOCK_T)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < H
        acc = _tile_acc(BLOCK_T, BLOCK_N, SWAP)
        for k0 in range(0, I, BLOCK_K):
            for m in tl.static_range(8 // BITS if SPLIT else 1):
                k = _step_columns(k0, m, BITS, BLOCK_K, SPLIT)
                a = tl.load(act_ptr + pairs[:, None].to(tl.int64) * I + k[None, :], mask=pair_mask[:, None], other=0.0)
                w = _dequant_tile(base, d_packed, d_scales, d_biases, n, n_mask, k, k0, m, I, BITS, GROUP, SCALE_KIND,
                                  WIDE, BLOCK_K, SPLIT)
                acc += _dot_weights_t(a, w, IEEE, SWAP)
        y = _tile_result(acc, SWAP)
        if BIAS:
            y += _out_bias(base, d_bias, n, n_mask)[None, :]
        y *= tl.load(pair_weight_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + pairs[:, None].to(tl.int64) * H + n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=pair_mask[:, None] & n_mask[None, :])


_TILE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_LAST_TILES: list = [None, None]  # the last large layout: a prompt's gate_up and down launches share it


def _tiles(expert_start: list[int], block_t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each expert's run of pairs into tiles of block_t rows: (expert of tile, first row of tile).
    Decode asks for the same few layouts every layer, so small ones are kept (no host-to-device copy); a prompt's
    layer asks for its own twice (~0.15 ms of Python each at 512 experts), so the last one is kept too."""
    key = (tuple(expert_start), block_t, str(device))
    if key in _TILE_CACHE:
        return _TILE_CACHE[key]
    if _LAST_TILES[0] == key:
        return _LAST_TILES[1]
    tiles = _make_tiles(expert_start, block_t, device)
    if len(expert_start) <= 65:
        if len(_TILE_CACHE) > 256:
            _TILE_CACHE.clear()
        _TILE_CACHE[key] = tiles
    else:
        _LAST_TILES[:] = [key, tiles]
    return tiles


def _make_tiles(expert_start: list[int], block_t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    tile_expert, tile_row = [], []
    for e in range(len(expert_start) - 1):
        for row in range(expert_start[e], expert_start[e + 1], block_t):
            tile_expert.append(e)
            tile_row.append(row)
    return to_device_int32(tile_expert, device), to_device_int32(tile_row, device)


def to_device_int32(values: list[int], device: torch.device) -> torch.Tensor:
    """A small host list as an int32 device tensor, copied without stalling the host on CUDA (pinned source)."""
    t = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass(frozen=True)
class PromptTile:
    """The grouped (prompt) kernels' tile: block_t pairs of one expert (None: from the pairs per expert, _block_t) x
    block_n output rows per program, block_k columns per step of the K loop (whole groups when wider than one: the
    widest power of two up to it that divides the row), the launch's warps and pipeline stages, and swap: the
    weights' rows as the matrix units' M side (_dot_weights_t)."""

    block_t: int | None = None
    block_n: int = 32
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3
    swap: bool = False
    split: bool = False


# the best tiles of benchmarks/prompt_kernels.py's search on an H200 (RESULTS.md) at Qwen3.5-397B's 4-bit experts (10
# pairs an expert) and 35B-A3B's 8-bit (16 pairs): within 3% of each geometry's best where they differ
GATE_UP_TILE = PromptTile(num_stages=2)
DOWN_TILE = PromptTile(block_n=128, num_stages=4)


def _block_t(expert_start: list[int]) -> int:
    """Pairs per tile: an expert's pairs past a tile's cost another read of its weights, rows a tile has beyond its
    expert's pairs cost arithmetic only; sized to the pairs an expert has on average."""
    counts = [b - a for a, b in zip(expert_start, expert_start[1:]) if b > a]
    mean = sum(counts) / max(1, len(counts))
    return 16 if mean <= 12 else 32 if mean <= 48 else 64


def prompt_block_k(qb: QuantBlob, in_features: int, want: int) -> int:
    """The K step of the grouped kernels: within one group (qb.block_k at most), or whole groups dividing the row."""
    if want <= qb.group_size:
        return min(want, qb.block_k)
    while want > qb.group_size and (in_features % want or want % qb.group_size):
        want //= 2
    return max(want, qb.block_k)


def _grouped_launch(tile: PromptTile, qb: QuantBlob, in_features: int, starts: list[int], device):
    """(tile_expert, tile_row, the launch's constexprs and options) of a grouped kernel."""
    block_t = tile.block_t or _block_t(starts)
    return (*_tiles(starts, block_t, device), _grouped_meta(tile, qb, in_features, block_t))


def _grouped_meta(tile: PromptTile, qb: QuantBlob, in_features: int, block_t: int) -> dict:
    block_k = prompt_block_k(qb, in_features, tile.block_k)
    return dict(BITS=qb.bits, GROUP=qb.group_size, BLOCK_T=block_t, BLOCK_N=tile.block_n, BLOCK_K=block_k,
                SCALE_KIND=qb.scale_kind, BIAS=qb.bias, SWAP=tile.swap, WIDE=block_k > qb.group_size,
                SPLIT=tile.split and qb.bits < 8 and block_k * qb.bits // 8 >= 16,  # tl.dot's K is 16 at least
                num_warps=tile.num_warps, num_stages=tile.num_stages)


def gate_up_swiglu(x, slab, slots, token_of, expert_start, qb: QuantBlob, expert_start_list=None,
                   tile: PromptTile | None = None):
    """Triton version of reference_gate_up_swiglu (same arguments, all on the GPU; slots, token_of, expert_start int32)."""
    starts = expert_start_list if expert_start_list is not None else expert_start.tolist()
    tile = tile or GATE_UP_TILE
    tile_expert, tile_row, meta = _grouped_launch(tile, qb, qb.hidden, starts, x.device)
    act = torch.empty(token_of.numel(), qb.intermediate, dtype=x.dtype, device=x.device)
    grid = (tile_expert.numel(), triton.cdiv(qb.intermediate, tile.block_n))
    _gate_up_swiglu_kernel[grid](
        x, slab, slots, token_of, tile_expert, tile_row, expert_start, act, qb.hidden, qb.intermediate, qb.blob_bytes,
        qb.gate_up_packed, qb.gate_up_scales, qb.gate_up_biases, qb.gate_up_bias, qb.limit, qb.alpha,
        IEEE=x.dtype == torch.float32, ACT=qb.act, **meta)
    return act


# the fewest packed bytes per row per step worth reading evenly; below it a step of `most` with its tail masked serves
# (GPT-OSS's 2880-wide rows divide into 32-byte steps only: 0.184 ms a layer, 7.3x its bound on the H200)
EVEN_STEP_MIN = 128


def gemv_block_bytes(qb: QuantBlob, in_features: int, most: int = 512) -> int | None:
    """Packed bytes per row per step of the decode kernels: whole groups, at most `most` (several cache lines of each
    row in flight), dividing in_features where a step of EVEN_STEP_MIN or more does, else `most` (rounded down to
    whole groups and to the row) with the last step masked (gemv_even); None if a group is wider than `most` bytes or
    not a power of two of them (the grouped kernels then serve)."""
    per_byte = 8 // qb.bits
    group_bytes = qb.group_size // per_byte
    steps = [b for b in (512, 256, 128, 64, 32, 16, 8, 4) if b <= most and b % group_bytes == 0]
    for block_b in steps:
        if in_features % (block_b * per_byte) == 0 and (block_b >= EVEN_STEP_MIN or block_b == steps[0]):
            return block_b
    row_bytes = in_features // per_byte
    fits = [b for b in steps if b <= max(row_bytes, steps[-1] if steps else 0)]
    return fits[0] if fits else None


def gemv_even(qb: QuantBlob, in_features: int, block_b: int) -> bool:
    return in_features % (block_b * (8 // qb.bits)) == 0


def decode_supported(qb: QuantBlob) -> bool:
    return gemv_block_bytes(qb, qb.hidden) is not None and gemv_block_bytes(qb, qb.intermediate) is not None


# the best of 36 tiles on the H100 (benchmarks/kernels.py), and again on the H200 in CUDA graphs for gate_up at the
# 397B and Qwen3-235B geometries (down within 10% of the best there)
DECODE_TILE = dict(block_n=8, block_b=512, num_warps=4)


def decode_gate_up_swiglu(x, slab, slots, qb: QuantBlob, block_n: int | None = None, block_b: int | None = None,
                          num_warps: int | None = None, host_slab: torch.Tensor | None = None,
                          per_row: int | None = None):
    """One token through G experts: x [1, H] -> act [G, I] (the decode case of gate_up_swiglu). A slot s < 0 is
    slot -1 - s of host_slab (pinned RAM, read by the kernel over PCIe). per_row: x holds several tokens [T, H],
    and slots[e] is one of token e // per_row's experts (a batch of decode tokens, K experts each)."""
    block_n = block_n or DECODE_TILE["block_n"]
    act = torch.empty(slots.numel(), qb.intermediate, dtype=x.dtype, device=x.device)
    grid = (slots.numel(), triton.cdiv(qb.intermediate, block_n))
    step = gemv_block_bytes(qb, qb.hidden, block_b or DECODE_TILE["block_b"])
    dot4 = _dot4_args(x.reshape(-1, qb.hidden), qb, qb.hidden, step)
    _decode_gate_up_kernel[grid](x, slab, slab if host_slab is None else host_slab, slots, act, qb.hidden, qb.intermediate, qb.blob_bytes, qb.gate_up_packed,
                                 qb.gate_up_scales, qb.gate_up_biases, qb.gate_up_bias, qb.limit, qb.alpha,
                                 per_row or slots.numel(), *dot4["args"], BITS=qb.bits, GROUP=qb.group_size,
                                 BLOCK_N=block_n, BLOCK_B=step, num_warps=num_warps or DECODE_TILE["num_warps"],
                                 SCALE_KIND=qb.scale_kind, BIAS=qb.bias, ACT=qb.act,
                                 EVEN_K=gemv_even(qb, qb.hidden, step), DOT4=dot4["on"], ASM=dot4["asm"],
                                 ROUND=dot4["round"])
    return act


def _dot4_args(x: torch.Tensor, qb: QuantBlob, k: int, step: int) -> dict:
    """The decode kernels' DOT4 arguments for activations x [rows, k] read by steps of `step` bytes: unless
    FLASHMOE_GPU_DOT4=0, for an affine blob the integer kernels take (dot4_gemv.supported), x rounded to int8 words
    (by the kernels themselves; by dot4_gemv.quantize_rows with FLASHMOE_GPU_DOT4=rows) and each row's words
    and groups; else (float32 activations too: a model run in float32 asks for exact products) placeholders the
    float path never reads."""
    mode = dot4_gemv.mode()
    on = (mode != "off" and x.dtype != torch.float32 and qb.scale_kind in (SCALE_FP16, SCALE_BF16)
          and dot4_gemv.supported(qb.bits, qb.group_size, k, step // 4))
    if not on:
        return {"on": False, "asm": True, "round": False, "args": (x, x, x, x, 0, 0)}
    rows = (x, x, x, x) if mode == "fused" else dot4_gemv.quantize_rows(x.contiguous(), qb.bits, qb.group_size)
    return {"on": True, "asm": not dot4_gemv.interpreting(), "round": mode == "fused",
            "args": (*rows, k * qb.bits // 32, k // qb.group_size)}


# programs a decode step of the down projection should have to keep HBM busy. One per block of output rows is only
# H / block_n (512 at hidden 4096); split over experts and chunks of I until there are about this many. In CUDA
# graphs on an H200 (benchmarks/kernels.py, RESULTS.md): 35.5 -> 22.5 us at Qwen3-235B's (4096, 1536, K=8), 53.6 ->
# 42.2 at Mixtral's (4096, 14336, K=2), 12.0 -> 7.2 at Qwen3.5-35B's, 10.5 -> 9.6 at 397B's; 4096 and 8192 no better
DOWN_PROGRAMS = 2048


def down_split(qb: QuantBlob, experts: int, block_n: int, block_b: int) -> tuple[int, int]:
    """(chunk of I per program, chunks per expert) for down_weighted_sum: whole steps of the K loop per chunk."""
    step = block_b * (8 // qb.bits)
    steps = -(-qb.intermediate // step)  # the last one masked where the step does not divide I
    want = -(-DOWN_PROGRAMS // (-(-qb.hidden // block_n) * experts))
    per_chunk = -(-steps // max(1, min(steps, want)))
    return per_chunk * step, -(-steps // per_chunk)


def down_weighted_sum(act, slab, slots, weights, qb: QuantBlob, block_n: int | None = None, block_b: int | None = None,
                      num_warps: int | None = None, host_slab: torch.Tensor | None = None,
                      epilogue: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
                      split: bool = True):
    """Triton version of reference_down_weighted_sum: one token, act [G, I] -> out [H] (slots as in
    decode_gate_up_swiglu). epilogue (base [H], shared [H] or None, shared_gate [1] or None): out gains base +
    shared, times sigmoid(shared_gate) where there is one, in the same launch (a layer's residual and shared expert).
    split: per (expert, chunk of I) partial sums, then their sum (two launches, many more programs: down_split);
    else one launch whose programs each loop over every expert."""
    if split:
        return sum_partials(down_partials(act, slab, slots, weights, qb, block_n, block_b, num_warps, host_slab),
                            act.dtype, epilogue)
    block_n = block_n or DECODE_TILE["block_n"]
    block_b = gemv_block_bytes(qb, qb.intermediate, block_b or DECODE_TILE["block_b"])
    out = torch.empty(qb.hidden, dtype=act.dtype, device=act.device)
    base, shared, shared_gate, shared_kind = _epilogue_args(epilogue, out)
    _down_weighted_sum_kernel[(triton.cdiv(qb.hidden, block_n),)](
        act, slab, slab if host_slab is None else host_slab, slots, weights, out, base, shared, shared_gate,
        slots.numel(), qb.hidden, qb.intermediate, qb.blob_bytes, qb.down_packed, qb.down_scales, qb.down_biases,
        qb.down_bias, BITS=qb.bits, GROUP=qb.group_size, BLOCK_N=block_n, BLOCK_B=block_b,
        num_warps=num_warps or DECODE_TILE["num_warps"], EPILOGUE=epilogue is not None, SHARED=shared_kind,
        SCALE_KIND=qb.scale_kind, BIAS=qb.bias, EVEN_K=gemv_even(qb, qb.intermediate, block_b))
    return out


def _epilogue_args(epilogue, out: torch.Tensor):
    """The kernels' (base, shared, shared_gate, SHARED) for an epilogue or None (unused pointers: out)."""
    base, shared, shared_gate = epilogue if epilogue is not None else (out, None, None)
    shared_kind = 0 if shared is None else 1 if shared_gate is None else 2
    return base, out if shared is None else shared, out if shared_gate is None else shared_gate, shared_kind


def down_partials(act, slab, slots, weights, qb: QuantBlob, block_n: int | None = None, block_b: int | None = None,
                  num_warps: int | None = None, host_slab: torch.Tensor | None = None) -> torch.Tensor:
    """The first half of down_weighted_sum's split: float32 [G * chunks, H] of weighted partial sums, per (expert,
    chunk of I)."""
    block_n = block_n or DECODE_TILE["block_n"]
    block_b = gemv_block_bytes(qb, qb.intermediate, block_b or DECODE_TILE["block_b"])
    chunk, n_chunks = down_split(qb, slots.numel(), block_n, block_b)
    partial = torch.empty(slots.numel() * n_chunks, qb.hidden, dtype=torch.float32, device=act.device)
    dot4 = _dot4_args(act, qb, qb.intermediate, block_b)
    _down_partial_kernel[(triton.cdiv(qb.hidden, block_n), slots.numel() * n_chunks)](
        act, slab, slab if host_slab is None else host_slab, slots, weights, partial, qb.hidden, qb.intermediate,
        qb.blob_bytes, qb.down_packed, qb.down_scales, qb.down_biases, qb.down_bias, chunk, n_chunks, *dot4["args"],
        BITS=qb.bits, GROUP=qb.group_size, BLOCK_N=block_n, BLOCK_B=block_b,
        num_warps=num_warps or DECODE_TILE["num_warps"], SCALE_KIND=qb.scale_kind, BIAS=qb.bias,
        EVEN_K=gemv_even(qb, qb.intermediate, block_b), DOT4=dot4["on"], ASM=dot4["asm"], ROUND=dot4["round"])
    return partial


def sum_partials(partial: torch.Tensor, dtype: torch.dtype,
                 epilogue: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
                 extra: torch.Tensor | None = None, tokens: int | None = None) -> torch.Tensor:
    """The second half: out [H] in `dtype` = the rows of `partial` summed in row order (deterministic), then
    `extra` (float32 [H]; pinned host memory is read where it lies: the CPU's share of the experts, cpu_share.py),
    plus the epilogue as in down_weighted_sum, rounded once. tokens: partial holds that many tokens' rows one token
    after the other, and out is [tokens, H], each with its own epilogue row (base [T, H], shared [T, H], gate [T, 1]:
    strided rows are read where they lie); no extra then."""
    hidden = partial.shape[1]
    out = torch.empty(hidden if tokens is None else (tokens, hidden), dtype=dtype, device=partial.device)
    base, shared, shared_gate, shared_kind = _epilogue_args(epilogue, out)
    strides = [t.stride(0) if tokens is not None and t.dim() > 1 else 0 for t in (base, shared, shared_gate)]
    _sum_partials_kernel[(triton.cdiv(hidden, 256), tokens or 1)](
        partial, out, base, shared, shared_gate, out if extra is None else extra, partial.shape[0] // (tokens or 1),
        hidden, *strides, BLOCK_N=256, EPILOGUE=epilogue is not None, SHARED=shared_kind, EXTRA=extra is not None)
    return out


def down_grouped(act, slab, slots, expert_start, pair_weight, qb: QuantBlob, expert_start_list=None,
                 tile: PromptTile | None = None):
    """Triton version of reference_down_grouped: y [pairs, H], each row weighted by its routing weight."""
    starts = expert_start_list if expert_start_list is not None else expert_start.tolist()
    tile = tile or DOWN_TILE
    tile_expert, tile_row, meta = _grouped_launch(tile, qb, qb.intermediate, starts, act.device)
    y = torch.empty(act.shape[0], qb.hidden, dtype=act.dtype, device=act.device)
    grid = (tile_expert.numel(), triton.cdiv(qb.hidden, tile.block_n))
    _down_grouped_kernel[grid](
        act, slab, slots, pair_weight, tile_expert, tile_row, expert_start, y, qb.hidden, qb.intermediate,
        qb.blob_bytes, qb.down_packed, qb.down_scales, qb.down_biases, qb.down_bias, IEEE=act.dtype == torch.float32,
        **meta)
    return y


# a resident matrix is one "expert" whose pairs are x's rows; few of them, so many narrow programs (~N / 32) keep
# HBM busy where a layer's experts would give the grouped kernels their programs
RESIDENT_TILE = PromptTile(block_n=32)
GEMM_MAX_ROWS = 64  # affine_gemm's rows at most: a decode batch (prompts dequantize slices into GEMMs)
_RESIDENT_TABLES: dict[str, dict[int, tuple]] = {}


def resident_tables(device: torch.device) -> dict[int, tuple]:
    """Per row count 1..GEMM_MAX_ROWS, affine_gemm's device tables (slot, expert start, pair weights 1, tile
    expert, tile row, block_t), all made at once the first time a device asks, at load: a table first made inside a
    CUDA graph's capture would be a copy from host memory freed after it."""
    key = str(device)
    if key not in _RESIDENT_TABLES:
        slot, tables = to_device_int32([0], device), {}
        for rows in range(1, GEMM_MAX_ROWS + 1):
            block_t = _block_t([0, rows])
            tables[rows] = (slot, to_device_int32([0, rows], device), torch.ones(rows, device=device),
                            *_make_tiles([0, rows], block_t, device), block_t)
        _RESIDENT_TABLES[key] = tables
    return _RESIDENT_TABLES[key]


def affine_gemm(x: torch.Tensor, blob: torch.Tensor, shape: tuple[int, int], bits: int, group_size: int,
                offsets: tuple[int, int, int], scale_bf16: bool) -> torch.Tensor:
    """x [T, K] @ W^T for a quantized resident matrix W [N, K] (affine_gemv's blob) and up to GEMM_MAX_ROWS rows: W
    read once for all of them, dequantized in the tile loop of the grouped down kernel (the matrix its one expert,
    x's rows its pairs, weights 1). What resident_mm does not take (2 bits, groups of 16): its wider and swapped
    tiles ran 10x slower than resident_mm at 8-64 rows on the H200 (RESULTS.md, seventeenth session)."""
    tile = RESIDENT_TILE
    n, k = shape
    slot, start, ones, tile_expert, tile_row, block_t = resident_tables(x.device)[x.shape[0]]
    qb = QuantBlob(hidden=n, intermediate=k, bits=bits, group_size=group_size, blob_bytes=0, gate_up_packed=0,
                   gate_up_scales=0, gate_up_biases=0, down_packed=offsets[0], down_scales=offsets[1],
                   down_biases=offsets[2], scale_kind=SCALE_BF16 if scale_bf16 else SCALE_FP16)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _down_grouped_kernel[(tile_expert.numel(), triton.cdiv(n, tile.block_n))](
        x, blob, slot, ones, tile_expert, tile_row, start, y, n, k, 0, *offsets, 0, IEEE=x.dtype == torch.float32,
        **_grouped_meta(tile, qb, k, block_t))
    return y


def affine_gemv_block_bytes(bits: int, group_size: int, in_features: int, largest: int = 512) -> int | None:
    """Packed bytes per row per step of affine_gemv (whole groups dividing in_features, at most `largest`), None if
    none fits."""
    per_byte = 8 // bits
    for block_b in (512, 256, 128, 64, 32, 16, 8, 4):
        if block_b <= largest and block_b * per_byte % group_size == 0 and in_features % (block_b * per_byte) == 0:
            return block_b
    return None


# 8-bit matrices of many rows read faster through wider tiles than the decode tile (`benchmarks/resident_gemv.py
# --sweep`, H200: the 397B head 248320x4096 360 -> 284 us, DeltaNet's fused 20608x4096 input 39.8 -> 33.1; a
# 4096-row one gained nothing: 128 programs of 32 rows are too few for 132 SMs). 4-bit ones keep the decode tile
# (within 8% of the best on the head, the best on the rest).
WIDE_GEMV_TILE, WIDE_GEMV_MIN_ROWS = dict(block_n=32, block_b=256, num_warps=4), 16384


def affine_gemv_tile(bits: int, group_size: int, shape: tuple[int, int]) -> tuple[int, int, int] | None:
    """(block_n, block_b, num_warps) of affine_gemv for a resident matrix [N, K], None where no step fits."""
    wide = bits == 8 and shape[0] >= WIDE_GEMV_MIN_ROWS
    tile = WIDE_GEMV_TILE if wide else DECODE_TILE
    block_b = affine_gemv_block_bytes(bits, group_size, shape[1], tile["block_b"])
    return None if block_b is None else (tile["block_n"], block_b, tile["num_warps"])


def affine_gemv(x: torch.Tensor, blob: torch.Tensor, shape: tuple[int, int], bits: int, group_size: int,
                offsets: tuple[int, int, int], scale_bf16: bool, block_b: int, block_n: int | None = None,
                num_warps: int | None = None) -> torch.Tensor:
    """x [T, K] @ W^T for a quantized resident matrix W [N, K] stored as one uint8 blob (codes, scales and biases at
    `offsets`): each row of x reads W once, so for a few rows only (decode). block_n, num_warps: the tile
    (DECODE_TILE's by default; benchmarks/resident_gemv.py --sweep searches it)."""
    n, k = shape
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block_n = block_n or DECODE_TILE["block_n"]
    _affine_gemv_kernel[(triton.cdiv(n, block_n), x.shape[0])](
        x, blob, out, n, k, *offsets, BITS=bits, GROUP=group_size, BLOCK_N=block_n, BLOCK_B=block_b,
        SCALE_KIND=SCALE_BF16 if scale_bf16 else SCALE_FP16, num_warps=num_warps or DECODE_TILE["num_warps"])
    return out
