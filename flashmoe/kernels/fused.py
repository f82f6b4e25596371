"""The small ops of a layer, fused: one Triton launch for what torch does in five to fifteen, beside the torch
reference each must equal.

A 397B-shaped decode layer launched ~100 kernels before these: an RMSNorm alone was ten elementwise kernels,
the router's softmax, top-k, renormalisation and sort another ten, and inside a CUDA graph each still costs
2-3 us on an H100. That was 300 us of kernels per layer against 86 us of weight bytes
(benchmarks/profile_decode.py). Each op here takes any number of rows (tokens), except the causal-conv step,
which is decode's. `use_triton(x)` says which path a tensor gets: Triton on CUDA, the reference elsewhere (tests
also run the Triton versions in Triton's CPU interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_native

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


# ---- torch references --------------------------------------------------------------------------
def reference_rms_norm(x, weight, eps, zero_centred=True, residual=None, gate=None):
    """RMSNorm of x (+ residual, rounded to x's dtype first, as the residual stream is), times (1 + weight) when
    zero_centred else weight, times silu(gate) if given. Returns the normed rows, and the sum when residual is given."""
    total = x if residual is None else x + residual
    xf = total.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf * ((1.0 + weight.float()) if zero_centred else weight.float())
    if gate is not None:
        y = y * F.silu(gate.float())
    y = y.to(x.dtype)
    return y if residual is None else (total, y)


def reference_conv_step(mixed, conv_state, conv_weight):
    """One token through the causal depthwise conv: silu(sum_j window[c, j] w[c, j]) over [state, mixed];
    the state ([C, kernel - 1], oldest first) shifts in place. Several sequences' tokens: mixed [B, C], states
    [B, C, kernel - 1]."""
    full = torch.cat([conv_state, mixed[..., None]], dim=-1)
    conv_state.copy_(full[..., 1:])
    return F.silu((full.float() * conv_weight[:, 0].float()).sum(-1)).to(mixed.dtype)


def reference_delta_gates(a, b, a_log, dt_bias):
    """The DeltaNet's decay (log space, float32) and write strength: g = -exp(A_log) softplus(a + dt_bias),
    beta = sigmoid(b)."""
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, torch.sigmoid(b.float()).to(b.dtype)


def reference_route(logits, top_k, default_k, normalize, slot_table=None, counts=None):
    """Softmax router: the top max(top_k, default_k) experts by probability, of which the first top_k are kept.
    Weights are renormalised to 1 (normalize) or to the mass the default K had (so an overridden K keeps it).
    Returns ids ascending within each row, their float32 weights, and their slots in `slot_table` if given;
    `counts` (int64 [2]) then gains the number of slots >= 0 (VRAM) and < 0 (pinned RAM)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, max(top_k, default_k), dim=-1)
    mass = weights[:, :default_k].sum(-1, keepdim=True)
    weights, ids = weights[:, :top_k], ids[:, :top_k]
    weights = weights / weights.sum(-1, keepdim=True) * (1.0 if normalize else mass)
    return routed_in_order(ids, weights, slot_table, counts)


def reference_route_sigmoid(logits, bias, top_k, n_group, topk_group, normalize, scale, slot_table=None, counts=None):
    """Sigmoid router (GLM-4.5, DeepSeek-V3): each expert's score is sigmoid(logit); its score plus `bias` (the
    e_score_correction_bias, float32 [E]) chooses. Experts are split into n_group groups, ranked by the sum of their
    two best choosing scores, and only the best topk_group groups' experts are eligible. The top_k eligible experts
    keep their scores (not the biased ones), renormalised to 1 when `normalize`, times `scale`. Returns as
    reference_route."""
    scores = torch.sigmoid(logits.float())
    choice = scores + bias.float()
    t, e = scores.shape
    if n_group > 1:
        group = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(group).scatter_(1, group.topk(topk_group, dim=-1)[1], 1.0).bool()
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * scale
    return routed_in_order(ids, weights, slot_table, counts)


def routed_in_order(ids, weights, slot_table=None, counts=None):
    """A router's picks as it returns them: ids ascending within each row, the weights in the same order, and their
    slots in `slot_table` if given, counted into `counts` by tier (the reference twin of _store_route)."""
    ids, order = ids.sort(dim=-1)
    weights = weights.gather(-1, order)
    slots = None if slot_table is None else slot_table[ids]
    if counts is not None:
        count_tiers(slots, counts)
    return ids, weights, slots


