"""The stream's wait for the host (kernels/host_wait.py): returns once done >= want; the spinning itself (done
written by another thread while the GPU waits) is exercised by the shared decode step on the device (test_gpu.py)."""

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: another thread sets the counter")
def test_the_stream_waits_for_another_thread():
    import threading
    import time

    done, want = torch.tensor([0]).pin_memory(), torch.tensor([1]).pin_memory()
    out = torch.zeros(1, device="cuda")
    host_wait.wait_until(done, want)
    out += 1  # queued behind the wait
    try:
        time.sleep(0.05)
        waiting = not torch.cuda.current_stream().query()  # (reading `out` now would wait forever)
    finally:  # whatever happened, release the stream
        threading.Thread(target=lambda: done.numpy().__setitem__(0, 1)).start()
    torch.cuda.synchronize()
    assert waiting and float(out[0]) == 1.0
