"""Decode with experts in pinned RAM on both paths at once: the GPU reads part of a layer's RAM-held experts over
PCIe (zero-copy, inside its kernels) while the CPU computes the rest where they lie (kernels/cpu_native.py); the
CPU's sum joins the GPU's before the layer's end is added, rounded once.

llama.cpp's `--cpu-moe` computes every RAM-held expert on the CPU; flashmoe's zero-copy path reads every one over
PCIe. On the H100/H200 machines the two take about as long (issue 17's table: 219 vs 183 tok/s), so splitting a
layer's RAM-held experts between them runs both at once.

The split follows measured times: after each layer, the GPU's time for its share (CUDA events) and the CPU's (its
call) move the fraction of RAM-held experts the CPU takes toward where both finish together, so it follows load on
either side. A fixed fraction can be given instead (`Model.load(cpu_share=...)`), which also makes results
reproducible (which experts the CPU computes changes the float rounding a little, and the CPU's int8 activations a
little more: kernels/cpu_native.py).
"""

from __future__ import annotations

import time

import torch

from .kernels.cpu_native import NativeExperts
from .kernels.moe_triton import SKIP

STEP = 0.05  # how far one layer's times move the fraction: ~20 layers to cross from all-GPU to all-CPU


class CpuShare:
    """One block of layers' CPU share: the host buffers a layer's step passes through, the fraction, the counts."""

    def __init__(self, experts: NativeExperts, ram_slab: torch.Tensor, hidden: int, fraction: float | None = None):
        self.experts, self.ram_slab, self.hidden, self.k = experts, ram_slab, hidden, 0
        self.adaptive = fraction is None
        self.fraction = 0.5 if fraction is None else fraction
        self.staged = self.gpu_slots = None  # sized by the first step's K (a routing trace may change K)
        self.cpu_sum = torch.zeros(hidden, dtype=torch.float32, pin_memory=True)
        self._staged_ready = torch.cuda.Event()
        self._gpu = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._cpu_ms: float | None = None  # the last layer's CPU time, waiting for its GPU time
        self.experts_on_cpu = 0  # experts computed here since the stats were reset
        self.experts_over_pcie = 0  # RAM-held experts the GPU read itself

    def receive(self, staged: torch.Tensor) -> None:
        """Bring the front graph's staged values to the host (the layer's one sync), and with them the last layer's
        GPU time, which moves the fraction."""
        if staged.numel() != self.hidden + 2 * self.k:
            # h, the K weights, the K slots, as float32 (slots are far below 2^24, so exact)
            self.k = (staged.numel() - self.hidden) // 2
            self.staged = torch.empty(staged.numel(), dtype=torch.float32, pin_memory=True)
            self.gpu_slots = torch.empty(self.k, dtype=torch.int32, pin_memory=True)  # SKIP where the CPU computes
        self.staged.copy_(staged, non_blocking=True)
        self._staged_ready.record()
        self._staged_ready.synchronize()
        if self._cpu_ms is not None:
            self.fraction = rebalanced(self.fraction, self._gpu[0].elapsed_time(self._gpu[1]), self._cpu_ms)
            self._cpu_ms = None

    def split(self) -> list[int]:
        """Which of the K chosen experts (positions in the router's order) the CPU takes: a share of those in pinned
        RAM (slot < 0); gpu_slots gets SKIP there and the rest of the slots as they were."""
        slots = self.staged[self.hidden + self.k :].tolist()
        take = cpu_takes(slots, self.fraction)
        self.experts_on_cpu += len(take)
        self.experts_over_pcie += sum(s < 0 for s in slots) - len(take)
        for i in take:
            slots[i] = SKIP
        self.gpu_slots.copy_(torch.tensor(slots, dtype=torch.int32))
        return take

    def gpu_started(self) -> None:
        self._gpu[0].record()

    def gpu_queued(self) -> None:
        self._gpu[1].record()

    def compute(self, take: list[int]) -> torch.Tensor:
        """The CPU's experts, weighted and summed into cpu_sum (pinned, for the tail graph to copy)."""
        t0 = time.perf_counter()
        self.cpu_sum.zero_()
        if take:
            h = self.staged[: self.hidden][None]
            weights = self.staged[self.hidden : self.hidden + self.k]
            slots = self.staged[self.hidden + self.k :]
            blobs = [self.ram_slab[-1 - int(slots[i])] for i in take]
            self.experts.run(h, blobs, list(range(len(take) + 1)), torch.zeros(len(take), dtype=torch.int32),
                             weights[take], out=self.cpu_sum[None])
        self._cpu_ms = (time.perf_counter() - t0) * 1e3 if self.adaptive else None
        return self.cpu_sum


def cpu_takes(slots: list[float], fraction: float) -> list[int]:
    """Positions of the experts the CPU computes: `fraction` of those in pinned RAM (slot < 0), rounded, the last
    ones in the router's order."""
    in_ram = [i for i, s in enumerate(slots) if s < 0]
    return in_ram[len(in_ram) - int(fraction * len(in_ram) + 0.5) :]


def rebalanced(fraction: float, gpu_ms: float, cpu_ms: float) -> float:
    """The CPU's next fraction: toward equal times, the side that took longer gives up a little of the share (at
    most STEP a layer, in proportion to the gap)."""
    return min(1.0, max(0.0, fraction + STEP * (gpu_ms - cpu_ms) / max(gpu_ms, cpu_ms, 1e-3)))
