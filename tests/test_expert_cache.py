"""Slot caches: LRU order, locking, staging slots, budgets; O_DIRECT reads through the fetcher."""

from __future__ import annotations

import pytest
import torch

import flashmoe
from flashmoe.errors import FlashMoeError
from flashmoe.eviction import POLICIES
from flashmoe.expert_cache import SlotCache, host_slab
from flashmoe.store import BLOCK_BYTES
from test_reference import PROMPT


def test_lru_evicts_least_recently_used_unlocked_slot():
    cache = SlotCache(cached_slots=2, staging_slots=1)
    a = cache.assign((0, 1))
    b = cache.assign((0, 2))
    cache.unlock_all()
    assert cache.lookup((0, 1)) == a  # (0, 1) is now the most recent
    cache.unlock_all()
    c = cache.assign((0, 3))  # evicts (0, 2)
    assert c == b and (0, 2) not in cache and (0, 1) in cache
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 0, 1)
    assert cache.lookup((0, 2)) is None and cache.stats.misses == 1


def test_locked_slots_are_never_evicted_and_staging_takes_the_overflow():
    cache = SlotCache(cached_slots=1, staging_slots=2)
    kept = cache.assign((1, 0))
    spill = [cache.assign((1, e)) for e in (1, 2)]  # the cached slot is locked: these go to staging
    assert len({kept, *spill}) == 3 and len(cache) == 1 and (1, 0) in cache
    with pytest.raises(RuntimeError, match="more experts in use at once"):
        cache.assign((1, 3))
    cache.unlock_all()  # staging slots come back; (1, 0) stays cached
    assert cache.lookup((1, 0)) == kept


def test_zero_budget_caches_nothing():
    cache = SlotCache(cached_slots=0, staging_slots=4)
    for layer in range(3):
        slots = [cache.assign((layer, e)) for e in range(4)]
        assert sorted(slots) == [0, 1, 2, 3]
        cache.unlock_all()
    assert len(cache) == 0 and cache.lookup((0, 0)) is None


def test_host_slab_slots_are_block_aligned():
    _, slab = host_slab(3, 2 * BLOCK_BYTES, pinned=False)
    assert slab.shape == (3, 2 * BLOCK_BYTES)
    assert all(slab[i].data_ptr() % BLOCK_BYTES == 0 for i in range(3))


def test_direct_io_reads_the_same_bytes(built, tmp_path):
    store = built.store("qwen3_5_moe", 4)
    buffered = flashmoe.load(store, cache_gb=0).logits(PROMPT[:12])
    try:
        model = flashmoe.load(store, cache_gb=0, direct_io=True)
        direct = model.logits(PROMPT[:12])
    except FlashMoeError as exc:  # tmpfs and some overlay file systems refuse O_DIRECT: say so clearly
        assert "does not support O_DIRECT" in str(exc)
        pytest.skip(str(exc))
    assert model.stats["expert_reads"] > 0
    assert (direct == buffered).all()


def test_the_policy_picks_the_victim_and_forgotten_entries_leave_it():
    from flashmoe.eviction import FrequencyLRU

    cache = SlotCache(cached_slots=2, staging_slots=1, policy=FrequencyLRU())
    often = cache.assign((0, 1))
    cache.assign((0, 2))
    cache.unlock_all()
    for _ in range(3):
        cache.lookup((0, 1))
        cache.unlock_all()
        cache.tick()
    cache.lookup((0, 2))  # the most recent, but used twice against four
    cache.unlock_all()
    cache.assign((0, 3))  # LRU would evict (0, 1)
    assert (0, 1) in cache and (0, 2) not in cache and cache.lookup((0, 1)) == often
    cache.unlock_all()
    cache.forget((0, 3))
    cache.assign((0, 4))  # into the slot (0, 3) left; the policy never names a forgotten key
    cache.unlock_all()
    cache.assign((0, 5))
    assert len(cache) == 2 and (0, 1) in cache


@pytest.mark.parametrize("policy", list(POLICIES))
def test_policies_change_what_is_cached_never_the_answer(built, policy):
    store = built.store("qwen3_5_moe", 4)
    with flashmoe.load(store, cache_gb=0) as uncached:
        expected = list(uncached.generate(PROMPT[:8], 12, stop_token_ids=[]))
    blob = uncached.store.expert_blob_bytes
    with flashmoe.load(store, cache_gb=20 * blob / 1e9, cache_policy=policy) as model:  # 20 of the 64 experts
        assert list(model.generate(PROMPT[:8], 12, stop_token_ids=[])) == expected
        assert model.stats["cache_evictions"] > 0 and model.stats["cache_hits"] > 0


def test_an_unknown_cache_policy_is_named(built):
    with pytest.raises(FlashMoeError, match="unknown cache policy 'mru'; choose one of lru, frequency-lru"):
        flashmoe.load(built.store("qwen3_5_moe", 4), cache_policy="mru")


def test_one_fetch_takes_more_than_a_batch_only_when_every_expert_is_cached(built):
    from flashmoe.experts import ExpertFetcher
    from flashmoe.store import Store

    store = Store(built.store("qwen3_5_moe", 4))
    every = list(range(store.config.num_experts))
    fetcher = ExpertFetcher(store, torch.device("cpu"), ram_cache_bytes=10**9, batch_experts=4)
    with pytest.raises(ValueError, match="at most 4 experts per fetch"):
        fetcher.start(0, every)  # nothing cached: reads need staging slots
    for i in range(0, len(every), 4):
        with fetcher.fetch(0, every[i : i + 4]) as f:
            list(fetcher.arrivals(f))
    assert fetcher.all_cached(0, every) and not fetcher.all_cached(1, every)
    with fetcher.fetch(0, every) as f:  # all in RAM now: one fetch, no reads
        assert [e for e, _ in fetcher.arrivals(f)] == every and not f.reading
    fetcher.close()


