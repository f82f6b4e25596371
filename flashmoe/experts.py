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
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from .errors import FlashMoeError
from .store import ExpertLocation, Store, crc32


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
        """Insert; returns how many blobs were evicted to make room, or -1 if the blob was not kept."""
        size = blob.numel()
        if size > self.capacity_bytes or key in self._blobs:
            return -1
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
    """Blobs of one layer's chosen experts: some cached (ready now), some still being read."""

    def __init__(self, ready: dict[int, torch.Tensor], reading: dict[Future, int]):
        self.ready, self.reading = ready, reading
        self.wait_ms = 0.0  # time spent blocked on reads


class ExpertFetcher:
    def __init__(self, store: Store, cache_bytes: int, io_threads: int = 8, verify_reads: bool = False):
        self.store = store
        self.cache = ExpertCache(cache_bytes)
        self.stats = ExpertStats()
        self.verify_reads = verify_reads
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="flashmoe-io")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        # read buffers of blobs the cache did not keep, reused so the allocator does not hoard freed ones
        self._spare: list[torch.Tensor] = []
        self._spare_limit = 2 * io_threads

    def _fd(self, path) -> int:
        key = str(path)
        with self._lock:
            if key not in self._fds:
                self._fds[key] = os.open(key, os.O_RDONLY)
            return self._fds[key]

    def _buffer(self, size: int) -> torch.Tensor:
        """A read buffer, allocated on the calling thread: buffers made in reader threads land in per-thread
        malloc arenas that keep freed memory (measured: 8 threads grew RSS by ~20 MB more than 1 thread)."""
        with self._lock:
            if self._spare and self._spare[-1].numel() == size:
                return self._spare.pop()
        return torch.empty(size, dtype=torch.uint8)

    def _read(self, layer: int, expert: int, loc: ExpertLocation, blob: torch.Tensor) -> torch.Tensor:
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
                loc = self.store.expert_location(layer, expert)
                reading[self._pool.submit(self._read, layer, expert, loc, self._buffer(loc.size))] = expert
        return PendingExperts(ready, reading)

    def iter_blobs(self, layer: int, pending: PendingExperts) -> Iterator[tuple[int, torch.Tensor]]:
        """(expert, blob) pairs: cached ones first, then each read as soon as it lands, so compute overlaps I/O.

        Holding only the blob in hand keeps memory to what is in flight, not a whole layer's experts.
        """
        yield from pending.ready.items()
        remaining = set(pending.reading)
        while remaining:
            t0 = time.perf_counter()
            done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            pending.wait_ms += (time.perf_counter() - t0) * 1e3
            for future in done:
                expert, blob = pending.reading[future], future.result()
                self.stats.expert_reads += 1
                self.stats.expert_bytes_read += blob.numel()
                kept = self.cache.put((layer, expert), blob)
                self.stats.cache_evictions += max(kept, 0)
                yield expert, blob  # the consumer is done with it when the loop comes back here
                if kept < 0:
                    with self._lock:
                        if len(self._spare) < self._spare_limit:
                            self._spare.append(blob)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
