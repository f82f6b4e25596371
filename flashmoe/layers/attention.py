"""Softmax attention over a growing KV cache, as every family's full-attention layers run it (GQA, RoPE, optional
per-head query/key norms, an optional per-head output gate, an optional sliding window, optional sinks).

The layer's weights are read by store name under a prefix: `qkv_proj.fused` (q, k, v rows in one matrix: the
queries, with each head's output gate after it when gated), `qkv_proj.fused_bias` where there are biases,
`q_norm.weight` / `k_norm.weight`, `o_proj.weight` (and `o_proj.bias` where the checkpoint has one), `sinks`.
Two paths: `attend` for any number of new tokens (the cache grows), `attend_at` for one decode token whose
position is read from the device (for a CUDA graph: the whole capacity under a mask, no host values).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels import fused
from ..kernels.decode_attention import decode_attention
from ..kernels.linear import linear

# queries per block of the sink attention's float scores (GPT-OSS prompts): bounds them to heads x block x keys
SINK_QUERY_BLOCK = 256


@dataclass(frozen=True)
class AttentionSpec:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float  # of the query/key norms
    # fused.QK_NORMS per head: "none" (Mixtral), "plain" (Qwen3-MoE), "zero_centred" (Qwen3.5/Next); or "whole": one
    # RMSNorm over all the queries and one over all the keys (MiniMax-M2)
    qk_norm: str = "none"
    output_gate: bool = False  # Qwen3.5/Next: out *= sigmoid(gate), the gate stored after each query head
    sliding_window: int = 0  # a query sees this many positions back, itself included (0: all)
    bias: bool = False  # q, k, v biases (GLM-4.5), stored fused as qkv_proj.fused_bias
    # GPT-OSS: a learned logit per head in every softmax's denominator (a key no value comes from), `sinks` [heads]
    sinks: bool = False
    scale: float = 0.0  # the softmax scale; 0: head_dim ** -0.5 (YaRN's cos/sin factor f is f ** 2 here)

    @property
    def softmax_scale(self) -> float:
        return self.scale or self.head_dim ** -0.5

def rope_inv_freq(theta: float, rotary_dim: int, device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def sdpa_backends(device: torch.device):
    """On CUDA, attention without cuDNN: torch's default picks cuDNN there, which builds a plan for every new key
    length, about 60 ms each on an H100 (torch 2.11), and decode meets a new length at every step. Flash takes
    0.09 ms for the same one-token step."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def grown(cache: torch.Tensor | None, kept: int, like: torch.Tensor, length: int) -> torch.Tensor:
    """A cache tensor [rows, capacity, width] with room for `length` positions (twice that, at least 256), the old
    one's first `kept` positions copied in; `like` gives rows, width, dtype and device. Zeros, not empty: attention
    over the whole capacity multiplies masked slots by 0, and 0 * NaN is NaN."""
    new = like.new_zeros(like.shape[0], max(256, 2 * length), like.shape[2])
    if cache is not None:
        new[:, :kept] = cache[:, :kept]
    return new


@dataclass
class KVCache:
    """Keys and values of one full-attention layer, [kv_heads, capacity, head_dim], grown by doubling."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    length: int = 0
    # on a GPU: addresses() on the device (decode_attention), kept by reserve(); derived, so a snapshot (prefix_cache)
    # leaves them out: a restored cache's k can land where a freed one's was, with another v and capacity
    table: torch.Tensor | None = field(default=None, metadata={"derived": True})
    table_of: tuple = field(default=(), metadata={"derived": True})  # the addresses() it holds

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def reserve(self, length: int, like: torch.Tensor) -> None:
        """Room for `length` positions (reallocating by doubling; `like` gives [kv_heads, _, head_dim], dtype, device)."""
        if length > self.capacity:
            self.k, self.v = grown(self.k, self.length, like, length), grown(self.v, self.length, like, length)
        if self.k.is_cuda and self.table_of != (where := self.addresses()):  # here, never inside a graph's capture
            self.table = torch.tensor(where, dtype=torch.long, device=self.k.device)
            self.table_of = where

    def addresses(self) -> tuple[int, int, int]:
        """Its row of a batch's device table (decode_attention): where K and V are, and its capacity."""
        return self.k.data_ptr(), self.v.data_ptr(), self.capacity

    def blank(self) -> "KVCache":
        """A one-position cache of the same kind: a padding row's of a batch graph."""
        return KVCache(self.k.new_zeros(self.k.shape[0], 1, self.k.shape[2]),
                       self.v.new_zeros(self.v.shape[0], 1, self.v.shape[2]))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[1]
        self.reserve(self.length + n, k)
        self.k[:, self.length : self.length + n] = k
        self.v[:, self.length : self.length + n] = v
        self.length += n
        return self.k[:, : self.length], self.v[:, : self.length]


