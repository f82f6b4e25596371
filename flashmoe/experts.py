"""Expert fetching: parallel reads of expert blobs from the store, and a byte-budgeted LRU cache in RAM.

The OS page cache sits under this cache (Flash-MoE measured it to be a good expert cache); ours
keeps the hottest blobs in process memory so a hit costs no syscall. Reads go through os.preadv
from a thread pool: it releases the GIL, so K reads of one layer proceed in parallel.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .errors import FlashMoeError
from .store import Store, crc32


@dataclass
class ExpertStats:
    expert_reads: int = 0
    expert_bytes_read: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0


class ExpertCache:
    """Blobs keyed by (layer, expert), least recently used evicted first, never above capacity_bytes."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._blobs: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def get(self, key: tuple[int, int]) -> torch.Tensor | None:
        blob = self._blobs.get(key)
        if blob is not None:
            self._blobs.move_to_end(key)
        return blob

    def put(self, key: tuple[int, int], blob: torch.Tensor) -> int:
        """Insert; returns how many blobs were evicted to make room."""
        size = blob.numel()
        if size > self.capacity_bytes or key in self._blobs:
            return 0
        evicted = 0
        while self.used_bytes + size > self.capacity_bytes:
            _, old = self._blobs.popitem(last=False)
            self.used_bytes -= old.numel()
            evicted += 1
        self._blobs[key] = blob
        self.used_bytes += size
        return evicted

    def __len__(self) -> int:
        return len(self._blobs)


class PendingExperts:
    """Blobs of one layer's chosen experts, some cached, some still being read."""

    def __init__(self, ready: dict[int, torch.Tensor], reading: dict[int, Future]):
        self.ready, self.reading = ready, reading

    def wait(self) -> dict[int, torch.Tensor]:
        for expert, future in self.reading.items():
            self.ready[expert] = future.result()
        self.reading = {}
        return self.ready


class ExpertFetcher:
    def __init__(self, store: Store, cache_bytes: int, io_threads: int = 8, verify_reads: bool = False):
        self.store = store
        self.cache = ExpertCache(cache_bytes)
        self.stats = ExpertStats()
        self.verify_reads = verify_reads
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="flashmoe-io")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path) -> int:
        key = str(path)
        with self._lock:
            if key not in self._fds:
                self._fds[key] = os.open(key, os.O_RDONLY)
            return self._fds[key]

    def _read(self, layer: int, expert: int) -> torch.Tensor:
        loc = self.store.expert_location(layer, expert)
        blob = torch.empty(loc.size, dtype=torch.uint8)
        got = os.preadv(self._fd(loc.path), [blob.numpy()], loc.offset)
        if got != loc.size:
            raise FlashMoeError(f"corrupt store: short read of layer {layer} expert {expert} ({got} of {loc.size} bytes)")
        if self.verify_reads and crc32(blob.numpy()) != loc.crc32:
            raise FlashMoeError(f"corrupt store: layer {layer} expert {expert} fails its checksum")
        return blob

    def fetch(self, layer: int, experts: list[int]) -> PendingExperts:
        """Start fetching; cached blobs are ready at once, the rest are read in parallel."""
        ready, reading = {}, {}
        for expert in experts:
            blob = self.cache.get((layer, expert))
            if blob is not None:
                self.stats.cache_hits += 1
                ready[expert] = blob
            else:
                self.stats.cache_misses += 1
                reading[expert] = self._pool.submit(self._read, layer, expert)
        pending = PendingExperts(ready, reading)
        return pending

    def complete(self, layer: int, pending: PendingExperts) -> tuple[dict[int, torch.Tensor], float]:
        """Wait for the reads; returns (blobs by expert, milliseconds spent waiting)."""
        t0 = time.perf_counter()
        newly_read = dict(pending.reading)
        blobs = pending.wait()
        wait_ms = (time.perf_counter() - t0) * 1e3
        for expert in newly_read:
            blob = blobs[expert]
            self.stats.expert_reads += 1
            self.stats.expert_bytes_read += blob.numel()
            self.stats.cache_evictions += self.cache.put((layer, expert), blob)
        return blobs, wait_ms

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
