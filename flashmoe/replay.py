"""Routing traces recorded from a model's router, and routing by a trace instead of the router: for benchmarks of
caching and prefetch under realistic routing.

A trace (traces.py: int [tokens, MoE layers, K]) says which experts token t picks in each MoE layer; the model's
own router still runs (its logits give the kept experts' weights: a softmax over the trace's choices), and
everything after it is unchanged: reads, caches, kernels, CUDA graphs. Position p of a sequence takes trace row
p mod tokens. A set of traces [sequences, tokens, layers, K] (traces.calibrated_sequences: sequences of one model)
gives each sequence its own: the n-th sequence the routing meets replays trace n mod sequences, so a batch's
tokens share experts as a model's concurrent requests do. A one-token step, and a batch of them, read their rows
from static device buffers that the engine fills before the step (`begin`, `begin_batch`), so a captured graph
replays the new rows.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ModelConfig
from .errors import FlashMoeError
from .kernels import fused

MAX_BATCH = 64  # rows of the batch buffer: a batch graph's padded size at most (more rows go eagerly)


class TraceRouting:
    def __init__(self, trace: np.ndarray, cfg: ModelConfig, device: torch.device):
        trace = np.asarray(trace)
        layers = len(cfg.moe_layers)
        sets = trace if trace.ndim == 4 else trace[None]
        if sets.ndim != 4 or sets.shape[2] != layers or min(sets.shape[:2]) < 1 or sets.shape[3] < 1:
            raise FlashMoeError(f"a routing trace is [tokens, {layers} MoE layers, K] (or [sequences, tokens, "
                                f"{layers}, K]); this one is {list(trace.shape)}")
        if not np.issubdtype(trace.dtype, np.integer) or trace.min() < 0 or trace.max() >= cfg.num_experts:
            raise FlashMoeError(f"a routing trace holds expert ids 0..{cfg.num_experts - 1}")
        ascending = np.sort(sets, axis=3)  # as routers give them; equal neighbours are an expert picked twice
        if (np.diff(ascending, axis=3) == 0).any():
            raise FlashMoeError("a routing trace picks an expert twice for one token in one layer")
        self.top_k = sets.shape[3]
        self.ids = torch.as_tensor(ascending, dtype=torch.long, device=device)  # [sequences, tokens, layers, K]
        self.layer_index = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        self.num_experts = cfg.num_experts
        self._sequences = 0  # sequences met so far: the next one replays trace _sequences mod len(ids)
        # a one-token step's rows [layers, K] and a batch's [MAX_BATCH, layers, K], at fixed addresses for graphs
        # (a batch graph's padding rows read whatever valid ids are there)
        self.step_ids = self.ids[0, 0].clone()
        self.batch_ids = self.ids[0, 0].expand(MAX_BATCH, *self.ids.shape[2:]).clone()
        self.rows: torch.Tensor | None = None  # [rows, layers, K]: this forward's, the first rows of the logits'

    def _trace_of(self, state) -> int:
        """Which trace `state`'s sequence replays (the first in the order the routing meets sequences)."""
        if state is None:
            return 0
        if state.trace_sequence is None:
            state.trace_sequence = self._sequences
            self._sequences += 1
        return state.trace_sequence % self.ids.shape[0]

    def _rows_of(self, state, position: int, tokens: int) -> torch.Tensor:
        index = torch.arange(position, position + tokens, device=self.ids.device) % self.ids.shape[1]
        return self.ids[self._trace_of(state), index]

    def begin(self, position: int, tokens: int, state=None) -> None:
        """Before a forward of `tokens` tokens of `state`'s sequence at `position`: their rows of its trace."""
        if tokens == 1:
            self.step_ids.copy_(self._rows_of(state, position, 1)[0])
            self.rows = self.step_ids[None]
        else:
            self.rows = self._rows_of(state, position, tokens)

    def begin_batch(self, entries: list[tuple[object, int]]) -> None:
        """Before a forward of several sequences' tokens ((state, tokens) each, in the batch's row order, each at its
        state's position): their rows, one after the other; one token each goes through the batch buffer."""
        if all(n == 1 for _, n in entries) and len(entries) <= MAX_BATCH:
            which = torch.tensor([[self._trace_of(state), state.position % self.ids.shape[1]] for state, _ in entries],
                                 device=self.ids.device)
            self.batch_ids[: len(entries)].copy_(self.ids[which[:, 0], which[:, 1]])
            self.rows = self.batch_ids
        else:
            self.rows = torch.cat([self._rows_of(state, state.position, n) for state, n in entries])

    def route(self, layer: int, logits: torch.Tensor, slot_table: torch.Tensor | None = None,
              counts: torch.Tensor | None = None):
        """(ids [T, K] ascending, float32 weights, slots) as a router returns them, the ids from the trace."""
        ids = self.rows[: logits.shape[0], self.layer_index[layer]]
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