class Attention:
    def __init__(self, spec: AttentionSpec, inv_freq: torch.Tensor):
        self.spec, self.inv_freq = spec, inv_freq

    def _qkv(self, w: dict, p: str, h: torch.Tensor, positions: torch.Tensor):
        """Queries (normed, rotated, [T, heads, hd]), the output gate [T, heads * hd] or None, keys (normed, rotated)
        and values ([T, kv_heads, hd]), from one fused projection."""
        s = self.spec
        t, hd = h.shape[0], s.head_dim
        proj = linear(h, w[p + "qkv_proj.fused"])
        if s.bias:
            proj = proj + w[p + "qkv_proj.fused_bias"]
        q_rows = s.heads * hd * (2 if s.output_gate else 1)
        per_head = s.qk_norm
        if s.qk_norm == "whole":
            k_end = q_rows + s.kv_heads * hd
            proj = torch.cat([fused.rms_norm(proj[:, :q_rows], w[p + "q_norm.weight"], s.eps, zero_centred=False),
                              fused.rms_norm(proj[:, q_rows:k_end], w[p + "k_norm.weight"], s.eps, zero_centred=False),
                              proj[:, k_end:]], dim=1)
            per_head = "none"
        q, k = fused.qk_norm_rope(proj, positions, w.get(p + "q_norm.weight"), w.get(p + "k_norm.weight"),
                                  self.inv_freq, s.heads, s.kv_heads, hd, s.eps, s.output_gate, per_head)
        gate = proj[:, :q_rows].view(t, s.heads, 2 * hd)[..., hd:].reshape(t, s.heads * hd) if s.output_gate else None
        v = proj[:, q_rows + s.kv_heads * hd :].view(t, s.kv_heads, hd)
        return q, gate, k, v

    def _out(self, w: dict, p: str, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        if gate is not None:
            out = out * torch.sigmoid(gate)
        out = linear(out, w[p + "o_proj.weight"])
        return out + w[p + "o_proj.bias"] if p + "o_proj.bias" in w else out

    @staticmethod
    def _softmax(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
        """Softmax over the last dim of float scores [..., heads-major rows, keys]; with sinks [rows' heads], each
        row's denominator also holds exp(its head's sink)."""
        if sinks is None:
            return torch.softmax(scores, dim=-1)
        sink = sinks.float().view(-1, *[1] * (scores.dim() - 1)).expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]

    def attend(self, w: dict, p: str, h: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """New tokens at positions start.. (h [T, hidden]): written into the cache, each attending to every cached
        position up to itself (within the window)."""
        return self.attend_many(w, p, h, [cache], [start], [(0, h.shape[0])])

    def attend_many(self, w: dict, p: str, h: torch.Tensor, caches: list[KVCache], starts: list[int],
                    bounds: list[tuple[int, int]]) -> torch.Tensor:
        """Several sequences' new tokens, rows bounds[i] of h at positions starts[i].. of caches[i]: the projections
        once over all rows, each sequence's attention over its own cache."""
        positions = [torch.arange(start, start + b - a, device=h.device) for start, (a, b) in zip(starts, bounds)]
        q, gate, k, v = self._qkv(w, p, h, positions[0] if len(positions) == 1 else torch.cat(positions))
        outs = [self._attend_cached(w, p, q[a:b], k[a:b], v[a:b], cache) for (a, b), cache in zip(bounds, caches)]
        return self._out(w, p, outs[0] if len(outs) == 1 else torch.cat(outs), gate)

    def _attend_cached(self, w: dict, p: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cache: KVCache) -> torch.Tensor:
        """One sequence's T new queries, keys and values ([T, heads, hd]): the keys and values written into its
        cache, each query attending to every cached position up to its own -> [T, heads * hd]."""
        s = self.spec
        t, hd = q.shape[0], s.head_dim
        keys, values = cache.append(k.transpose(0, 1), v.transpose(0, 1))
        q = q.transpose(0, 1)  # [heads, T, hd]
        past = keys.shape[1] - t
        if s.sinks:  # torch's fused attention has no sink: the scores in float, SINK_QUERY_BLOCK queries at a time
            out = torch.cat([self._sink_attention(q[:, i : i + SINK_QUERY_BLOCK], keys, values, past + i,
                                                  w[p + "sinks"]) for i in range(0, t, SINK_QUERY_BLOCK)], dim=1)
            out = out.to(values.dtype)
        else:
            mask = None
            if s.sliding_window and keys.shape[1] > s.sliding_window:  # token i sees keys past+i-window+1 .. past+i
                mask = (torch.ones(t, keys.shape[1], dtype=torch.bool, device=q.device).tril(past)
                        & ~torch.ones(t, keys.shape[1], dtype=torch.bool, device=q.device).tril(past - s.sliding_window))
            elif t > 1 and past:  # token i sees every cached key and the new ones up to itself
                mask = torch.ones(t, keys.shape[1], dtype=torch.bool, device=q.device).tril(past)
            with sdpa_backends(q.device):
                out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                                     is_causal=mask is None and t > 1, scale=s.softmax_scale,
                                                     enable_gqa=s.heads != s.kv_heads)[0]
        return out.transpose(0, 1).reshape(t, s.heads * hd)

    def _sink_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int,
                        sinks: torch.Tensor) -> torch.Tensor:
        """Queries q [heads, n, hd] at positions first.. over keys/values [kv_heads, L, hd], each seeing the keys up to
        itself (within the window), with each head's sink in the softmax: [heads, n, hd] float. A sliding window reads
        only the keys the block can see, so memory is heads x n x (window + n), not the whole prompt's square."""
        s = self.spec
        n, hd, group = q.shape[1], s.head_dim, s.heads // s.kv_heads
        lo = max(0, first - s.sliding_window + 1) if s.sliding_window else 0
        keys, values = keys[:, lo : first + n], values[:, lo : first + n]
        scores = torch.matmul(q.reshape(s.kv_heads, group * n, hd).float(), keys.transpose(1, 2).float())
        scores = scores.view(s.heads, n, -1) * s.softmax_scale
        position = torch.arange(first, first + n, device=q.device)[:, None]
        key_position = torch.arange(lo, first + n, device=q.device)[None, :]
        visible = key_position <= position
        if s.sliding_window:
            visible &= key_position > position - s.sliding_window
        probs = self._softmax(scores.masked_fill(~visible, float("-inf")), sinks)
        return torch.matmul(probs.view(s.kv_heads, group * n, -1), values.float()).view(s.heads, n, hd)

    def attend_at(self, w: dict, p: str, h: torch.Tensor, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """One token at device position `position` ([1] int64): written into the cache there, attending to every
        slot up to it (within the window). Each KV head's group of query heads is one batched matmul (no GQA
        expansion)."""
        return self.attend_many_at(w, p, h, [cache], position)

    def attend_many_at(self, w: dict, p: str, h: torch.Tensor, caches: list[KVCache] | None, positions: torch.Tensor,
                       table: torch.Tensor | None = None) -> torch.Tensor:
        """attend_at for one token of each of several sequences (row i of h, at device position positions[i] of
        caches[i]): the projections once over all rows, each token's attention over its own cache. table: instead of
        caches, their KVCache.addresses() stacked on the device ([B, 3]: a graph for any set of sequences)."""
        q, gate, k, v = self._qkv(w, p, h, positions)
        s = self.spec
        if table is not None or (fused.use_triton(h) and q.dtype == caches[0].k.dtype):
            out = decode_attention(q, k, v, table if table is not None else [c.table for c in caches], positions,
                                   s.softmax_scale, s.sliding_window or 0, w[p + "sinks"] if s.sinks else None)
            return self._out(w, p, out, gate)
        outs = [self._attend_slot(w, p, q[i], k[i], v[i], cache, positions[i : i + 1])
                for i, cache in enumerate(caches)]
        return self._out(w, p, outs[0] if len(outs) == 1 else torch.cat(outs), gate)

    def _attend_slot(self, w: dict, p: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                     position: torch.Tensor) -> torch.Tensor:
        """One token's query, key and value ([heads, hd]) at `position` ([1] on the device) -> [1, heads * hd]."""
        s = self.spec
        hd, nh, nkv = s.head_dim, s.heads, s.kv_heads
        cache.k.index_copy_(1, position, k[:, None])
        cache.v.index_copy_(1, position, v[:, None])
        scores = torch.matmul(q.view(nkv, nh // nkv, hd), cache.k.transpose(1, 2)).float() * s.softmax_scale
        slot = torch.arange(cache.capacity, device=q.device)
        visible = slot <= position
        if s.sliding_window:
            visible &= slot > position - s.sliding_window
        probs = self._softmax(scores.masked_fill(~visible, float("-inf")).view(nh, 1, -1),
                              w[p + "sinks"] if s.sinks else None).view(nkv, nh // nkv, -1).to(cache.v.dtype)
        return torch.matmul(probs, cache.v).reshape(1, nh * hd)
