"""Sequence states kept where the next request is likely to branch, so a chat's next turn prefills only what is new.

A hybrid model's DeltaNet state cannot be cut back to an earlier token the way a KV cache can, so states are kept
whole, as snapshots, where a following turn starts from: the end of a prompt, the end of a reply, and the end of a
chat's history before the reply's header (Model.generate's keep_at).
A request whose tokens begin with a snapshot's starts from a copy of it and prefills only the rest. Snapshots live
in RAM (pinned where the state is on a GPU; copied back to each layer's device on a hit), in an LRU bounded in bytes.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, fields

import torch


def _kept(cache) -> dict:
    """A layer's cache (KVCache, LatentCache, DeltaNetState: a dataclass of tensors and ints) as a snapshot keeps it:
    its fields but those marked derived (a restore makes them anew), position-indexed tensors ([rows, capacity,
    width] with a `length`) cut to their filled length, so a snapshot holds (and is counted as) what was computed,
    not the reserve."""
    length = getattr(cache, "length", None)
    values = {f.name: getattr(cache, f.name) for f in fields(cache) if not f.metadata.get("derived")}
    return {name: v[:, :length] if isinstance(v, torch.Tensor) and length is not None and v.dim() == 3 else v
            for name, v in values.items()}


def copy_cache(cache, device: torch.device | str | None = None):
    """A copy of one layer's cache as _kept cuts it, on `device` (each tensor's own device when None)."""
    values = {name: _copy(v, torch.device(device or v.device)) if isinstance(v, torch.Tensor) else v
              for name, v in _kept(cache).items()}
    return type(cache)(**values)


def _copy(v: torch.Tensor, device: torch.device) -> torch.Tensor:
    """v copied to `device`; from a GPU into pinned RAM without the host waiting for it (a snapshot cost ~10 ms a
    put at the 397B geometry, two of them before a turn's first token). The copy is queued on the GPU's stream, so
    it reads v before anything queued after it writes v, and a restore's copy back to that GPU is queued after it:
    nothing reads the RAM copy from the host. Back to the GPU likewise (pinned RAM that no one writes again)."""
    if v.is_cuda and device.type == "cpu":
        return torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
    if device.type == "cuda" and v.device.type == "cpu" and v.is_pinned():
        return v.to(device, non_blocking=True)
    return v.to(device, copy=True)


def _tensors(cache) -> list[torch.Tensor]:
    return [v for v in _kept(cache).values() if isinstance(v, torch.Tensor)]


@dataclass
class Snapshot:
    tokens: tuple[int, ...]
    layers: list  # per layer, a copy of its cache in RAM
    devices: list  # per layer, where its tensors go back to
    nbytes: int


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    tokens_saved: int = 0
    snapshots: int = 0
    bytes: int = 0


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[tuple[int, ...], Snapshot] = collections.OrderedDict()
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, tokens: list[int]) -> Snapshot | None:
        """The snapshot of the longest prefix of `tokens` shorter than them (one token at least is left to compute:
        its logits are the request's first), counted as a hit or a miss."""
        best = None
        for key, snap in self._entries.items():
            if len(key) < len(tokens) and (best is None or len(key) > len(best.tokens)) \
                    and tuple(tokens[: len(key)]) == key:
                best = snap
        if best is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(best.tokens)
        self.stats.hits += 1
        self.stats.tokens_saved += len(best.tokens)
        return best

    def put(self, tokens: list[int], layers: list) -> None:
        """Keep a copy of a state whose caches hold exactly `tokens`, evicting the least recently used snapshots; a
        state larger than the whole budget is not kept."""
        key = tuple(tokens)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        tensors = [[] if c is None else _tensors(c) for c in layers]
        size = sum(t.numel() * t.element_size() for ts in tensors for t in ts)
        if not key or size > self.max_bytes:
            return
        while self._entries and self.stats.bytes + size > self.max_bytes:
            self.stats.bytes -= self._entries.popitem(last=False)[1].nbytes
        devices = [ts[0].device if ts else None for ts in tensors]
        copies = [None if c is None else copy_cache(c, "cpu") for c in layers]
        self._entries[key] = Snapshot(key, copies, devices, size)
        self.stats.bytes += size
        self.stats.snapshots = len(self._entries)

    @staticmethod
    def restore(snap: Snapshot) -> list:
        """Fresh caches for a new sequence from a snapshot (which stays cached), each on its layer's device."""
        return [None if c is None else copy_cache(c, d) for c, d in zip(snap.layers, snap.devices)]