def test_a_cache_larger_than_the_free_memory_is_refused_before_it_is_allocated(built, monkeypatch):
    import collections

    import flashmoe.experts as experts
    import flashmoe.memory as memory

    store = built.store("qwen3_5_moe", 4)
    blob = flashmoe.load(store, cache_gb=0).store.expert_blob_bytes
    free = collections.namedtuple("Memory", "available total")(60 * blob, 60 * blob)  # staging slots come on top
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: free)
    with pytest.raises(FlashMoeError, match=r"cache_gb asks for .* GB of RAM for experts, but .* GB is free; pass at"):
        flashmoe.load(store, cache_gb=50 * blob / 1e9)
    # within what is free, it loads and its slab stays inside the share
    assert flashmoe.load(store, cache_gb=8 * blob / 1e9).fetcher.ram_slab.numel() <= experts.MACHINE_SHARE * free.available


def test_the_default_pinned_cache_on_a_gpu_holds_every_expert_when_vram_cannot_and_ram_can(monkeypatch):
    """On a GPU with no cache_gb: none when the VRAM cache holds every expert; every expert (the tiers are inclusive:
    for all to be resident, RAM must hold them all) when VRAM cannot and they take at most half of the free RAM; none
    when they take more (bigger than RAM: the page cache serves), a cgroup's limit counting as the free RAM."""
    import flashmoe.memory as memory

    every = 10 << 30
    monkeypatch.setattr(memory, "ram_available", lambda: 4 * every)
    assert memory.default_pinned_cache_bytes(every, in_vram=every) == 0
    assert memory.default_pinned_cache_bytes(every, in_vram=every // 5) == every
    assert memory.default_pinned_cache_bytes(every, in_vram=0) == every
    monkeypatch.setattr(memory, "ram_available", lambda: 2 * every - 1)
    assert memory.default_pinned_cache_bytes(every, in_vram=every // 5) == 0
    monkeypatch.undo()
    monkeypatch.setattr(memory, "_cgroup_room", lambda: every)  # a container of 10 GB on a big machine
    assert memory.default_pinned_cache_bytes(every, in_vram=0) == 0


def test_the_default_ram_cache_holds_every_expert_when_they_fit_and_counts_a_cgroup_limit(built, monkeypatch, tmp_path):
    """On the CPU with no cache_gb: every expert when they take at most half of the free RAM (a model that fits never
    reads again), else an eighth of RAM (at most half of what is free); a cgroup's memory.max (here, its parent's)
    counts as the free RAM when it leaves less."""
    import collections

    import flashmoe.memory as memory

    store = built.store("qwen3_5_moe", 4)
    blob = flashmoe.load(store, cache_gb=0).store.expert_blob_bytes
    every = flashmoe.load(store, cache_gb=0).fetcher.every_expert
    machine = collections.namedtuple("Memory", "available total")
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: machine(4 * every * blob, 16 * every * blob))
    model = flashmoe.load(store)
    model.warm_cache()
    assert model.fetcher.ram.cached_slots >= every and len(model.fetcher.ram) == every
    list(model.generate([5, 6, 7], 4, stop_token_ids=[]))
    assert model.stats["expert_reads"] == 0  # warm, it never reads again
    # too big for half of what is free: an eighth of RAM
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: machine(every * blob, 4 * every * blob))
    assert memory.default_cache_bytes(every * blob) == every * blob // 2
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: machine(every * blob, 16 * every * blob // 10))
    assert memory.default_cache_bytes(every * blob) == 16 * every * blob // 80
    # a cgroup: /proc/self/cgroup names it; its parent's memory.max leaves 3 MB
    monkeypatch.undo()
    root = tmp_path / "cgroup"
    (root / "box" / "job").mkdir(parents=True)
    (root / "box" / "memory.max").write_text("10000000\n")
    (root / "box" / "memory.current").write_text("7000000\n")
    (root / "box" / "job" / "memory.max").write_text("max\n")
    monkeypatch.setattr(memory, "CGROUP_ROOT", root)
    real_read_text = memory.Path.read_text
    monkeypatch.setattr(memory.Path, "read_text", lambda self: "0::/box/job\n" if str(self) == "/proc/self/cgroup"
                        else real_read_text(self))
    assert memory._cgroup_room() == 3_000_000
    assert memory.ram_available() == min(3_000_000, memory.psutil.virtual_memory().available)
    # its usage is mostly page cache the kernel would give back: that counts as free
    (root / "box" / "memory.stat").write_text("anon 1000000\nfile 5800000\nactive_file 2000000\n"
                                              "inactive_file 3500000\nshmem 300000\n")
    assert memory._cgroup_room() == 3_000_000 + 5_500_000
    # cgroup v1's memory controller, "no limit" written as a huge number at the top
    (root / "memory" / "slice").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{2 ** 63 - 4096}\n")
    (root / "memory" / "slice" / "memory.limit_in_bytes").write_text("8000000\n")
    (root / "memory" / "slice" / "memory.usage_in_bytes").write_text("6500000\n")
    monkeypatch.setattr(memory.Path, "read_text", lambda self: "4:memory:/slice\n3:cpu:/\n"
                        if str(self) == "/proc/self/cgroup" else real_read_text(self))
    assert memory._cgroup_room() == 1_500_000
    (root / "memory" / "slice" / "memory.stat").write_text("cache 4000000\ninactive_file 10\n"
                                                          "total_inactive_file 3000000\ntotal_active_file 500000\n")
    assert memory._cgroup_room() == 1_500_000 + 3_500_000
