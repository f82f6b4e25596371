"""Routed-expert math, torch reference: dequantize an expert blob, SwiGLU through it, weighted sum over experts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import fp8block, mxfp4
from ..quant import QuantizedTensor, dequantize
from .linear import linear


def expert_weights(views: dict[str, torch.Tensor], bits: int | None, group_size: int | None,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob views (see store.BlobLayout) -> dense (gate_up [2I, H], down [H, I]) in `dtype`."""
    if bits is None:
        return views["gate_up.weight"].to(dtype), views["down.weight"].to(dtype)
    dense = []
    for name in ("gate_up", "down"):
        if f"{name}.biases" not in views:  # MXFP4 (e8m0 scales) or FP8 (float32 row-block scales)
            scheme = mxfp4 if views[f"{name}.scales"].dtype == torch.uint8 else fp8block
            dense.append(scheme.dequantize(views[f"{name}.packed"], views[f"{name}.scales"], dtype))
            continue
        q = QuantizedTensor(views[f"{name}.packed"], views[f"{name}.scales"], views[f"{name}.biases"], bits, group_size)
        dense.append(dequantize(q, dtype))
    return dense[0], dense[1]


@dataclass(frozen=True)
class ExpertMath:
    """How a routed expert computes besides its two matrices: GPT-OSS adds a bias after each and clamps its SwiGLU
    (limit > 0: gate <= limit, |up| <= limit, act = (up + 1) * gate * sigmoid(alpha * gate)); the others are plain."""

    bias: bool = False
    limit: float = 0.0
    alpha: float = 1.0

    @classmethod
    def of(cls, cfg) -> "ExpertMath":
        return cls(cfg.expert_bias, cfg.swiglu_limit, cfg.swiglu_alpha)

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if not self.limit:
            return F.silu(gate) * up
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)


PLAIN = ExpertMath()


def expert_biases(views: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An expert blob's gate_up and down biases (GPT-OSS), or None where it has none."""
    return tuple(views[f"{n}.bias"].to(dtype) if f"{n}.bias" in views else None for n in ("gate_up", "down"))


def swiglu_mlp(x: torch.Tensor, gate_up, down, math: ExpertMath = PLAIN,
               biases: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
    """SwiGLU through [2I, H] and [H, I] weights: tensors, or compressed resident matrices (kernels/linear.py); with
    an expert's biases and activation where `math` says."""
    h = linear(x, gate_up)
    if biases[0] is not None:
        h = h + biases[0]
    gate, up = h.chunk(2, dim=-1)
    y = linear(math.activation(gate, up), down)
    return y if biases[1] is None else y + biases[1]


def routed_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   experts: Iterable[tuple[int, Callable[[torch.Tensor], torch.Tensor]]]) -> torch.Tensor:
    """sum_k w[t, k] * expert_{ids[t, k]}(x[t]); each expert runs once over all the tokens that chose it.

    `experts` yields (expert id, its MLP: rows of x -> rows of output), so an expert's weights are touched one
    expert at a time, in whatever order they arrive. The sum runs in expert order, so the result does not depend
    on which read finished first.
    """
    out = torch.zeros_like(x)
    if x.shape[0] == 1:  # one token (decode): every expert it chose runs on it; no gather, no scatter
        weight_of = dict(zip(topk_ids[0].tolist(), topk_weights[0].tolist()))
        partial = {expert: mlp(x) for expert, mlp in experts if expert in weight_of}
        for expert in sorted(partial):
            out += partial[expert] * weight_of[expert]
        return out
    partial = {}
    for expert, mlp in experts:
        token_idx, slot = torch.where(topk_ids == expert)
        if token_idx.numel() == 0:
            continue
        y = mlp(x[token_idx]) * topk_weights[token_idx, slot, None].to(x.dtype)
        partial[expert] = (token_idx, y)
    for expert in sorted(partial):
        out.index_add_(0, *partial[expert])
    return out
