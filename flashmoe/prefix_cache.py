"""Sequence states kept where the next request is likely to branch, so a chat's next turn prefills only what is new.

A hybrid model's DeltaNet state cannot be cut back to an earlier token the way a KV cache can, so states are kept
whole, as snapshots, at the two places a following turn starts from: the end of a prompt and the end of a reply.
A request whose tokens begin with a snapshot's starts from a copy of it and prefills only the rest. Snapshots live
in RAM (copied back to each layer's device on a hit), in an LRU bounded in bytes.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, fields

import torch


def copy_cache(cache, device: torch.device | str | None = None):
    """A copy of one layer's cache (KVCache, LatentCache, DeltaNetState: a dataclass of tensors and ints) on `device`
    (each tensor's own device when None). Position-indexed tensors ([rows, capacity, width] with a `length`) are cut to
    their filled length: the copy holds what was computed, not the reserve."""
    length = getattr(cache, "length", None)
    values = {}
    for f in fields(cache):
        v = getattr(cache, f.name)
        if isinstance(v, torch.Tensor):
            if length is not None and v.dim() == 3:
                v = v[:, :length]
            v = v.to(device or v.device, copy=True)
        values[f.name] = v
    return type(cache)(**values)


def _nbytes(cache) -> int:
    return sum(v.numel() * v.element_size() for f in fields(cache) if isinstance(v := getattr(cache, f.name), torch.Tensor))


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
        if not key or key in self._entries:
            if key:
                self._entries.move_to_end(key)
            return
        size = sum(_nbytes(c) for c in layers if c is not None)
        if size > self.max_bytes:
            return
        while self._entries and self.stats.bytes + size > self.max_bytes:
            self.stats.bytes -= self._entries.popitem(last=False)[1].nbytes
        devices = [None if c is None else next((v.device for f in fields(c)
                                                if isinstance(v := getattr(c, f.name), torch.Tensor)), None)
                   for c in layers]
        copies = [None if c is None else copy_cache(c, "cpu") for c in layers]
        self._entries[key] = Snapshot(key, copies, devices, size)
        self.stats.bytes += size
        self.stats.snapshots = len(self._entries)

    @staticmethod
    def restore(snap: Snapshot) -> list:
        """Fresh caches for a new sequence from a snapshot (which stays cached), each on its layer's device."""
        return [None if c is None else copy_cache(c, d) for c, d in zip(snap.layers, snap.devices)]
