"""One sequence's state across a forward pass, whatever the family: each layer's cache (the family's kind) and
where the sequence stands."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SequenceState:
    layers: list = field(default_factory=list)  # per layer, its family's cache (a KVCache, a recurrent state, ...)
    position: int = 0  # tokens seen so far
    decode_steps: int = 0  # forward calls of one token
    decode_graphs: dict = field(default_factory=dict)  # layer -> captured CUDA graphs bound to this state's tensors
    position_t: torch.Tensor | None = None  # `position` on the device, for graphs that cannot read a host int
    positions_t: dict = field(default_factory=dict)  # device -> its position_t, for a model over several devices
    pipeline_id: int | None = None  # how the ranks of a served distributed model name this sequence
    addresses: tuple | None = None  # (its KV caches' capacities, its row of a batch graph's table): decode_graphs
    trace_sequence: int | None = None  # which trace of a set it replays under routing by traces (replay.py)
