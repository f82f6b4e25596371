"""A GPU stream that waits for the host: one tiny kernel spins until a counter in pinned RAM reaches another.

A shared decode layer (cpu_share.py) queues the GPU's experts, then the layer's tail, which needs the CPU's sum; the
host hands its part to a worker thread and goes on queueing the next layer. The tail therefore starts with this
wait: the host writes `want` before queueing it, the worker writes `done` once the CPU's sum is in place, and the
kernel returns when done >= want. Both counters only grow, and only the host writes them, so a wait can neither
miss its signal nor see a stale one. It can be captured in a CUDA graph (it reads the counters when it runs).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _wait_kernel(done_ptr, want_ptr):
        want = tl.load(want_ptr, volatile=True)
        while tl.load(done_ptr, volatile=True) < want:  # volatile: each turn reads pinned RAM again, over PCIe
            pass


def wait_until(done: torch.Tensor, want: torch.Tensor) -> None:
    """Queue on the current stream: wait until done[0] >= want[0] (int64 in pinned RAM, or anywhere the stream
    can read)."""
    _wait_kernel[(1,)](done, want, num_warps=1)
