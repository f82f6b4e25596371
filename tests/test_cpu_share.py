"""The CPU's share of the experts held in pinned RAM (cpu_share.py): which experts it takes and how the share
follows measured times. The decode step itself runs on the device (test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

import flashmoe
from flashmoe.cpu_share import PROBE_EVERY, STEP, cpu_takes, rebalanced, shares_next
from flashmoe.errors import FlashMoeError


def test_the_cpu_takes_a_share_of_the_experts_in_pinned_ram_only():
    slots = [3.0, -1.0, -5.0, 2.0, -2.0]  # VRAM slots >= 0, pinned RAM < 0
    assert cpu_takes(slots, 0.0) == []
    assert cpu_takes(slots, 1.0) == [1, 2, 4]
    assert cpu_takes(slots, 0.5) == [2, 4]  # 1.5 rounds up
    assert cpu_takes(slots, 0.2) == [4]
    assert cpu_takes([0.0, 1.0], 1.0) == []  # all in VRAM: nothing for the CPU


def test_the_share_moves_toward_equal_times_and_stays_in_bounds():
    assert rebalanced(0.5, gpu_ms=0.3, cpu_ms=0.3) == 0.5
    assert rebalanced(0.5, gpu_ms=0.4, cpu_ms=0.2) == pytest.approx(0.5 + STEP / 2)  # the GPU was slower: more to the CPU
    assert rebalanced(0.5, gpu_ms=0.1, cpu_ms=0.4) == pytest.approx(0.5 - STEP * 0.75)
    assert rebalanced(1.0, gpu_ms=0.4, cpu_ms=0.0) == 1.0
    assert rebalanced(0.01, gpu_ms=0.0, cpu_ms=0.5) == 0.0
    fraction = 0.5  # a CPU twice as fast per expert as the GPU ends up with about two thirds of them
    for _ in range(400):
        fraction = rebalanced(fraction, gpu_ms=(1 - fraction) * 8 * 0.1, cpu_ms=fraction * 8 * 0.05)
    assert fraction == pytest.approx(2 / 3, abs=0.01)


def test_each_way_is_timed_once_then_the_faster_decodes_and_the_other_is_probed_where_cheap():
    assert shares_next({True: None, False: None}, 1, can_probe=False)  # sharing first
    assert not shares_next({True: 2.0, False: None}, 2, can_probe=False)  # then not
    for can_probe in (True, False):
        ways = [shares_next({True: 2.0, False: 3.0}, t, can_probe) for t in range(1, 2 * PROBE_EVERY + 1)]
        probes = [t for t, way in enumerate(ways, start=1) if not way]
        assert probes == ([PROBE_EVERY, 2 * PROBE_EVERY] if can_probe else [])  # sharing is faster: it decodes
    assert not shares_next({True: 3.0, False: 2.0}, 5, can_probe=True)
    assert shares_next({True: 3.0, False: 2.0}, PROBE_EVERY, can_probe=True)


@pytest.mark.parametrize("share,message", [(1.5, "between 0 and 1"), (float("nan"), "between 0 and 1"),
                                           ("half", "or 'auto'"), (0.5, "for device='cuda'"),
                                           ("auto", "for device='cuda'")])
def test_a_bad_share_is_one_line(built, share, message):
    with pytest.raises(FlashMoeError, match=message):
        flashmoe.load(built.store("qwen3_5_moe", 4), cpu_share=share)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the checks after the device's are the GPU's")
@pytest.mark.parametrize("options,message", [(dict(zero_copy=False, cache_gb=1), "needs zero_copy"),
                                             (dict(cache_gb=0), "give cache_gb")])
def test_a_share_with_nothing_to_share_is_one_line(built, options, message):
    with pytest.raises(FlashMoeError, match=message):
        flashmoe.load(built.store("qwen3_5_moe", 4), device="cuda", cpu_share=0.5, **options)

