"""Routing traces recorded from a model's router, and routing by a trace instead of the router: for benchmarks of
caching and prefetch under realistic routing.

A trace (traces.py: int [tokens, MoE layers, K]) says which experts token t picks in each MoE layer; the model's
own router still runs (its logits give the kept experts' weights: a softmax over the trace's choices), and
everything after it is unchanged: reads, caches, kernels, CUDA graphs. Position p of a sequence takes trace row
p mod tokens. A one-token step reads its row from a static device buffer that the engine fills before the step
(`begin`), so a captured graph replays the new row.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ModelConfig
from .errors import FlashMoeError
from .kernels import fused


class TraceRouting:
    def __init__(self, trace: np.ndarray, cfg: ModelConfig, device: torch.device):
        trace = np.asarray(trace)
        layers = len(cfg.moe_layers)
        if trace.ndim != 3 or trace.shape[1] != layers or trace.shape[0] < 1 or trace.shape[2] < 1:
            raise FlashMoeError(f"a routing trace is [tokens, {layers} MoE layers, K]; this one is {list(trace.shape)}")
        if not np.issubdtype(trace.dtype, np.integer) or trace.min() < 0 or trace.max() >= cfg.num_experts:
            raise FlashMoeError(f"a routing trace holds expert ids 0..{cfg.num_experts - 1}")
        ascending = np.sort(trace, axis=2)  # as routers give them; equal neighbours are an expert picked twice
        if (np.diff(ascending, axis=2) == 0).any():
            raise FlashMoeError("a routing trace picks an expert twice for one token in one layer")
        self.top_k = trace.shape[2]
        self.ids = torch.as_tensor(ascending, dtype=torch.long, device=device)
        self.layer_index = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        self.num_experts = cfg.num_experts
        self.step_ids = self.ids[0].clone()  # [layers, K]: a one-token step's rows, at a fixed address for graphs
        self.rows: torch.Tensor | None = None  # [T, layers, K]: this forward's rows

    def begin(self, position: int, tokens: int) -> None:
        """Before a forward of `tokens` tokens at `position`: their rows of the trace."""
        n = self.ids.shape[0]
        index = torch.arange(position, position + tokens, device=self.ids.device) % n
        if tokens == 1:
            self.step_ids.copy_(self.ids[index[0]])
            self.rows = self.step_ids[None]
        else:
            self.rows = self.ids[index]

    def route(self, layer: int, logits: torch.Tensor, slot_table: torch.Tensor | None = None,
              counts: torch.Tensor | None = None):
        """(ids [T, K] ascending, float32 weights, slots) as a router returns them, the ids from the trace."""
        ids = self.rows[:, self.layer_index[layer]]
        weights = torch.softmax(logits[:, : self.num_experts].float().gather(1, ids), dim=-1)
        slots = None if slot_table is None else slot_table[ids]
        if counts is not None:
            fused.count_tiers(slots, counts)
        return ids, weights, slots


def replaying(model, routing: TraceRouting):
    """`model` (a family's Model) routing by `routing`: its route replaced, the rest as it is."""
    def route(layer, projections, top_k, slot_table=None, counts=None):
        return routing.route(layer, projections, slot_table, counts)

    model.route = route
    return model


class RoutingRecorder:
    """The experts a model's router picks, forward after forward, as a trace (traces.py's layout). Recording runs the
    layers eagerly (a graph's router output never reaches the host)."""

    def __init__(self, cfg: ModelConfig):
        self.layers = len(cfg.moe_layers)
        self._picks: list[torch.Tensor] = []

    def wrap(self, route):
        def recording(layer, projections, top_k, slot_table=None, counts=None):
            ids, weights, slots = route(layer, projections, top_k, slot_table, counts)
            self._picks.append(ids.detach().to("cpu", copy=True))
            return ids, weights, slots

        return recording

    def trace(self) -> np.ndarray:
        """int64 [tokens, MoE layers, K] of everything recorded so far."""
        if not self._picks:
            return np.zeros((0, self.layers, 0), dtype=np.int64)
        per_forward = [torch.stack(self._picks[i:i + self.layers], dim=1)
                       for i in range(0, len(self._picks), self.layers)]
        return torch.cat(per_forward).numpy()
