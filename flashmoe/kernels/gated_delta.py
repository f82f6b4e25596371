"""The gated delta rule (Gated DeltaNet), chunked for prompts and recurrent for decode; torch reference.

Shapes: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g (log decay, <= 0) and beta [B, T, Hv];
state [B, Hv, Dk, Dv] in float32. Each q/k head serves Hv / Hk consecutive value heads.
Same math as transformers' torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_native import gated_delta_step


def _prepare(q, k, v, g, beta):
    hk, hv = k.shape[2], v.shape[2]
    if hk != hv:
        q = q.repeat_interleave(hv // hk, dim=2)
        k = k.repeat_interleave(hv // hk, dim=2)
    q, k, v, g, beta = (x.transpose(1, 2).float().contiguous() for x in (q, k, v, g, beta))
    q, k = l2norm(q), l2norm(k)
    q = q * q.shape[-1] ** -0.5
    return q, k, v, g, beta


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _decay(log_decay: torch.Tensor) -> torch.Tensor:
    """exp of a log decay, exactly 0 below e^-30. A chunk's cumulated decays reach e^-87..e^-103 and beyond (fast
    heads, or random weights), whose exps are denormal floats, and on x86 every product with a denormal takes a
    microcode assist: a prompt's triangular solves (64-token chunks, 32 heads) took 10 ms instead of 3.5 on an idle
    2-core VM, and up to 820 ms while its cores were shared. What is dropped is below 1e-13 of the undecayed terms
    beside it."""
    return log_decay.masked_fill(log_decay < -30.0, float("-inf")).exp()


def recurrent_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor | None):
    """One step at a time; returns (out [B, T, Hv, Dv] in v's dtype, final state)."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    s = torch.zeros(b, h, dk, dv, dtype=torch.float32, device=v.device) if state is None else state.float()
    out = torch.empty(b, h, t, dv, dtype=torch.float32, device=v.device)
    for i in range(t):
        s = s * g[:, :, i].exp()[..., None, None]
        kv_mem = torch.einsum("bhkv,bhk->bhv", s, k[:, :, i])
        delta = (v[:, :, i] - kv_mem) * beta[:, :, i, None]
        s = s + k[:, :, i, :, None] * delta[:, :, None, :]
        out[:, :, i] = torch.einsum("bhkv,bhk->bhv", s, q[:, :, i])
    return out.transpose(1, 2).to(out_dtype), s


def chunk_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor | None, chunk_size: int = 64):
    """Chunk-parallel form (UT transform inside a chunk, a scan across chunks); equals the recurrent form."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    pad = (chunk_size - t % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // chunk_size
    v_beta = v * beta[..., None]
    k_beta = k * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(b, h, n, chunk_size, -1) for x in (q, k, k_beta, v_beta))
    g = g.reshape(b, h, n, chunk_size).cumsum(-1)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=v.device).triu(1)
    decay = _decay((g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")))
    # (I + strictly-lower part) is the UT system; unitriangular=True reads only that, whatever the diagonal holds
    system = (k_beta @ k.transpose(-1, -2)) * decay
    decay_from_start = _decay(g)[..., None]  # each position's decay since its chunk began
    # both right-hand sides in one solve (one pass over the systems)
    uw = torch.linalg.solve_triangular(system, torch.cat([v_beta, k_beta * decay_from_start], dim=-1), upper=False,
                                       unitriangular=True)
    u, w = uw[..., :dv], uw[..., dv:]
    attn = (q @ k.transpose(-1, -2)) * decay
    s = torch.zeros(b, h, dk, dv, dtype=torch.float32, device=v.device) if state is None else state.float()
    q_decayed = q * decay_from_start
    k_decayed = k * _decay(g[..., -1:] - g)[..., None]
    out = torch.empty(b, h, n, chunk_size, dv, dtype=torch.float32, device=v.device)
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ s
        out[:, :, i] = q_decayed[:, :, i] @ s + attn[:, :, i] @ v_new
        s = s * _decay(g[:, :, i, -1])[..., None, None] + k_decayed[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(b, h, -1, dv)[:, :, :t]
    return out.transpose(1, 2).to(out_dtype), s


try:  # flash-linear-attention's Triton kernels (the fla-core package), used on CUDA when installed
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as _fla_recurrent
except Exception:  # not installed, or no triton: the torch path serves
    _fla_chunk = _fla_recurrent = None


def fla_available() -> bool:
    return _fla_chunk is not None


def gated_delta_rule(q, k, v, g, beta, state: torch.Tensor | None):
    """The rule through fla-core on CUDA when it is installed, a decode token on the CPU through our kernel
    (kernels/cpu_native.c) where it is built, else the torch reference; same shapes and math (fla and ours normalise
    q and k in the kernel and take the grouped value heads as they are)."""
    t = q.shape[1]
    if q.is_cuda and fla_available():
        rule = _fla_recurrent if t == 1 else _fla_chunk
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        out, final = rule(q, k, v, g=g.float().contiguous(), beta=beta, scale=q.shape[-1] ** -0.5,
                          initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
        return out.to(v.dtype), final
    if t == 1 and q.shape[0] == 1 and q.device.type == "cpu" and (step := gated_delta_step(q, k, v, g, beta, state)):
        return step  # our CPU kernel: one call instead of ~30 ops
    rule = recurrent_gated_delta_rule if t == 1 else chunk_gated_delta_rule
    return rule(q, k, v, g, beta, state)
