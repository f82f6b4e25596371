"""Expert caches as slabs of fixed-size slots: one blob per slot, in host RAM or in VRAM.

Every blob of a store has the same size, so a cache is one big allocation cut into slots: no allocator
churn, O_DIRECT-aligned addresses for free, and a GPU kernel can find any cached expert from its slot
number alone. SlotCache does the bookkeeping (which expert is in which slot); an eviction policy
(eviction.py: LRU, frequency-weighted LRU, decayed LFU) picks what goes when a slot is needed; slots in use by the
layer being computed are locked and never evicted.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .errors import FlashMoeError
from .eviction import LRU, EvictionPolicy
from .store import BLOCK_BYTES

Key = tuple[int, int]  # (layer, expert)


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class SlotCache:
    """`cached_slots` slots that keep blobs plus `staging_slots` that hold a blob only while it is in use.

    Staging slots serve reads when the cache is empty or all its slots are locked (a prefill batch larger than
    the cache), so a budget of 0 still works and caches nothing.
    """

    def __init__(self, cached_slots: int, staging_slots: int, policy: EvictionPolicy | None = None):
        self.cached_slots, self.staging_slots = cached_slots, staging_slots
        self.n_slots = cached_slots + staging_slots
        self.policy = policy if policy is not None else LRU()
        self._slot_of: dict[Key, int] = {}  # cached entries
        self._free = list(range(self.n_slots - 1, -1, -1))
        self._locked: set[int] = set()
        self._staging_in_use: list[int] = []
        self.stats = TierStats()

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: Key) -> bool:
        return key in self._slot_of

    def cached(self) -> dict[Key, int]:
        """A copy of which expert is in which cached slot."""
        return dict(self._slot_of)

    def lookup(self, key: Key) -> int | None:
        """The slot holding `key` (now locked and most recent), or None; counts a hit or a miss."""
        slot = self._slot_of.get(key)
        if slot is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.policy.hit(key)
        self._locked.add(slot)
        return slot

    def assign(self, key: Key) -> int:
        """A locked slot for a blob about to be written: a free cache slot, the policy's victim among the unlocked
        ones, or a staging slot when the cache cannot take it."""
        if len(self._slot_of) < self.cached_slots:  # then a free slot exists: staging never uses cache slots' share
            slot = self._free.pop()
            self._slot_of[key] = slot
            self.policy.insert(key)
        else:
            victim = self.policy.victim(lambda k: self._slot_of[k] in self._locked) if self._slot_of else None
            if victim is not None:
                slot = self._slot_of.pop(victim)
                self.policy.remove(victim)
                self.stats.evictions += 1
                self._slot_of[key] = slot
                self.policy.insert(key)
            else:
                if not self._free:
                    raise RuntimeError("expert cache: more experts in use at once than slots (batch too large)")
                slot = self._free.pop()
                self._staging_in_use.append(slot)
        self._locked.add(slot)
        return slot

    def forget(self, key: Key) -> None:
        """Drop a cached entry whose slot never received its blob (a failed read)."""
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            self.policy.remove(key)
            self._locked.discard(slot)
            self._free.append(slot)

    def tick(self) -> None:
        """A token is done (policies that weigh recency or decay count in tokens)."""
        self.policy.tick()

    def unlock_all(self) -> None:
        self._locked.clear()
        self._free.extend(self._staging_in_use)
        self._staging_in_use.clear()


CUDA_HOST_REGISTER_PORTABLE = 1


class PinningFailed(FlashMoeError):
    """A host slab could not be registered with CUDA."""


def host_slab(n_slots: int, slot_bytes: int, pinned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(backing, slab): slab is [n_slots, slot_bytes] uint8 starting on a BLOCK_BYTES boundary (O_DIRECT needs it).

    Pinned slabs are registered with cudaHostRegister rather than allocated pinned: torch's pinned allocator
    rounds sizes up to a power of two, which for a 36 GB cache would pin 64 GB. Only whole pages inside the
    allocation are registered (slot_bytes is a multiple of the page), so no other buffer shares them, and they
    are unregistered when the backing tensor goes away. Untouched pages of an unpinned slab cost no RAM.
    """
    backing = torch.empty(n_slots * slot_bytes + BLOCK_BYTES, dtype=torch.uint8)
    start = (-backing.data_ptr()) % BLOCK_BYTES
    slab = backing[start : start + n_slots * slot_bytes].view(n_slots, slot_bytes)
    if pinned and slab.numel():
        cudart = torch.cuda.cudart()
        ptr = slab.data_ptr()
        # portable: pinned (and readable by the kernels) for every GPU's context, for a model over several GPUs
        rc = int(cudart.cudaHostRegister(ptr, slab.numel(), CUDA_HOST_REGISTER_PORTABLE))
        if rc != 0:
            cudart.cudaGetLastError()  # clear it, or torch reports it at the next unrelated CUDA call
            raise PinningFailed(f"cannot pin {slab.numel() / 1e9:.2f} GB of RAM for the expert cache (cudaHostRegister: "
                                f"CUDA error {rc}); pass a smaller cache_gb (--cache-gb)")
        weakref.finalize(backing, cudart.cudaHostUnregister, ptr)
    return backing, slab
