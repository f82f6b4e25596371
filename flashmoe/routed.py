"""One layer's routed experts: fetch the chosen ones through the tiers and run them.

CPU: a layer's experts run in one call of our kernels (kernels/cpu_native.py) over the blobs in their RAM slots, once
they are all there; where those kernels are not built, each expert runs as its read lands, through torch's int4
kernel from the kernel form its RAM slot holds (kernels/cpu_int4.py), or dequantized (torch) where that kernel does
not fit the store. GPU: the batch's blobs are copied
into VRAM slots and two Triton launches run them all (gate+up with SwiGLU, then down with the routing
weights and the sum over experts); unquantized stores and odd group sizes take the torch path over the
same VRAM slots. The shared expert is queued while the reads are in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .experts import ExpertFetcher
from .kernels import fused, moe_triton
from .kernels.cpu_native import NativeExperts
from .kernels.moe import ExpertMath, expert_biases, expert_weights, routed_experts, swiglu_mlp
from .store import Store


@dataclass
class ExpertTimes:
    io_wait_ms: float = 0.0
    compute_ms: float = 0.0


@dataclass
class ExpertPairs:
    """A layer's (token, k) pairs grouped by expert, built on the device in a few ops (a Python loop over a 512-token
    prompt's 4096 pairs, once per batch of experts, cost ~0.8 ms per batch): `order` lists the pairs' flat rows
    (t*K + k) by ascending expert, `first[e]` is where expert e's pairs start in it; `experts` are those chosen."""

    order: torch.Tensor  # [T*K] int64, on the device
    first: list[int]  # [E + 1]
    experts: list[int]

    @classmethod
    def of(cls, ids: torch.Tensor) -> "ExpertPairs":
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat).tolist()  # the one host sync
        first = [0]
        for c in counts:
            first.append(first[-1] + c)
        return cls(order, first, [e for e, c in enumerate(counts) if c])

    def batch(self, experts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The pairs of `experts` (consecutive chosen ones, ascending): their flat rows, and where each expert's start
        within them (len(experts) + 1 offsets)."""
        lo, hi = self.first[experts[0]], self.first[experts[-1] + 1]
        return self.order[lo:hi], [self.first[e] - lo for e in experts] + [hi - lo]


# on a GPU holding every expert, a prompt of up to this many (token, expert) pairs (25 tokens at K=10, 32 at K=8) goes
# through the decode kernels, a pair at a time, instead of grouping its pairs by expert: no host sync for the
# grouping, and at the 397B geometry (H200, RESULTS.md) the decode kernels ran 80 pairs in 324 us (kernels.py --k 80)
# where an 8-token prompt's grouped kernels took 623 us a layer (prefill.py --profile: tiles of 16 rows for ~1 pair an
# expert). Where the two cross is not measured yet: per pair against per distinct expert read, about where a
# layer's pairs are twice its distinct experts (~400 pairs of 512 experts, ~400 of 256), so 256 leaves a margin
DECODE_KERNEL_PAIRS = 256


def _plus(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """a + b, where a None (a family without a shared expert) adds nothing."""
    return b if a is None else a + b


class RoutedExperts:
    def __init__(self, store: Store, fetcher: ExpertFetcher, device: torch.device, sync_timing: bool = False):
        self.store, self.fetcher, self.device = store, fetcher, device
        self.bits = store.quantization["bits"]
        self.group_size = store.quantization["group_size"]
        self.sync_timing = sync_timing  # synchronize the GPU at phase ends, so the timers split GPU time too
        self.math = ExpertMath.of(store.config)
        self.qb = None
        self.decode_kernels = False
        if device.type == "cuda" and self.bits is not None and moe_triton.triton_available():
            qb = moe_triton.QuantBlob.from_layout(store.layout, self.bits, self.group_size, self.math)
            self.qb = qb if qb.supported else None
            self.decode_kernels = self.qb is not None and moe_triton.decode_supported(qb)

    def _clock(self) -> float:
        if self.sync_timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 shared: Callable[[], torch.Tensor], times: ExpertTimes) -> torch.Tensor:
        """shared() + sum_k weights[t, k] * expert_{ids[t, k]}(h[t]); ids/weights [T, K] from the router; shared()
        may be None (no shared expert)."""
        if isinstance(self.fetcher.kernel_form, NativeExperts):
            return self._run_native(layer, h, ids, weights, shared, times)
        few = ids.numel() <= DECODE_KERNEL_PAIRS and self.decode_kernels
        resident = self.fetcher.resident_slots() if few else None
        if resident is not None:  # every expert resident: no host sync, the GPU looks the slots up
            t0 = self._clock()
            out = _plus(shared(), self.resident_compute(layer, h, ids, weights, resident))
            times.compute_ms += (self._clock() - t0) * 1e3
            return out
        pairs = ExpertPairs.of(ids)  # the host decides what to move: one sync per layer
        chosen = pairs.experts
        batch = len(chosen) if self.fetcher.all_cached(layer, chosen) else self.fetcher.batch_experts
        out = None
        for i in range(0, len(chosen), batch):
            t0 = self._clock()
            with self.fetcher.fetch(layer, chosen[i : i + batch]) as f:
                if i == 0:
                    out = shared()  # queued (GPU) or computed (CPU) while the reads are in flight
                t1 = self._clock()
                if self.device.type == "cuda":
                    slots = self.fetcher.gpu_slots(f)
                    if self.sync_timing:
                        self.fetcher.wait_copies()
                    t2 = self._clock()
                    out = _plus(out, self._run_gpu(h, ids, pairs, weights, f.experts, slots))
                else:
                    arriving = ((e, self._mlp(blob, h.dtype)) for e, blob in self.fetcher.arrivals(f))
                    out = _plus(out, routed_experts(h, ids, weights, arriving))
                    t2 = t1 + f.wait_ms / 1e3
            t3 = self._clock()
            times.io_wait_ms += (t2 - t1) * 1e3 if self.device.type == "cuda" else f.wait_ms
            times.compute_ms += (t1 - t0) * 1e3 + (t3 - t2) * 1e3
        return out

    def _run_native(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    shared: Callable[[], torch.Tensor], times: ExpertTimes) -> torch.Tensor:
        """CPU, our kernels (kernels/cpu_native.py): the layer's experts in one call when the RAM cache holds them
        all (a decoded token's usual case), else one call per fetch batch once its reads have landed, each adding
        into the last one's sums."""
        k = ids.shape[1]
        if ids.shape[0] == 1:  # one token: no grouping ops, its K experts ascending
            row = ids[0].tolist()
            order = sorted(range(k), key=row.__getitem__)
            chosen = [row[i] for i in order]
            if self.fetcher.all_cached(layer, chosen) and hasattr(self.fetcher.kernel_form, "run_token"):
                row_weights = weights[0].tolist()
                return self._run_token(layer, h, chosen, [row_weights[i] for i in order], shared, times)
            pair_row, starts = torch.tensor(order), list(range(k + 1))
        else:
            pairs = ExpertPairs.of(ids)
            chosen = pairs.experts
            pair_row, starts = pairs.batch(chosen)
        token, weight = pair_row // k, weights.reshape(-1)[pair_row]
        batch = len(chosen) if self.fetcher.all_cached(layer, chosen) else self.fetcher.batch_experts
        out, y = None, None
        for b in range(0, len(chosen), batch):
            t0 = time.perf_counter()
            with self.fetcher.fetch(layer, chosen[b : b + batch]) as f:
                if b == 0:
                    out = shared()  # computed while the reads are in flight
                y = self._native_batch(f, starts[b : b + batch + 1], token, weight, h, y)
            times.io_wait_ms += f.wait_ms
            times.compute_ms += (time.perf_counter() - t0) * 1e3 - f.wait_ms
        return _plus(out, y.to(h.dtype))

    def _run_token(self, layer: int, h: torch.Tensor, chosen: list[int], weights: list[float], shared,
                   times: ExpertTimes) -> torch.Tensor:
        """A decoded token whose experts are all in RAM: one call on their slots' addresses, no torch ops around it
        (they were most of the ~0.2 ms a layer spent outside the kernels)."""
        t0 = time.perf_counter()
        with self.fetcher.fetch(layer, chosen) as f:
            out = shared()
            y = self.fetcher.kernel_form.run_token(h, self.fetcher.ram_addresses(f), weights)
        times.compute_ms += (time.perf_counter() - t0) * 1e3
        return _plus(out, y if h.dtype == torch.float32 else y.to(h.dtype))

    def _native_batch(self, f, starts: list[int], token, weight, h, y) -> torch.Tensor:
        """One fetch's experts in one call, once their blobs are all in RAM, added into y (the batches before): the
        sums then have one order whatever was cached, so a layer's result does not depend on the cache's state
        (one token's experts are a few ms of reads against ~0.1 ms of compute, so little overlap is lost)."""
        slot_of = dict(self.fetcher.arrivals(f))
        pairs = slice(starts[0], starts[-1])
        return self.fetcher.kernel_form.run(h, [slot_of[e] for e in f.experts], [s - starts[0] for s in starts],
                                            token[pairs], weight[pairs], y)

    def _mlp(self, slot: torch.Tensor, dtype: torch.dtype):
        """The expert in `slot` as a function of its rows of input: through the CPU int4 kernel when the slot holds
        the kernel form, else dequantized (when its turn comes) and multiplied in `dtype`."""
        form = self.fetcher.kernel_form
        if form is not None:
            return lambda x: form.forward(x, slot)
        def mlp(x):
            views = self.store.layout.unpack(slot.to(self.device))
            return swiglu_mlp(x, *expert_weights(views, self.bits, self.group_size, dtype), self.math,
                              expert_biases(views, dtype))

        return mlp

    # ---- GPU -------------------------------------------------------------------------------
    def _run_gpu(self, h, ids, pairs: "ExpertPairs", weights, experts: list[int], slots: list[int]) -> torch.Tensor:
        slab = self.fetcher.vram_slab
        if self.qb is None:  # torch over the VRAM slots
            slot_of = dict(zip(experts, slots))
            mlps = ((e, self._mlp(slab[slot_of[e]], h.dtype)) for e in experts)
            return routed_experts(h, ids, weights, mlps)
        slots_t = moe_triton.to_device_int32(slots, self.device)
        t, k = ids.shape
        if t == 1 and len(experts) == k and self.decode_kernels:  # decode: one token, its K experts in sorted order
            return self.decode_compute(h, weights, slots_t)
        # many tokens: the batch's (token, k) pairs, grouped by expert; each pair's output lands in row t*K + k
        pair_row, starts = pairs.batch(experts)
        token_of = (pair_row // k).to(torch.int32)
        expert_start = moe_triton.to_device_int32(starts, self.device)
        act = moe_triton.gate_up_swiglu(h, slab, slots_t, token_of, expert_start, self.qb, expert_start_list=starts)
        pair_weight = weights.reshape(-1)[pair_row]
        y = moe_triton.down_grouped(act, slab, slots_t, expert_start, pair_weight, self.qb, expert_start_list=starts)
        out = torch.zeros(t * k, h.shape[1], dtype=torch.float32, device=h.device)
        out.index_copy_(0, pair_row, y.float())
        return out.view(t, k, -1).sum(1).to(h.dtype)

    def resident_compute(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                         resident_slots: torch.Tensor) -> torch.Tensor:
        """decode_compute (one token) or decode_tokens (a few: a short prompt's) with the slots read from the
        fetcher's resident table on the GPU (and counted by tier)."""
        slots = resident_slots[layer][ids]
        fused.count_tiers(slots, self.fetcher.resident_counts)
        if ids.shape[0] == 1:
            return self.decode_compute(h, weights, slots)
        return self.decode_tokens(h, weights, slots, None)

    def decode_compute(self, h: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, epilogue=None):
        """One token's K experts, whose slots (VRAM, or pinned RAM if negative: see ExpertFetcher.resident_slots) are
        in `slots`, in the order of the router's ascending ids (that of `weights`): two launches, no host work, so a
        CUDA graph can hold it. epilogue: (residual, shared expert output or None, its gate logit or None), added in
        the second. slots may keep the router's token dimension ([1, K])."""
        f, slots = self.fetcher, slots.reshape(-1)
        act = moe_triton.decode_gate_up_swiglu(h, f.vram_slab, slots, self.qb, host_slab=f.ram_slab)
        epilogue = None if epilogue is None else tuple(None if t is None else t.reshape(-1) for t in epilogue)
        return moe_triton.down_weighted_sum(act, f.vram_slab, slots, weights[0], self.qb, host_slab=f.ram_slab,
                                            epilogue=epilogue)[None]

    def decode_tokens(self, h: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, epilogue) -> torch.Tensor:
        """decode_compute for T decode tokens at once (h [T, H]; weights, slots [T, K]; epilogue rows [T, ...]): every
        (token, expert) pair as one of decode_compute's experts, each pair reading its token's row, then each token's
        partials summed with its layer's end -> [T, H]. Graph-safe (no host work). A expert two tokens chose is read
        twice: with K of hundreds of experts a batch rarely repeats one, and the second read often hits L2."""
        f, t = self.fetcher, h.shape[0]
        slots = slots.reshape(-1)
        act = moe_triton.decode_gate_up_swiglu(h, f.vram_slab, slots, self.qb, host_slab=f.ram_slab,
                                               per_row=weights.shape[1])
        partial = moe_triton.down_partials(act, f.vram_slab, slots, weights.reshape(-1), self.qb, host_slab=f.ram_slab)
        return moe_triton.sum_partials(partial, h.dtype, epilogue, tokens=t)

    def decode_partials(self, h: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """decode_compute's first half, for a step whose CPU computes some experts (cpu_share.py; their slots SKIP):
        the GPU's weighted partial sums. `slots` may be pinned host memory, which the kernels read where it lies."""
        f = self.fetcher
        act = moe_triton.decode_gate_up_swiglu(h, f.vram_slab, slots, self.qb, host_slab=f.ram_slab)
        return moe_triton.down_partials(act, f.vram_slab, slots, weights[0], self.qb, host_slab=f.ram_slab)

    @staticmethod
    def decode_finish(partial: torch.Tensor, dtype: torch.dtype, epilogue, extra: torch.Tensor) -> torch.Tensor:
        """The second half: the partials' rows summed, then `extra` (the CPU's sum, read from pinned RAM), plus the
        layer's end, [1, H] in `dtype`."""
        epilogue = tuple(None if t is None else t.reshape(-1) for t in epilogue)
        return moe_triton.sum_partials(partial, dtype, epilogue, extra)[None]
