"""Decode attention of several sequences in one launch, each over its own KV cache (for CUDA graphs).

A batch of decode tokens (one per sequence) attends over caches of different lengths and capacities, each its own
tensors: the kernel reads each sequence's cache through a table of its K and V addresses and capacity (KVCache
keeps that table on the device, so a graph replays it), writes the token's key and value at its position and
attends with an online softmax over the keys up to it (within a sliding window; with sinks in the denominator).
The torch way launched about a dozen kernels per sequence per layer and read the cache's whole capacity under a
mask. One program per (sequence, KV head): its group of query heads share the keys they read.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_new_ptr, v_new_ptr, table_ptr, pos_ptr, sinks_ptr, out_ptr, scale,
                                 WINDOW: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr,
                                 HD_PAD: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                                 BLOCK_N: tl.constexpr, SINKS: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        dtype = q_ptr.dtype.element_ty
        pos = tl.load(pos_ptr + b)
        capacity = tl.load(table_ptr + b * 3 + 2)
        k_base = tl.load(table_ptr + b * 3).to(tl.pointer_type(dtype)) + kvh * capacity * HD
        v_base = tl.load(table_ptr + b * 3 + 1).to(tl.pointer_type(dtype)) + kvh * capacity * HD
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HD_PAD)
        g_mask, d_mask = g < GROUP, d < HD
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * NH * HD + heads[:, None] * HD + d[None, :], mask=g_mask[:, None] & d_mask[None, :],
                    other=0.0)
        # the new token's key and value: into the cache for later steps, used from registers now
        k_new = tl.load(k_new_ptr + (b * NKV + kvh) * HD + d, mask=d_mask, other=0.0)
        v_new = tl.load(v_new_ptr + (b * NKV + kvh) * HD + d, mask=d_mask, other=0.0)
        tl.store(k_base + pos * HD + d, k_new, mask=d_mask)
        tl.store(v_base + pos * HD + d, v_new, mask=d_mask)
        m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale  # [G_PAD]: its own score
        l_i = tl.full((G_PAD,), 1.0, tl.float32)
        acc = tl.zeros((G_PAD, HD_PAD), tl.float32) + v_new.to(tl.float32)[None, :]
        if WINDOW > 0:
            lo = tl.maximum(pos - WINDOW + 1, 0)
        else:
            lo = pos * 0
        for start in range(lo, pos, BLOCK_N):  # the cached keys before it
            n = start + tl.arange(0, BLOCK_N)
            n_mask = n < pos
            k = tl.load(k_base + n[:, None] * HD + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            v = tl.load(v_base + n[:, None] * HD + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_mask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v)
            m_i = m_new
        if SINKS:  # each head's sink joins the softmax's denominator only
            sink = tl.load(sinks_ptr + heads, mask=g_mask, other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, sink)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.exp(sink - m_new)
            acc = acc * alpha[:, None]
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * NH * HD + heads[:, None] * HD + d[None, :], out.to(dtype),
                 mask=g_mask[:, None] & d_mask[None, :])


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     tables: list[torch.Tensor] | torch.Tensor, positions: torch.Tensor, scale: float, window: int = 0,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, heads, hd], k_new / v_new [B, kv_heads, hd] (sequence i's new token), tables: each sequence's cache's
    row on the device, int64 (K's address, V's address, capacity: KVCache.addresses(); caches [kv_heads, capacity,
    hd], contiguous, q's dtype), or them stacked ([B, 3], contiguous),
    positions [B] on the device -> [B, heads * hd]. Each token's key and value are written at its position; it
    attends to every earlier one (the last `window` with a window) and itself."""
    b, nh, hd = q.shape
    nkv = k_new.shape[1]
    group = nh // nkv
    if isinstance(tables, torch.Tensor):
        table = tables
    else:
        table = tables[0][None] if len(tables) == 1 else torch.stack(tables)  # one copy kernel: graph-safe
    out = torch.empty(b, nh, hd, dtype=q.dtype, device=q.device)
    _decode_attention_kernel[(b, nkv)](
        q.contiguous(), k_new.contiguous(), v_new.contiguous(), table, positions, q if sinks is None else sinks, out,
        scale, WINDOW=window, NH=nh, NKV=nkv, HD=hd, HD_PAD=triton.next_power_of_2(hd), GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=32 if hd > 128 else 64, SINKS=sinks is not None,
        IEEE=q.dtype == torch.float32, num_warps=4)
    return out.view(b, nh * hd)
