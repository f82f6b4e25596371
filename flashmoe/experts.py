"""Expert fetching: the blobs of a layer's chosen experts, from SSD to RAM and, on a GPU, on to VRAM.

Tiers, fastest first: a VRAM slab (GPU only), a RAM slab (pinned on a GPU machine, so copies from it are
asynchronous DMA), the OS page cache (Flash-MoE measured it to be a good expert cache), the SSD. Reads go
through os.preadv from a thread pool (it releases the GIL, so the K reads of a layer run in parallel),
straight into RAM slots; direct_io opens the files with O_DIRECT, so reads bypass the page cache and cost
no second copy. On a GPU, copies of experts already in RAM start as soon as the router has chosen them,
on a stream of their own, and the rest follow each read as it lands; compute waits on an event, not the host.

Per layer: `with fetcher.fetch(layer, experts) as f:` ... arrivals(f) (CPU) or gpu_slots(f) (GPU) ...; leaving the
block releases the slots whatever happened inside it (an error, Ctrl-C), and an interrupted fetch leaves no
expert in a cache whose blob did not arrive.
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from .errors import FlashMoeError
from .eviction import policy_for
from .expert_cache import SlotCache, host_slab
from .memory import ram_available
from .store import ExpertLocation, Store, crc32


# benchmarks/RESULTS.md (cache_sim.py): on routing calibrated to published traces of a 512-expert model, popularity
# plus reuse keeps 8-10 points more hits than LRU at 5% of the experts and up to 2.7 more than frequency-weighted LRU,
# on the trained small model's trace 0.5-0.9 more; under uniform routing none differs
DEFAULT_CACHE_POLICY = "reuse-frequency"


@dataclass
class ExpertStats:
    expert_reads: int = 0
    expert_bytes_read: int = 0
    expert_bytes_copied: int = 0  # host -> VRAM
    expert_bytes_zero_copy: int = 0  # read by the kernels straight from pinned RAM


@dataclass
class LayerFetch:
    """One batch of one layer's experts on their way; `experts` is the order of gpu_slots()'s answer."""

    layer: int
    experts: list[int]
    ram_slot: dict[int, int] = field(default_factory=dict)  # expert -> RAM slot, for experts coming through RAM
    vram_slot: dict[int, int] = field(default_factory=dict)
    ready: list[int] = field(default_factory=list)  # in RAM now
    reading: dict[Future, int] = field(default_factory=dict)
    landed: set[int] = field(default_factory=set)  # reads that completed
    to_vram: list[int] = field(default_factory=list)  # given a new VRAM slot: their blob must be copied in
    copied: set[int] = field(default_factory=set)  # VRAM copies queued
    wait_ms: float = 0.0  # host time blocked on reads


# of what the machine has free when a model loads, the most an expert cache may take: the rest is for the resident
# weights' working memory, the page cache and the other processes
MACHINE_SHARE = 0.9


def check_fits(memory: str, option: str, cache_bytes: int, free_bytes: int, what: str = "experts") -> None:
    """One line, before anything is allocated, when a cache would not fit in what the machine has free (a pinned
    slab larger than RAM fails to register; an unpinned one is killed by the OOM killer once it fills)."""
    if cache_bytes > MACHINE_SHARE * free_bytes:
        raise FlashMoeError(f"{option} asks for {cache_bytes / 1e9:.1f} GB of {memory} for {what}, but "
                            f"{free_bytes / 1e9:.1f} GB is free; pass at most {option}="
                            f"{MACHINE_SHARE * free_bytes / 1e9:.1f}")


class ExpertFetcher:
    def __init__(self, store: Store, device: torch.device, ram_cache_bytes: int, vram_cache_bytes: int = 0,
                 batch_experts: int = 32, io_threads: int = 8, direct_io: bool = False, verify_reads: bool = False,
                 zero_copy: bool = True, cache_policy: str = DEFAULT_CACHE_POLICY, kernel_form=None,
                 layers: list[int] | None = None, host: "ExpertFetcher | None" = None):
        """kernel_form (CPU): slots are kernel_form.slot_bytes and each blob is turned into its kernel form by
        kernel_form.prepare(slot) in the reading thread as it lands, so the RAM cache holds what the kernel reads.
        layers: the MoE layers whose experts this fetcher serves (default all; a model over several GPUs has one
        fetcher per GPU, for its block of layers: placement.py). host: another device's fetcher whose RAM tier, I/O
        pool and open files this one shares (ram_cache_bytes is then ignored)."""
        self.store = store
        self.kernel_form = kernel_form
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.batch_experts = batch_experts
        self.direct_io = direct_io
        self.verify_reads = verify_reads
        self.stats = ExpertStats()
        blob = store.expert_blob_bytes
        self.layers = set(store.config.moe_layers if layers is None else layers)
        # no cache needs more slots than this
        every_expert = self.every_expert = len(self.layers) * store.config.num_experts
        slot_bytes = blob if kernel_form is None else kernel_form.slot_bytes
        if self.on_gpu:  # before anything is allocated there
            check_fits("VRAM", "vram_cache_gb", (min(vram_cache_bytes // blob, every_expert) + batch_experts) * blob,
                       torch.cuda.mem_get_info(device)[0])
        self.zero_copy = zero_copy and self.on_gpu
        self._slot_table: torch.Tensor | None = None  # on the device; rewritten in place (graphs hold its address)
        self._slot_table_current = False
        self.resident_in_ram = 0  # of the slot table's experts, how many are read from pinned RAM
        # experts the GPU used through the slot table: [in VRAM, in pinned RAM], counted by the router's kernel
        self.resident_counts = torch.zeros(2, dtype=torch.int64, device=device) if self.on_gpu else None
        self._counts_taken = [0, 0]  # only ever grows on the GPU: a reader on another thread (metrics) loses nothing
        self.owns_host = host is None
        if host is not None:
            self.ram, self._ram_backing, self.ram_slab = host.ram, host._ram_backing, host.ram_slab
            self._pool, self._fds, self._lock, self._siblings = host._pool, host._fds, host._lock, host._siblings
            self._siblings.add(self)
        else:
            ram_slots = min(ram_cache_bytes // slot_bytes, store.expert_bytes // blob)
            # each tier's slab: its cached slots and a batch of staging slots (expert_cache.SlotCache)
            check_fits("RAM", "cache_gb", (ram_slots + batch_experts) * slot_bytes, ram_available())
            self.ram = SlotCache(ram_slots, batch_experts, policy_for(cache_policy, ram_slots, store.expert_bytes // blob))
            self._ram_backing, self.ram_slab = host_slab(self.ram.n_slots, slot_bytes, pinned=self.on_gpu)
            self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="flashmoe-io")
            self._fds: dict[str, int] = {}
            self._lock = threading.Lock()
            # the fetchers sharing this RAM tier (one per device). Weak: a fetcher in a cycle of its own would be freed
            # by the garbage collector at any moment, and its pinned slab's unregistering then breaks a graph capture
            self._siblings: weakref.WeakSet[ExpertFetcher] = weakref.WeakSet([self])
        self.vram: SlotCache | None = None
        if self.on_gpu:
            vram_slots = min(vram_cache_bytes // blob, every_expert)
            self.vram = SlotCache(vram_slots, batch_experts, policy_for(cache_policy, vram_slots, every_expert))
            self.vram_slab = torch.empty(self.vram.n_slots, blob, dtype=torch.uint8, device=device)
            self.copy_stream = torch.cuda.Stream(device)
        self._copies_done: torch.cuda.Event | None = None

    # ---- reads -----------------------------------------------------------------------------
    def _fd(self, path) -> int:
        key = str(path)
        with self._lock:
            if key not in self._fds:
                flags = os.O_RDONLY | (os.O_DIRECT if self.direct_io else 0)
                try:
                    self._fds[key] = os.open(key, flags)
                except OSError as exc:
                    if self.direct_io and exc.errno == errno.EINVAL:
                        raise FlashMoeError(f"the file system holding {key} does not support O_DIRECT; "
                                            "run without direct_io (--direct-io)") from None
                    raise FlashMoeError(f"cannot open {key}: {exc.strerror}") from None
            return self._fds[key]

    def _read(self, layer: int, expert: int, loc: ExpertLocation, slot: int) -> None:
        buf = self.ram_slab[slot, : loc.size].numpy()
        try:
            got = os.preadv(self._fd(loc.path), [buf], loc.offset)
        except OSError as exc:
            raise FlashMoeError(f"cannot read layer {layer} expert {expert} from {loc.path}: {exc.strerror}") from None
        if got != loc.size:
            raise FlashMoeError(f"corrupt store: short read of layer {layer} expert {expert} ({got} of {loc.size} bytes)")
        if self.verify_reads and crc32(buf) != loc.crc32:
            raise FlashMoeError(f"corrupt store: layer {layer} expert {expert} fails its checksum")
        if self.kernel_form is not None:
            self.kernel_form.prepare(self.ram_slab[slot])

    # ---- one batch of one layer ------------------------------------------------------------
    def start(self, layer: int, experts: list[int]) -> LayerFetch:
        """Look the experts up tier by tier; start reads of RAM misses and copies of what RAM already holds."""
        if len(experts) > self.batch_experts and not self.all_cached(layer, experts):
            raise ValueError(f"at most {self.batch_experts} experts per fetch unless all are cached, not {len(experts)}")
        f = LayerFetch(layer, list(experts))
        if self.on_gpu:
            for sibling in self._siblings:  # RAM staging slots are reused only once their last copy (any GPU's) is done
                if sibling._copies_done is not None:
                    sibling._copies_done.synchronize()
            # VRAM slots given up below may still feed kernels already queued: copies into them wait for those
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            self._look_up(f)
        except BaseException:
            self.abort(f)
            raise
        return f

    def _look_up(self, f: LayerFetch) -> None:
        layer = f.layer
        for expert in f.experts:
            key = (layer, expert)
            if self.vram is not None:
                slot = self.vram.lookup(key)
                if slot is not None:
                    f.vram_slot[expert] = slot
                    continue
                f.vram_slot[expert] = self.vram.assign(key)
                f.to_vram.append(expert)
                self._slot_table_current = False
            slot = self.ram.lookup(key)
            if slot is None:
                slot = self.ram.assign(key)
                self._ram_changed()
                loc = self.store.expert_location(layer, expert)
                f.reading[self._pool.submit(self._read, layer, expert, loc, slot)] = expert
            else:
                f.ready.append(expert)
            f.ram_slot[expert] = slot
        if self.on_gpu:
            for expert in f.ready:
                self._copy_to_vram(f, expert)

    def _ram_changed(self) -> None:
        """The RAM tier changed: every device's slot table may point at a RAM slot that now holds another expert."""
        for fetcher in self._siblings:
            fetcher._slot_table_current = False

    def all_cached(self, layer: int, experts: list[int]) -> bool:
        """Whether the fastest tier holds every one of `experts`: then one fetch may take them all, since no read or
        copy needs a staging slot (a prompt's layer is then one batch, not one per `batch_experts`)."""
        tier = self.vram if self.vram is not None else self.ram
        return all((layer, e) in tier for e in experts)

    @contextmanager
    def fetch(self, layer: int, experts: list[int]) -> Iterator[LayerFetch]:
        """start(); the body queues the compute; then finish(), or abort() if the body raised (Ctrl-C too): slots
        left locked would make every later fetch fail, and a slot whose blob never arrived must not stay cached."""
        f = self.start(layer, experts)
        try:
            yield f
        except BaseException:
            self.abort(f)
            raise
        self.finish(f)

    def resident_slots(self) -> torch.Tensor | None:
        """[layers, experts] int32 on the GPU, once every expert is resident: slot s >= 0 of the VRAM slab, or
        (zero_copy) slot -1 - s of the pinned RAM slab, which the expert kernels read over PCIe themselves. None
        while some expert is only on disk. With it a decode step finds its experts on the GPU, with no host round
        trip to read the router's choice and no copy; the router's kernel counts the tiers in resident_counts.
        The VRAM cache does not change during such steps; a prompt's fetches may change it, and the table follows."""
        if self.vram is None:
            return None
        if not self._slot_table_current:
            table = self._build_slot_table()
            if table is None:
                return None
            if self._slot_table is None:
                self._slot_table = table.to(self.device)
            else:
                self._slot_table.copy_(table, non_blocking=False)
            self._slot_table_current = True
        return self._slot_table

    def _build_slot_table(self) -> torch.Tensor | None:
        # while too few experts are cached to hold them all, say so by counting: the copies below took 1.8 ms a call
        # with 15k experts in each tier (development VM), and host-driven decode asks every layer, every token
        if len(self.vram) + (len(self.ram) if self.zero_copy else 0) < self.every_expert:
            return None
        slot_of = self.vram.cached()
        if len(slot_of) < self.every_expert:
            if not self.zero_copy:
                return None
            in_ram = {key: slot for key, slot in self.ram.cached().items() if key[0] in self.layers}
            if len(slot_of.keys() | in_ram.keys()) < self.every_expert:
                return None
            slot_of = {**{key: -1 - slot for key, slot in in_ram.items()}, **slot_of}  # VRAM wins where both hold it
        self.resident_in_ram = sum(slot < 0 for slot in slot_of.values())
        cfg = self.store.config
        table = torch.full((cfg.num_hidden_layers, cfg.num_experts), -1 - self.ram.n_slots, dtype=torch.int32)
        for (layer, expert), slot in slot_of.items():
            table[layer, expert] = slot
        return table

    def take_resident_counts(self) -> None:
        """Fold the GPU's counts of experts used through the slot table into the tier stats (a small sync): a VRAM
        hit, or a VRAM miss served by the pinned RAM tier without a copy."""
        if self.resident_counts is None:
            return
        totals = self.resident_counts.tolist()
        in_vram, in_ram = (now - before for now, before in zip(totals, self._counts_taken))
        self._counts_taken = totals
        self.vram.stats.hits += in_vram
        self.vram.stats.misses += in_ram
        self.ram.stats.hits += in_ram
        self.stats.expert_bytes_zero_copy += in_ram * self.store.expert_blob_bytes

    def _landed(self, f: LayerFetch) -> Iterator[int]:
        """Experts whose reads completed, as they complete; a failed read leaves nothing behind in the caches."""
        remaining = set(f.reading)
        while remaining:
            t0 = time.perf_counter()
            done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            f.wait_ms += (time.perf_counter() - t0) * 1e3
            for future in done:
                expert = f.reading[future]
                if future.exception() is not None:
                    self.abort(f)
                    raise future.exception()
                f.landed.add(expert)
                self.stats.expert_reads += 1
                self.stats.expert_bytes_read += self.store.expert_blob_bytes
                yield expert

    def abort(self, f: LayerFetch) -> None:
        """Give up a fetch midway: stop its reads, drop from the caches every expert whose blob did not reach its
        slot (a read not landed, a VRAM copy not queued), and release its slots."""
        for future in f.reading:
            future.cancel()
        wait(list(f.reading))  # no read may still be writing into a slot that is about to be reused
        self._ram_changed()
        for expert in f.reading.values():
            if expert not in f.landed:
                self.ram.forget((f.layer, expert))
        if self.vram is not None:
            for expert in f.to_vram:
                if expert not in f.copied:
                    self.vram.forget((f.layer, expert))
            self._copies_done = torch.cuda.Event()  # staging slots are reused only after the copies queued so far
            self._copies_done.record(self.copy_stream)
        self.finish(f)

    def arrivals(self, f: LayerFetch) -> Iterator[tuple[int, torch.Tensor]]:
        """(expert, blob in RAM) pairs: those in RAM first, then each read as it lands, so compute overlaps I/O.
        A blob is valid until finish(f)."""
        for expert in f.ready:
            yield expert, self.ram_slab[f.ram_slot[expert]]
        for expert in self._landed(f):
            yield expert, self.ram_slab[f.ram_slot[expert]]

    def ram_addresses(self, f: LayerFetch) -> list[int]:
        """The RAM blobs' addresses of f.experts, in that order, when every one was cached (f.ready): what the CPU
        kernels take, without a tensor view per expert."""
        base, stride = self.ram_slab.data_ptr(), self.ram_slab.stride(0)
        return [base + f.ram_slot[e] * stride for e in f.experts]

    def _copy_to_vram(self, f: LayerFetch, expert: int) -> None:
        with torch.cuda.stream(self.copy_stream):
            self.vram_slab[f.vram_slot[expert]].copy_(self.ram_slab[f.ram_slot[expert]], non_blocking=True)
        f.copied.add(expert)
        self.stats.expert_bytes_copied += self.store.expert_blob_bytes

    def gpu_slots(self, f: LayerFetch) -> list[int]:
        """VRAM slots of f.experts, in that order, once their copies are queued; the current stream waits for them."""
        for expert in self._landed(f):
            self._copy_to_vram(f, expert)
        self._copies_done = torch.cuda.Event()
        self._copies_done.record(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(self._copies_done)
        return [f.vram_slot[e] for e in f.experts]

    def wait_copies(self) -> None:
        """Block the host until the last batch's copies are done (for timing)."""
        if self.on_gpu and self._copies_done is not None:
            self._copies_done.synchronize()

    def tick(self) -> None:
        """A token is done: the caches' policies count recency and decay in tokens."""
        for tier in (self.ram if self.owns_host else None, self.vram):
            if tier is not None:
                tier.tick()

    def finish(self, f: LayerFetch) -> None:
        """The batch's compute is queued: its slots may be reused from the next start() on."""
        self.ram.unlock_all()
        if self.vram is not None:
            self.vram.unlock_all()

    def close(self) -> None:
        """Close the host tier's files and pool (when this fetcher owns them: close the others first)."""
        if self.ram_slab is None:
            return
        if not self.owns_host:
            if self.on_gpu:
                torch.cuda.synchronize(self.device)
            self._ram_backing = self.ram_slab = None
            return
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        self._ram_backing = self.ram_slab = None  # the last reference: its pages are unregistered and freed
