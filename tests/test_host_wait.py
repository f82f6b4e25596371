"""The stream's wait for the host (kernels/host_wait.py): returns once done >= want, and (on a GPU) keeps the stream
waiting until the host writes; the C worker thread's writes are exercised by the shared decode step (test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from flashmoe.kernels import host_wait

pytestmark = pytest.mark.skipif(host_wait.triton is None, reason="needs triton")


@pytest.mark.parametrize("done,want", [(0, 0), (5, 3), (7, 7)])
def test_the_wait_returns_once_done_reaches_want(done, want):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    done_t, want_t = torch.tensor([done]), torch.tensor([want])
    if device == "cuda":
        done_t, want_t = done_t.pin_memory(), want_t.pin_memory()
    host_wait.wait_until(done_t, want_t)
    if device == "cuda":
        torch.cuda.synchronize()
    assert int(done_t[0]) == done and int(want_t[0]) == want  # read, never written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_stream_waits_until_the_host_writes():
    """The GPU sees a write to pinned RAM made while it spins. The host polls the stream instead of synchronizing,
    so a wait that never ends fails here in 10 s instead of hanging the run (an earlier version released the
    counter from a Python thread while the main thread sat in torch.cuda.synchronize(): it hung on the device)."""
    import time

    done, want = torch.tensor([0]).pin_memory(), torch.tensor([1]).pin_memory()
    out = torch.zeros(1, device="cuda")
    stream = torch.cuda.current_stream()
    host_wait.wait_until(done, want)
    out += 1  # queued behind the wait
    time.sleep(0.05)
    waiting = not stream.query()  # (reading `out` now would wait forever)
    done.numpy()[0] = 1
    deadline = time.monotonic() + 10
    while not stream.query():
        assert time.monotonic() < deadline, "the GPU never saw the host's write to pinned RAM (kernels/host_wait.py)"
        time.sleep(0.001)
    assert waiting and float(out[0]) == 1.0
