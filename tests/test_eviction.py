"""Eviction policies and the trace replay that compares them: orders, locks, and Belady's bound over all."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.eviction import LRU, POLICIES, DecayedLFU, FrequencyLRU, ReuseFrequency, optimal_hits, replay
from flashmoe.expert_cache import SlotCache
from flashmoe.traces import TraceShape, calibrated_trace, uniform_trace


def test_lru_evicts_the_least_recent_unlocked():
    p = LRU()
    for k in "abc":
        p.insert(k)
    p.hit("a")
    assert p.victim(lambda k: False) == "b"
    assert p.victim(lambda k: k == "b") == "c"
    p.remove("b")
    assert p.victim(lambda k: False) == "c"


def test_frequency_lru_keeps_the_often_used_and_counts_across_evictions():
    p = FrequencyLRU(count_weight=10)
    for k in "ab":
        p.insert(k)
    for _ in range(3):
        p.hit("a")
        p.tick()
    p.insert("c")  # newer, but used once: 10 + 3 < 40 + 2
    assert p.victim(lambda k: False) == "b"
    p.remove("b")
    assert p.victim(lambda k: False) == "c"
    p.remove("a")
    p.insert("a")  # back after an eviction: its four earlier uses still count
    assert p.victim(lambda k: False) == "c"


def test_decayed_lfu_forgets_and_survives_a_long_run():
    p = DecayedLFU(decay=0.5)
    p.insert("old")
    for _ in range(5):
        p.hit("old")
    for _ in range(10):
        p.tick()
    p.insert("new")  # one use now outweighs six uses ten halvings ago
    assert p.victim(lambda k: False) == "old"
    for _ in range(5000):  # the inflated scores are rescaled, never inf
        p.tick()
    p.hit("new")
    assert p.victim(lambda k: False) == "old" and p.victim(lambda k: k == "old") == "new"


def test_reuse_frequency_keeps_the_latest_tokens_experts_by_their_layers_reuse():
    p = ReuseFrequency(reuse_weight=1.0)
    # layer 0 reuses: token 1 picks again both experts token 0 picked; layer 1 never does
    for _ in range(2):
        p.hit((0, "a"))
        p.hit((0, "b"))
        p.tick()
    for e in ("x", "y", "z", "w"):
        p.insert((1, e))
        p.tick()
    for _ in range(3):  # a popular expert of layer 1, not used at the latest token
        p.hit((1, "hot"))
    p.tick()
    p.insert((0, "c"))  # layer 0's reuse rate is 2/5: c scores 1 + 0.4 x 7 tokens = 3.8 while the latest token used it
    p.insert((1, "v"))  # layer 1's is 0: v scores 1, as the other once-used experts of layer 1
    assert p.victim(lambda k: False) == (1, "x")  # the oldest of the once-used, no reuse to speak for them
    assert p.victim(lambda k: k[0] == 1) == (0, "a")  # a and b: 2 uses and no longer the latest; c's reuse beats them
    p.tick()  # the next token's layers may still pick c again: its reuse stays a token
    assert p.victim(lambda k: k[1] in "xyzw") == (1, "v")
    p.tick()  # then it falls back to its one use, older than v's
    assert p.victim(lambda k: k[1] in "xyzw") == (0, "c")
    p.remove((0, "c"))
    p.insert((0, "c"))  # back after an eviction: its earlier use still counts (2 uses, plus reuse now)
    assert p.victim(lambda k: k[1] in "xyzw") == (1, "v")


def test_hits_counted_after_a_warm_start():
    trace = calibrated_trace(TraceShape(tokens=80, layers=3, experts=32, top_k=4), seed=5)
    for capacity in (8, 24):
        assert replay(trace, capacity, LRU(), count_from=0) == replay(trace, capacity, LRU())
        late = replay(trace, capacity, LRU(), count_from=40)
        assert late == replay(trace, capacity, LRU()) - replay(trace[:40], capacity, LRU())
        assert late <= optimal_hits(trace, capacity, count_from=40) <= optimal_hits(trace, capacity)
    # every key seen in the first half and room for all: the second half hits every time, Belady's too
    full = 3 * 32
    seen = all(set(trace[40:, layer].ravel()) <= set(trace[:40, layer].ravel()) for layer in range(3))
    if seen:
        assert optimal_hits(trace, full, count_from=40) == trace[40:].size


def test_no_policy_beats_belady_and_full_capacity_misses_only_the_first_uses():
    trace = calibrated_trace(TraceShape(tokens=60, layers=4, experts=64, top_k=4), seed=3)
    accesses = trace.size
    for capacity in (4, 16, 64, 200):
        bound = optimal_hits(trace, capacity)
        for name, make in POLICIES.items():
            assert replay(trace, capacity, make()) <= bound, (name, capacity)
    first_uses = sum(len(np.unique(trace[:, layer])) for layer in range(trace.shape[1]))
    assert optimal_hits(trace, 256) == replay(trace, 256, LRU()) == accesses - first_uses


def test_a_step_never_evicts_its_own_experts():
    trace = uniform_trace(TraceShape(tokens=20, layers=2, experts=32, top_k=4), seed=1)
    steps = [[(layer, int(e)) for e in trace[t, layer]] for t in range(20) for layer in range(2)]
    seen = {"accesses": 0, "victims": 0}

    class Watched(LRU):
        def hit(self, key):
            seen["accesses"] += 1
            super().hit(key)

        def insert(self, key):
            seen["accesses"] += 1
            super().insert(key)

        def victim(self, locked):
            step = steps[seen["accesses"] // 4]
            assert all(locked(k) for k in step)  # the whole step is locked, also its experts not yet looked up
            key = super().victim(locked)
            assert key is not None and key not in step
            seen["victims"] += 1
            return key

    replay(trace, 6, Watched())
    assert seen["victims"] > 0
    assert replay(trace, 3, LRU()) == 0 and optimal_hits(trace, 3) == 0  # fewer slots than K: nothing stays


@pytest.mark.parametrize("policy", list(POLICIES))
def test_skewed_routing_is_worth_caching(policy):
    shape = TraceShape(tokens=200, layers=4, experts=128, top_k=4)
    skewed, uniform = calibrated_trace(shape, seed=0), uniform_trace(shape, seed=0)
    capacity = 4 * 128 // 5  # 20% of the experts
    assert replay(skewed, capacity, POLICIES[policy]()) > 2 * replay(uniform, capacity, POLICIES[policy]())


def test_a_cache_with_a_slot_for_every_key_keeps_no_order():
    from flashmoe.eviction import NoEviction, policy_for

    assert isinstance(policy_for("frequency-lru", 8, 8), NoEviction)
    assert type(policy_for("frequency-lru", 7, 8)).__name__ == "FrequencyLRU"
    cache = SlotCache(8, 2, policy_for("lru", 8, 8))
    for key in range(8):
        cache.assign(key)
    cache.unlock_all()
    for _ in range(3):
        assert [cache.lookup(k) for k in range(8)] == list(range(8)) and cache.stats.evictions == 0
        cache.unlock_all()