def count_tiers(slots: torch.Tensor, counts: torch.Tensor) -> None:
    """counts (int64 [2]) += (slots in VRAM, >= 0; slots in pinned RAM, < 0), without a host sync."""
    counts += torch.stack([(slots >= 0).sum(), (slots < 0).sum()])


# how an attention layer norms its queries and keys per head (before RoPE)
QK_NORMS = {"none": 0, "plain": 1, "zero_centred": 2}  # zero_centred: weights are offsets from 1 (Qwen3.5/Next)


def reference_qk_norm_rope(proj, positions, q_norm, k_norm, inv_freq, heads, kv_heads, head_dim, eps, gated=True,
                           qk_norm="zero_centred"):
    """From an attention layer's fused projection [T, queries | kv * hd keys | kv * hd values]: the queries and keys
    RMS-normed per head (`qk_norm`: QK_NORMS; "none" leaves them and ignores the weights) and rotated over their
    first 2 * len(inv_freq) dims. gated: each query head is followed by its output gate (Qwen3.5/Next: [q | gate]
    per head, 2 hd wide), else the queries are heads * hd. Returns q [T, heads, hd], k [T, kv, hd] in proj's dtype."""
    t, q_width = proj.shape[0], (2 if gated else 1) * head_dim
    q = proj[:, : heads * q_width].view(t, heads, q_width)[..., :head_dim]
    k = proj[:, heads * q_width : heads * q_width + kv_heads * head_dim].view(t, kv_heads, head_dim)
    if qk_norm != "none":
        q = reference_rms_norm(q, q_norm, eps, zero_centred=qk_norm == "zero_centred")
        k = reference_rms_norm(k, k_norm, eps, zero_centred=qk_norm == "zero_centred")
    freqs = positions[:, None].float() * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), -1)[:, None, :]
    cos, sin = angles.cos(), angles.sin()
    rot = 2 * inv_freq.numel()

    def rotate(x):
        xr = x[..., :rot].float()
        half = torch.cat((-xr[..., rot // 2 :], xr[..., : rot // 2]), dim=-1)
        return torch.cat([(xr * cos + half * sin).to(x.dtype), x[..., rot:]], dim=-1)

    return rotate(q), rotate(k)


# ---- Triton -----------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, gate_ptr, w_ptr, y_ptr, sum_ptr, D, x_stride, res_stride, gate_stride, eps,
                         HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, ZERO_CENTRED: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        m = d < D
        x = tl.load(x_ptr + row * x_stride + d, mask=m, other=0.0)
        if HAS_RES:  # the residual stream's sum, rounded to its dtype as torch's add would
            x = (x.to(tl.float32) + tl.load(res_ptr + row * res_stride + d, mask=m, other=0.0).to(tl.float32))
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * D + d, x, mask=m)
        x = x.to(tl.float32)
        y = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
        if ZERO_CENTRED:
            y = y * (1.0 + w)
        else:
            y = y * w
        if HAS_GATE:
            g = tl.load(gate_ptr + row * gate_stride + d, mask=m, other=0.0).to(tl.float32)
            y = y * g * tl.sigmoid(g)
        tl.store(y_ptr + row * D + d, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _conv_step_kernel(mixed_ptr, state_ptr, w_ptr, out_ptr, C, mixed_stride, KERNEL: tl.constexpr,
                          KPAD: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(1).to(tl.int64)  # a sequence of the batch: its input row, state and output
        mixed_ptr += row * mixed_stride
        state_ptr += row * C * (KERNEL - 1)
        out_ptr += row * C
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        j = tl.arange(0, KPAD)
        in_state = cm[:, None] & (j < KERNEL - 1)[None, :]
        old = tl.load(state_ptr + c[:, None] * (KERNEL - 1) + j[None, :], mask=in_state, other=0.0)
        new = tl.load(mixed_ptr + c, mask=cm, other=0.0)
        window = tl.where((j == KERNEL - 1)[None, :], new[:, None], old)  # [state..., new], oldest first
        w = tl.load(w_ptr + c[:, None] * KERNEL + j[None, :], mask=cm[:, None] & (j < KERNEL)[None, :], other=0.0)
        y = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
        tl.store(out_ptr + c, (y * tl.sigmoid(y)).to(out_ptr.dtype.element_ty), mask=cm)
        keep = cm[:, None] & (j >= 1)[None, :] & (j < KERNEL)[None, :]  # the window less its oldest column
        tl.store(state_ptr + c[:, None] * (KERNEL - 1) + (j - 1)[None, :], window, mask=keep)

    @triton.jit
    def _delta_gates_kernel(a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, g_ptr, beta_ptr, H, a_stride, b_stride,
                            BLOCK_H: tl.constexpr):
        row = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)
        m = h < H
        a = tl.load(a_ptr + row * a_stride + h, mask=m, other=0.0).to(tl.float32)
        a = a + tl.load(dt_bias_ptr + h, mask=m, other=0.0).to(tl.float32)
        softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))  # torch's threshold
        g = -tl.exp(tl.load(a_log_ptr + h, mask=m, other=0.0).to(tl.float32)) * softplus
        tl.store(g_ptr + row * H + h, g, mask=m)
        b = tl.load(b_ptr + row * b_stride + h, mask=m, other=0.0).to(tl.float32)
        tl.store(beta_ptr + row * H + h, tl.sigmoid(b).to(beta_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _top_k(choice, values, e, slot, K: tl.constexpr, KPAD: tl.constexpr, BLOCK_E: tl.constexpr):
        """The K largest of `choice` (float32) by repeated argmax (K is small), the lowest id among ties: their ids,
        and `values` at them, in pick order in the first K of KPAD slots (zeros after). Each pick is one reduction:
        the value's bits made to order as integers do, the id below them, in one int64 key (a max, an argmin of the
        ties and a sum a pick took three block-wide reductions)."""
        bits = choice.to(tl.int32, bitcast=True)
        order = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats' magnitude bits flipped: ints in float order
        key = (order.to(tl.int64) << 32) | (BLOCK_E - 1 - e).to(tl.int64)  # ties: the lowest id the largest key
        top_ids = tl.zeros((KPAD,), dtype=tl.int32)
        for j in tl.static_range(K):
            best = tl.max(key, axis=0)
            pick = (BLOCK_E - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
            top_ids = tl.where(slot == j, pick, top_ids)
            key = tl.where(e == pick, -9223372036854775807 - 1, key)  # int64's least: never picked again
        picked = (e[None, :] == top_ids[:, None]) & (slot < K)[:, None]
        return top_ids, tl.sum(tl.where(picked, values[None, :], 0.0), axis=1)

    @triton.jit
    def _store_route(row, top_ids, top_w, kept, ids_ptr, weights_ptr, table_ptr, slots_ptr, counts_ptr,
                     TOP_K: tl.constexpr, HAS_SLOTS: tl.constexpr, COUNT: tl.constexpr):
        """A router row's kept experts in ascending id order (each kept id's rank among the kept ones), their
        weights, and their slots in the table, counted by tier (>= 0 VRAM, < 0 pinned RAM)."""
        smaller = (top_ids[None, :] < top_ids[:, None]) & kept[None, :]
        rank = tl.sum(smaller.to(tl.int32), axis=1)
        tl.store(ids_ptr + row * TOP_K + rank, top_ids.to(ids_ptr.dtype.element_ty), mask=kept)
        tl.store(weights_ptr + row * TOP_K + rank, top_w, mask=kept)
        if HAS_SLOTS:
            slots = tl.load(table_ptr + top_ids, mask=kept, other=0)
            tl.store(slots_ptr + row * TOP_K + rank, slots, mask=kept)
            if COUNT:
                in_ram = tl.sum((kept & (slots < 0)).to(tl.int64), axis=0)
                tl.atomic_add(counts_ptr, TOP_K - in_ram)
                tl.atomic_add(counts_ptr + 1, in_ram)

    @triton.jit
    def _route_kernel(logits_ptr, ids_ptr, weights_ptr, table_ptr, slots_ptr, counts_ptr, E, logits_stride,
                      TOP_K: tl.constexpr, DEFAULT_K: tl.constexpr, K_MAX: tl.constexpr, KPAD: tl.constexpr,
                      NORMALIZE: tl.constexpr, HAS_SLOTS: tl.constexpr, COUNT: tl.constexpr, BLOCK_E: tl.constexpr):
        row = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        logits = tl.load(logits_ptr + row * logits_stride + e, mask=e < E, other=float("-inf")).to(tl.float32)
        p = tl.exp(logits - tl.max(logits, axis=0))
        p = p / tl.sum(p, axis=0)
        p = tl.where(e < E, p, -1.0)
        slot = tl.arange(0, KPAD)
        top_ids, top_p = _top_k(p, p, e, slot, K_MAX, KPAD, BLOCK_E)
        kept = slot < TOP_K
        total = tl.sum(tl.where(kept, top_p, 0.0), axis=0)
        if NORMALIZE:
            top_p = top_p / total
        else:
            top_p = top_p / total * tl.sum(tl.where(slot < DEFAULT_K, top_p, 0.0), axis=0)
        _store_route(row, top_ids, top_p, kept, ids_ptr, weights_ptr, table_ptr, slots_ptr, counts_ptr, TOP_K,
                     HAS_SLOTS, COUNT)

    @triton.jit
    def _route_sigmoid_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, table_ptr, slots_ptr, counts_ptr, E,
                              logits_stride, scale, TOP_K: tl.constexpr, KPAD: tl.constexpr, N_GROUP: tl.constexpr,
                              GPAD: tl.constexpr, TOPK_GROUP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_SLOTS: tl.constexpr,
                              COUNT: tl.constexpr, BLOCK_E: tl.constexpr):
        row = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        valid = e < E
        logits = tl.load(logits_ptr + row * logits_stride + e, mask=valid, other=0.0).to(tl.float32)
        scores = tl.sigmoid(logits)
        choice = tl.where(valid, scores + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32), float("-inf"))
        if N_GROUP > 1:  # the groups ranked by their two best choosing scores; the best TOPK_GROUP stay eligible
            size = E // N_GROUP
            group = e // size
            gi = tl.arange(0, GPAD)
            group_score = tl.full((GPAD,), float("-inf"), dtype=tl.float32)
            for g in tl.static_range(N_GROUP):
                in_g = valid & (group == g)
                best = tl.max(tl.where(in_g, choice, float("-inf")), axis=0)
                first = tl.min(tl.where(in_g & (choice == best), e, BLOCK_E), axis=0)
                second = tl.max(tl.where(in_g & (e != first), choice, float("-inf")), axis=0)
                group_score = tl.where(gi == g, best + second, group_score)
            eligible = tl.zeros((BLOCK_E,), dtype=tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                top = tl.max(group_score, axis=0)
                pick = tl.min(tl.where(group_score == top, gi, GPAD), axis=0)
                eligible = eligible | (group == pick)
                group_score = tl.where(gi == pick, float("-inf"), group_score)
            choice = tl.where(eligible & valid, choice, float("-inf"))
        slot = tl.arange(0, KPAD)
        top_ids, top_w = _top_k(choice, scores, e, slot, TOP_K, KPAD, BLOCK_E)
        kept = slot < TOP_K
        if NORMALIZE:
            top_w = top_w / (tl.sum(tl.where(kept, top_w, 0.0), axis=0) + 1e-20)
        top_w = top_w * scale
        _store_route(row, top_ids, top_w, kept, ids_ptr, weights_ptr, table_ptr, slots_ptr, counts_ptr, TOP_K,
                     HAS_SLOTS, COUNT)

    @triton.jit
    def _qk_norm_rope_kernel(proj_ptr, pos_ptr, qw_ptr, kw_ptr, inv_freq_ptr, q_ptr, k_ptr, proj_stride, eps,
                             HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
                             GATED: tl.constexpr, QK_NORM: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        head = tl.program_id(1)  # queries first, then keys
        q_width: tl.constexpr = 2 * HEAD_DIM if GATED else HEAD_DIM
        is_q = head < HEADS
        if is_q:
            src = proj_ptr + t * proj_stride + head * q_width
            w_ptr = qw_ptr
            dst = q_ptr + (t * HEADS + head) * HEAD_DIM
        else:
            src = proj_ptr + t * proj_stride + HEADS * q_width + (head - HEADS) * HEAD_DIM
            w_ptr = kw_ptr
            dst = k_ptr + (t * KV_HEADS + head - HEADS) * HEAD_DIM
        d = tl.arange(0, BLOCK_D)
        m = d < HEAD_DIM
        half: tl.constexpr = ROT // 2
        in_rot = d < ROT
        # rotate-half: dim i < ROT/2 pairs with i + ROT/2; both use frequency i % (ROT/2)
        partner = tl.where(d < half, d + half, d - half)
        x = tl.load(src + d, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(src + partner, mask=in_rot, other=0.0).to(tl.float32)
        if QK_NORM == 0:
            y = x
            yp = xp
        else:
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / HEAD_DIM + eps)
            w = tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
            wp = tl.load(w_ptr + partner, mask=in_rot, other=0.0).to(tl.float32)
            if QK_NORM == 2:
                w = 1.0 + w
                wp = 1.0 + wp
            # rounded to the output dtype before rotating, as the reference's norm returns it
            y = (x * rstd * w).to(q_ptr.dtype.element_ty).to(tl.float32)
            yp = (xp * rstd * wp).to(q_ptr.dtype.element_ty).to(tl.float32)
        angle = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + d % half, mask=in_rot, other=0.0)
        sign = tl.where(d < half, -1.0, 1.0)
        rotated = y * tl.cos(angle) + sign * yp * tl.sin(angle)
        out = tl.where(in_rot, rotated, y)
        tl.store(dst + d, out.to(q_ptr.dtype.element_ty), mask=m)


# ---- launchers (any device where Triton runs, its CPU interpreter included) ------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, D] with unit stride along D (a view when it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_triton(x, weight, eps, zero_centred=True, residual=None, gate=None):
    """reference_rms_norm in one Triton launch."""
    d = x.shape[-1]
    x2 = _rows(x)
    res = _rows(residual) if residual is not None else x2
    g = _rows(gate) if gate is not None else x2
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(y) if residual is not None else y
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(x2.shape[0],)](x2, res, g, weight, y, total, d, x2.stride(0), res.stride(0), g.stride(0), eps,
                                     HAS_RES=residual is not None, HAS_GATE=gate is not None,
                                     ZERO_CENTRED=zero_centred, BLOCK_D=block, num_warps=min(8, max(1, block // 256)))
    y = y.view(x.shape)
    return y if residual is None else (total.view(x.shape), y)


def conv_step_triton(mixed, conv_state, conv_weight):
    """reference_conv_step in one Triton launch. mixed [C] or [B, C] (rows may be strided), conv_state
    [C, kernel - 1] or [B, C, kernel - 1] (contiguous), conv_weight [C, 1, kernel]."""
    c, kernel = conv_weight.shape[0], conv_weight.shape[-1]
    rows = 1 if mixed.dim() == 1 else mixed.shape[0]
    out = torch.empty(mixed.shape, dtype=mixed.dtype, device=mixed.device)
    block = 256
    _conv_step_kernel[(triton.cdiv(c, block), rows)](mixed, conv_state, conv_weight, out, c,
                                                     mixed.stride(0) if rows > 1 else 0, KERNEL=kernel,
                                                     KPAD=triton.next_power_of_2(kernel), BLOCK_C=block)
    return out


def delta_gates_triton(a, b, a_log, dt_bias):
    """reference_delta_gates in one Triton launch. a, b [T, H] (rows may be strided)."""
    t, h = a.shape
    g = torch.empty(t, h, dtype=torch.float32, device=a.device)
    beta = torch.empty(t, h, dtype=b.dtype, device=a.device)
    _delta_gates_kernel[(t,)](a, b, a_log, dt_bias, g, beta, h, a.stride(0), b.stride(0),
                              BLOCK_H=triton.next_power_of_2(h))
    return g, beta


def route_triton(logits, top_k, default_k, normalize, slot_table=None, counts=None):
    """reference_route in one Triton launch. logits [T, E] (rows may be strided); slot_table [E] int32."""
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.long, device=logits.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    slots = torch.empty(t, top_k, dtype=torch.int32, device=logits.device) if slot_table is not None else None
    _route_kernel[(t,)](logits, ids, weights, slot_table if slot_table is not None else ids,
                        slots if slots is not None else ids, counts if counts is not None else ids, e, logits.stride(0),
                        TOP_K=top_k, DEFAULT_K=default_k, K_MAX=max(top_k, default_k),
                        KPAD=triton.next_power_of_2(max(top_k, default_k)), NORMALIZE=normalize,
                        HAS_SLOTS=slot_table is not None, COUNT=counts is not None and slot_table is not None,
                        BLOCK_E=triton.next_power_of_2(e), num_warps=4 if e >= 256 else 1)
    return ids, weights, slots


def route_sigmoid_triton(logits, bias, top_k, n_group, topk_group, normalize, scale, slot_table=None, counts=None):
    """reference_route_sigmoid in one Triton launch. logits [T, E] (rows may be strided); bias [E] float32."""
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.long, device=logits.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    slots = torch.empty(t, top_k, dtype=torch.int32, device=logits.device) if slot_table is not None else None
    _route_sigmoid_kernel[(t,)](
        logits, bias, ids, weights, slot_table if slot_table is not None else ids, slots if slots is not None else ids,
        counts if counts is not None else ids, e, logits.stride(0), float(scale), TOP_K=top_k,
        KPAD=triton.next_power_of_2(top_k), N_GROUP=n_group, GPAD=triton.next_power_of_2(n_group),
        TOPK_GROUP=topk_group, NORMALIZE=normalize,
        HAS_SLOTS=slot_table is not None, COUNT=counts is not None and slot_table is not None,
        BLOCK_E=triton.next_power_of_2(e), num_warps=4 if e >= 256 else 1)
    return ids, weights, slots


def qk_norm_rope_triton(proj, positions, q_norm, k_norm, inv_freq, heads, kv_heads, head_dim, eps, gated=True,
                        qk_norm="zero_centred"):
    """reference_qk_norm_rope in one Triton launch (proj rows contiguous)."""
    t = proj.shape[0]
    q = torch.empty(t, heads, head_dim, dtype=proj.dtype, device=proj.device)
    k = torch.empty(t, kv_heads, head_dim, dtype=proj.dtype, device=proj.device)
    _qk_norm_rope_kernel[(t, heads + kv_heads)](
        proj, positions, q_norm if q_norm is not None else proj, k_norm if k_norm is not None else proj, inv_freq,
        q, k, proj.stride(0), eps, HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, ROT=2 * inv_freq.numel(),
        GATED=gated, QK_NORM=QK_NORMS[qk_norm], BLOCK_D=triton.next_power_of_2(head_dim))
    return q, k


# ---- what the model calls: Triton on CUDA, the reference elsewhere --------------------------------
# dispatchers: Triton on CUDA; on the CPU our kernels (cpu_native.c, one call instead of 5-10 torch ops) where they
# are built and the tensors are float32; else the torch reference
def rms_norm(x, weight, eps, zero_centred=True, residual=None, gate=None):
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, zero_centred, residual, gate)
    native = cpu_native.rms_norm(x, weight, eps, zero_centred, residual, gate)
    return native if native is not None else reference_rms_norm(x, weight, eps, zero_centred, residual, gate)


def conv_step(mixed, conv_state, conv_weight):
    if use_triton(mixed):
        return conv_step_triton(mixed, conv_state, conv_weight)
    native = cpu_native.conv_step(mixed, conv_state, conv_weight) if mixed.dim() == 1 else None
    return native if native is not None else reference_conv_step(mixed, conv_state, conv_weight)


def delta_gates(a, b, a_log, dt_bias):
    if use_triton(a):
        return delta_gates_triton(a, b, a_log, dt_bias)
    native = cpu_native.delta_gates(a, b, a_log, dt_bias)
    return native if native is not None else reference_delta_gates(a, b, a_log, dt_bias)


def route(logits, top_k, default_k, normalize, slot_table=None, counts=None):
    if use_triton(logits):
        return route_triton(logits, top_k, default_k, normalize, slot_table, counts)
    if slot_table is None and counts is None and (native := cpu_native.route(logits, top_k, default_k, normalize)):
        return native
    return reference_route(logits, top_k, default_k, normalize, slot_table, counts)


def route_sigmoid(logits, bias, top_k, n_group, topk_group, normalize, scale, slot_table=None, counts=None):
    fn = route_sigmoid_triton if use_triton(logits) else reference_route_sigmoid
    return fn(logits, bias, top_k, n_group, topk_group, normalize, scale, slot_table, counts)


def qk_norm_rope(proj, positions, q_norm, k_norm, inv_freq, heads, kv_heads, head_dim, eps, gated=True,
                 qk_norm="zero_centred"):
    args = (proj, positions, q_norm, k_norm, inv_freq, heads, kv_heads, head_dim, eps, gated, qk_norm)
    if use_triton(proj):
        return qk_norm_rope_triton(*args)
    native = cpu_native.qk_norm_rope(*args)
    return native if native is not None else reference_qk_norm_rope(*args)
