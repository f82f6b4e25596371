"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over a cache of the compressed latent.

Per token the cache keeps the normed KV latent c (kv_lora_rank) and the rotated shared key part k_pe
(qk_rope_head_dim): 576 numbers at DeepSeek-V3's sizes, where expanded keys and values would be 128 heads x 320.
kv_b_proj's two halves are absorbed into the query and the output instead of expanding the cache: a head's score is
(q_nope W_uk) . c + q_pe . k_pe, and its output W_uv (sum_t p_t c_t). Every path (prompt, decode, a graph's static
decode) computes it this way, so they agree to rounding.

Weights under the layer's prefix (store names): q_a_proj / q_a_layernorm / q_b_proj (or q_proj without a q LoRA),
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import fused
from ..kernels.linear import linear
from .attention import grown, sdpa_backends


@dataclass(frozen=True)
class MLASpec:
    heads: int
    q_lora_rank: int  # 0: queries straight from q_proj
    kv_lora_rank: int
    nope_dim: int  # qk_nope_head_dim
    rope_dim: int  # qk_rope_head_dim
    v_dim: int  # v_head_dim
    eps: float
    scale: float  # the softmax scale (YaRN's mscale included)
    rope_interleave: bool  # the checkpoint's rope dims come in (x0, x1) pairs (DeepSeek's), not halves
    rope_attention_factor: float = 1.0  # YaRN's scaling of cos and sin


@dataclass
class LatentCache:
    """The latent of every position so far, [1, capacity, kv_lora_rank + rope_dim], grown by doubling (the same
    interface as attention.KVCache: reserve, capacity, length, `k`)."""

    k: torch.Tensor | None = None
    length: int = 0

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def reserve(self, length: int, like: torch.Tensor) -> None:
        if length > self.capacity:
            self.k = grown(self.k, self.length, like, length)

    def append(self, latent: torch.Tensor) -> torch.Tensor:
        n = latent.shape[0]
        self.reserve(self.length + n, latent[None])
        self.k[0, self.length : self.length + n] = latent
        self.length += n
        return self.k[0, : self.length]


