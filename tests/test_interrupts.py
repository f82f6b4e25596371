"""A generation interrupted midway (Ctrl-C, an error inside a layer) leaves the model as good as new: every
expert slot is released and no cache claims an expert whose blob never arrived."""

from __future__ import annotations

import pytest
import torch

import flashmoe
import flashmoe.routed

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def _interrupt_after(calls: int, monkeypatch, take_one_arrival: bool):
    """Make the routed-expert compute raise KeyboardInterrupt on its `calls`-th use, as Ctrl-C would (torch's path
    and our kernels' alike)."""
    real, real_native = flashmoe.routed.routed_experts, flashmoe.routed.RoutedExperts._native_batch
    seen = {"n": 0}

    def interrupt(arriving):
        seen["n"] += 1
        if seen["n"] == calls:
            if take_one_arrival:  # some reads landed, the rest are still in flight
                next(iter(arriving))
            raise KeyboardInterrupt

    def interrupted(h, ids, weights, arriving):
        interrupt(arriving)
        return real(h, ids, weights, arriving)

    def interrupted_native(self, f, *args):
        interrupt(self.fetcher.arrivals(f))
        return real_native(self, f, *args)

    monkeypatch.setattr(flashmoe.routed, "routed_experts", interrupted)
    monkeypatch.setattr(flashmoe.routed.RoutedExperts, "_native_batch", interrupted_native)


@pytest.mark.parametrize("cache_gb", [0, 0.002])
@pytest.mark.parametrize("take_one_arrival", [False, True])
def test_generation_after_an_interrupted_layer_is_unchanged(built, monkeypatch, cache_gb, take_one_arrival):
    store = built.store("qwen3_5_moe", 4)
    with flashmoe.load(store, cache_gb=cache_gb) as fresh:
        expected = fresh.logits(PROMPT)
    model = flashmoe.load(store, cache_gb=cache_gb)
    for calls in (1, 3):  # the first layer, and one after some were cached
        with monkeypatch.context() as m:
            _interrupt_after(calls, m, take_one_arrival)
            with pytest.raises(KeyboardInterrupt):
                list(model.generate(PROMPT, 4))
        torch.testing.assert_close(model.logits(PROMPT), expected, rtol=0, atol=0)
    model.close()


def test_a_failed_read_midway_releases_every_slot(built, monkeypatch):
    model = flashmoe.load(built.store("qwen3_5_moe", 4), cache_gb=0)
    fetcher = model.fetcher
    real_read = fetcher._read

    def failing(layer, expert, loc, slot):
        if expert % 3 == 0:
            raise flashmoe.FlashMoeError("disk gone")
        real_read(layer, expert, loc, slot)

    monkeypatch.setattr(fetcher, "_read", failing)
    for _ in range(3):  # without the slots released, the second try finds none free
        with pytest.raises(flashmoe.FlashMoeError, match="disk gone"):
            model.logits(PROMPT)
    monkeypatch.undo()
    assert model.logits(PROMPT).isfinite().all()
    model.close()


@pytest.mark.gpu
@pytest.mark.parametrize("at_call", [1, 14])  # the prompt's eager layers; the third decode step, in graphs (4 layers)
def test_gpu_generation_after_an_interrupted_fetch_is_unchanged(built, monkeypatch, at_call):
    store = built.store("qwen3_5_moe", 4)
    with flashmoe.load(store, device="cuda", dtype=torch.float32) as everything:
        blob = everything.store.expert_blob_bytes
        expected = list(everything.generate(PROMPT, 8, stop_token_ids=[]))
    model = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=6 * blob / 1e9, cache_gb=0)
    real, seen = model.fetcher.gpu_slots, {"n": 0}

    def interrupted(f):
        seen["n"] += 1
        if seen["n"] == at_call:
            real(f)  # some copies queued, then Ctrl-C
            raise KeyboardInterrupt
        return real(f)

    monkeypatch.setattr(model.fetcher, "gpu_slots", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(model.generate(PROMPT, 8, stop_token_ids=[]))
    assert seen["n"] == at_call
    assert list(model.generate(PROMPT, 8, stop_token_ids=[])) == expected
    model.close()
