"""Decode with experts in pinned RAM on both paths at once: the GPU reads part of a layer's RAM-held experts over
PCIe (zero-copy, inside its kernels) while the CPU computes the rest where they lie (kernels/cpu_native.py); the
CPU's sum joins the GPU's before the layer's end is added, rounded once.

llama.cpp's `--cpu-moe` computes every RAM-held expert on the CPU; flashmoe's zero-copy path reads every one over
PCIe. On the H100/H200 machines the two take about as long (issue 17's table: 219 vs 183 tok/s), so splitting a
layer's RAM-held experts between them runs both at once. Measured there it gained nothing (RESULTS.md: our CPU
kernel is the slower side, and a shared layer costs more), so it is off unless asked for.

Sharing costs a sync per layer (the host must see the router's choice) and three graph launches instead of one,
about 0.2-0.3 ms a layer on the H200 machine: it pays where a layer's RAM-held experts take longer than that to
read over PCIe. The CPU's part runs on a thread of the C library (fm_moe_post), so the host queues the next layer
meanwhile and the GPU waits for the CPU's sum on the GPU (kernels/host_wait.py). Two things follow measured times:
- whether to share at all ("auto"): a block of layers' GPU time per token (CUDA events, read once complete, no
  sync) is kept for both ways, shared and the GPU reading every expert; the faster one decodes, the other is tried
  every PROBE_EVERY tokens where that needs no graph capture (shares_next);
- how much to share: after each shared layer, the GPU's time for its experts and the CPU's move the fraction of
  RAM-held experts the CPU takes toward where both finish together.
A fixed fraction can be given instead (`Model.load(cpu_share=...)`): always shared, at that fraction, which also
makes results reproducible (which experts the CPU computes changes the float rounding a little, and the CPU's int8
activations a little more: kernels/cpu_native.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .kernels.cpu_native import NativeExperts
from .kernels.moe_triton import SKIP

STEP = 0.05  # how far one layer's times move the fraction: ~20 layers to cross from all-GPU to all-CPU
PROBE_EVERY = 16  # tokens: the way not chosen is timed again this often (a 15% slower way costs 1% of the rate)
SMOOTHING = 0.25  # weight of a new token's time in each way's running figure
PROBE_AFTER = 64  # decode steps of a sequence before a probe may capture the other way's graphs for it


class CpuShare:
    """One block of layers' CPU share: the pinned buffers a shared layer passes through, the fraction, the choice
    between sharing and not, the counts."""

    def __init__(self, experts: NativeExperts, ram_slab: torch.Tensor, hidden: int, fraction: float | None = None):
        self.experts, self.ram_slab, self.hidden = experts, ram_slab, hidden
        self.adaptive = fraction is None
        self.fraction = 0.5 if fraction is None else fraction
        self.k = 0
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cpu_sum = torch.zeros(hidden, dtype=torch.float32, pin_memory=True)  # read by the tail graph's kernel
        # the tail graph waits until done[0] >= want[0] (kernels/host_wait.py): the library's worker thread computes
        # the CPU's part while this thread queues the next layer, then writes its time (done[1], ns) and job number
        self.want, self.done = torch.zeros(1, dtype=torch.int64, pin_memory=True), torch.zeros(
            2, dtype=torch.int64, pin_memory=True)
        # its threads leave a core to the thread that drives the GPU (spinning in its syncs): one thread short of
        # the cores made every parallel region wait for the one descheduled (2x slower, measured)
        self.threads = max(1, torch.get_num_threads() - 1)
        self._staged_ready = torch.cuda.Event()
        self._gpu = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._posted: bool | None = None  # the last layer's CPU part, to be timed: posted (True) or none (False)
        # sharing or not, per token: each way's GPU ms for the block's layers, and tokens waiting to be timed
        self.token_ms: dict[bool, float | None] = {True: None, False: None}
        self._timing: list[tuple[bool, torch.cuda.Event, torch.cuda.Event]] = []
        self._tokens = 0
        self.sharing = True  # this token's way
        self.tokens_shared = 0  # decode steps that shared, since the stats were reset
        self.experts_on_cpu = 0  # experts computed here since the stats were reset
        self.experts_over_pcie = 0  # RAM-held experts the GPU read itself
        self.gpu_ms = self.cpu_ms = 0.0  # each side's time for its experts, summed over the layers measured

    # ---- per token: share or not -------------------------------------------------------------
    def begin_token(self, can_probe: bool = True) -> None:
        """Choose this token's way (shares_next); can_probe: trying the other way costs no graph capture now."""
        self._fold_timings()
        self._tokens += 1
        self.sharing = shares_next(self.token_ms, self._tokens, can_probe) if self.adaptive else True
        self.tokens_shared += self.sharing
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        self._timing.append((self.sharing, start, None))

    def end_token(self, counted: bool = True) -> None:
        """The token's layers are queued; `counted`: its time stands for its way (not when it captured graphs)."""
        sharing, start, _ = self._timing.pop()
        if counted:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._timing.append((sharing, start, end))

    def _fold_timings(self) -> None:
        """Fold in the tokens whose events completed (no waiting: the others stay for later)."""
        while self._timing and self._timing[0][2] is not None and self._timing[0][2].query():
            sharing, start, end = self._timing.pop(0)
            ms, before = start.elapsed_time(end), self.token_ms[sharing]
            self.token_ms[sharing] = ms if before is None else before + SMOOTHING * (ms - before)
        del self._timing[:-64]  # tokens never ended (an error midway) are dropped

    # ---- per shared layer ----------------------------------------------------------------------
    def buffers(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pinned buffers for K experts a token, made once (graphs hold their addresses): what the front graph
        stages for the host (h, the K weights, the K slots as float32: slots are far below 2^24, so exact) and the
        slots the back graph's kernels read (SKIP where the CPU computes)."""
        if k not in self._buffers:
            self._buffers[k] = (torch.empty(self.hidden + 2 * k, dtype=torch.float32, pin_memory=True),
                                torch.empty(k, dtype=torch.int32, pin_memory=True))
        return self._buffers[k]

    def receive(self, staged: torch.Tensor) -> None:
        """Bring the front graph's staged values to the host (the layer's one sync), and with them the last shared
        layer's GPU time, which moves the fraction."""
        self.k = (staged.numel() - self.hidden) // 2
        self.staged, self.gpu_slots = self.buffers(self.k)
        self.staged.copy_(staged, non_blocking=True)
        self._staged_ready.record()
        self._staged_ready.synchronize()  # after the last layer's tail, so after the worker's last job
        if self._posted is not None:
            cpu_ms = int(self.done[1]) / 1e6 if self._posted else 0.0
            gpu_ms = self._gpu[0].elapsed_time(self._gpu[1])
            self.gpu_ms += gpu_ms
            self.cpu_ms += cpu_ms
            if self.adaptive:
                self.fraction = rebalanced(self.fraction, gpu_ms, cpu_ms)
            self._posted = None

    def split(self) -> list[int]:
        """Which of the K chosen experts (positions in the router's order) the CPU takes: a share of those in pinned
        RAM (slot < 0); gpu_slots gets SKIP there and the rest of the slots as they were."""
        slots = self.staged.numpy()[self.hidden + self.k :].astype(np.int32)
        take = cpu_takes(slots.tolist(), self.fraction)
        self.experts_on_cpu += len(take)
        self.experts_over_pcie += int((slots < 0).sum()) - len(take)
        slots[take] = SKIP
        self.gpu_slots.numpy()[:] = slots
        return take

    def gpu_started(self) -> None:
        self._gpu[0].record()

    def gpu_queued(self) -> None:
        self._gpu[1].record()

    def compute(self, take: list[int]) -> None:
        """Start the CPU's experts on the library's worker thread (kernels/cpu_native.py: no Python runs there):
        weighted and summed into cpu_sum (pinned: the tail graph's kernel reads it there), then counted done.
        Queue the tail after this: its wait is for this job."""
        want, done = self.want.numpy(), self.done.numpy()
        job = int(want[0]) + 1
        if take:
            staged = self.staged.numpy()
            slots = staged[self.hidden + self.k :]
            blobs = [self.ram_slab[-1 - int(slots[i])] for i in take]
            weights = torch.from_numpy(staged[self.hidden : self.hidden + self.k][take])
            self.experts.post(self.staged[: self.hidden][None], blobs, list(range(len(take) + 1)), weights,
                              self.cpu_sum[None], self.done, job, self.threads)
        else:
            self.cpu_sum.zero_()
            done[0] = job
        want[0] = job
        self._posted = bool(take)


def shares_next(token_ms: dict[bool, float | None], tokens: int, can_probe: bool) -> bool:
    """Whether the next token shares: each way once at first, then the faster so far, the other every PROBE_EVERY
    tokens where that costs no capture (can_probe: the sequence has the other way's graphs, or has run long enough
    to pay for them; capturing a layer's graphs costs far more than a token)."""
    if token_ms[True] is None:
        return True
    if token_ms[False] is None:
        return False
    faster = token_ms[True] <= token_ms[False]
    return faster != (can_probe and tokens % PROBE_EVERY == 0)


def cpu_takes(slots: list[float], fraction: float) -> list[int]:
    """Positions of the experts the CPU computes: `fraction` of those in pinned RAM (slot < 0), rounded, the last
    ones in the router's order."""
    in_ram = [i for i, s in enumerate(slots) if s < 0]
    return in_ram[len(in_ram) - int(fraction * len(in_ram) + 0.5) :]


def rebalanced(fraction: float, gpu_ms: float, cpu_ms: float) -> float:
    """The CPU's next fraction: toward equal times, the side that took longer gives up a little of the share (at
    most STEP a layer, in proportion to the gap)."""
    return min(1.0, max(0.0, fraction + STEP * (gpu_ms - cpu_ms) / max(gpu_ms, cpu_ms, 1e-3)))