class MLA:
    def __init__(self, spec: MLASpec, inv_freq: torch.Tensor):
        self.spec, self.inv_freq = spec, inv_freq
        d = spec.rope_dim
        # (x0, x1, x2, ...) -> (x0, x2, ..., x1, x3, ...): interleaved pairs as rotate-half's halves
        self.deinterleave = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)]).to(inv_freq.device)

    @staticmethod
    def absorb(kv_b: torch.Tensor, spec: MLASpec) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj [heads * (nope + v), rank] -> (W_uk [heads, nope, rank], W_uv [heads, v, rank])."""
        w = kv_b.view(spec.heads, spec.nope_dim + spec.v_dim, spec.kv_lora_rank)
        return w[:, : spec.nope_dim].contiguous(), w[:, spec.nope_dim :].contiguous()

    def _queries_and_latent(self, w: dict, p: str, h: torch.Tensor, positions: torch.Tensor):
        """Queries as [T, heads, rank + rope] (the no-position part already through W_uk) and the new positions'
        latents [T, rank + rope] (normed c, rotated k_pe)."""
        s = self.spec
        t = h.shape[0]
        if s.q_lora_rank:
            q = linear(fused.rms_norm(linear(h, w[p + "q_a_proj.weight"]), w[p + "q_a_layernorm.weight"], s.eps,
                                      zero_centred=False), w[p + "q_b_proj.weight"])
        else:
            q = linear(h, w[p + "q_proj.weight"])
        q = q.view(t, s.heads, s.nope_dim + s.rope_dim)
        q_nope, q_pe = q[..., : s.nope_dim], q[..., s.nope_dim :]
        kv = linear(h, w[p + "kv_a_proj_with_mqa.weight"])
        c = fused.rms_norm(kv[:, : s.kv_lora_rank], w[p + "kv_a_layernorm.weight"], s.eps, zero_centred=False)
        k_pe = kv[:, s.kv_lora_rank :]
        if s.rope_interleave:
            q_pe, k_pe = q_pe[..., self.deinterleave], k_pe[..., self.deinterleave]
        # the fused rope op reads [T, heads x queries | one key head]; no norms
        q_pe, k_pe = fused.qk_norm_rope(torch.cat([q_pe.reshape(t, -1), k_pe], dim=1).contiguous(), positions, None,
                                        None, self.inv_freq, s.heads, 1, s.rope_dim, s.eps, False, "none")
        if s.rope_attention_factor != 1.0:
            q_pe, k_pe = q_pe * s.rope_attention_factor, k_pe * s.rope_attention_factor
        q_latent = torch.einsum("thd,hdr->thr", q_nope, w[p + "kv_b_proj.uk"])
        return torch.cat([q_latent, q_pe], dim=-1), torch.cat([c, k_pe[:, 0]], dim=-1)

    def _out(self, w: dict, p: str, out_latent: torch.Tensor) -> torch.Tensor:
        """[T, heads, rank] -> through W_uv and o_proj -> [T, hidden]."""
        out = torch.einsum("thr,hvr->thv", out_latent, w[p + "kv_b_proj.uv"])
        return linear(out.reshape(out.shape[0], -1), w[p + "o_proj.weight"])

    def attend_many(self, w: dict, p: str, h: torch.Tensor, caches: list[LatentCache], starts: list[int],
                    bounds: list[tuple[int, int]]) -> torch.Tensor:
        """As layers.attention.Attention.attend_many; here one sequence at a time (its projections included)."""
        outs = [self.attend(w, p, h[a:b], cache, start) for (a, b), cache, start in zip(bounds, caches, starts)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # one sequence (mix): no copy

    def attend(self, w: dict, p: str, h: torch.Tensor, cache: LatentCache, start: int) -> torch.Tensor:
        s = self.spec
        t = h.shape[0]
        q, latent = self._queries_and_latent(w, p, h, torch.arange(start, start + t, device=h.device))
        keys = cache.append(latent)  # [L, rank + rope]
        past = keys.shape[0] - t
        mask = None
        if t > 1 and past:
            mask = torch.ones(t, keys.shape[0], dtype=torch.bool, device=h.device).tril(past)
        with sdpa_backends(h.device):
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None, None],
                                                 keys[None, None, :, : s.kv_lora_rank], attn_mask=mask,
                                                 is_causal=mask is None and t > 1, scale=s.scale, enable_gqa=True)[0]
        return self._out(w, p, out.transpose(0, 1))

    def attend_many_at(self, w: dict, p: str, h: torch.Tensor, caches: list[LatentCache], positions: torch.Tensor,
                       table: None = None) -> torch.Tensor:
        """As layers.attention.Attention.attend_many_at; here one sequence at a time (its projections included). No
        table: a latent cache has no addresses(), so a batch graph holds the sequences themselves."""
        outs = [self.attend_at(w, p, h[i : i + 1], cache, positions[i : i + 1]) for i, cache in enumerate(caches)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def attend_at(self, w: dict, p: str, h: torch.Tensor, cache: LatentCache, position: torch.Tensor) -> torch.Tensor:
        """One token at device position `position`, over the cache's whole capacity under a mask (for a graph)."""
        s = self.spec
        q, latent = self._queries_and_latent(w, p, h, position)
        cache.k[0].index_copy_(0, position, latent)
        keys = cache.k[0]  # [capacity, rank + rope]
        scores = torch.matmul(q[0], keys.transpose(0, 1)).float() * s.scale  # [heads, capacity]
        visible = torch.arange(cache.capacity, device=h.device) <= position
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(keys.dtype)
        return self._out(w, p, torch.matmul(probs, keys[:, : s.kv_lora_rank])[None])
