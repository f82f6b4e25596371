"""Streaming is real: bytes read follow the routing, the cache keeps its budget, RSS stays far below the store."""

from __future__ import annotations

import gc

import psutil
import torch

import flashmoe
from flashmoe.convert import convert
from flashmoe.tiny import build_tiny_checkpoint
from conftest import load_reference
from test_reference import PROMPT


def test_expert_bytes_read_follow_the_routing(built):
    arch = "qwen3_5_moe"
    model = flashmoe.load(built.store(arch, 4), cache_gb=0)
    model.logits(PROMPT)
    ref = load_reference(built.checkpoint(arch), arch)
    with torch.no_grad():
        router_logits = ref(torch.tensor([PROMPT]), output_router_logits=True).router_logits
    k = model.config.num_experts_per_tok
    distinct = sum(len(torch.topk(r, k, dim=-1).indices.unique()) for r in router_logits)
    assert model.stats["expert_reads"] == distinct  # each needed expert read once per layer for the prompt
    assert model.stats["expert_bytes_read"] == distinct * model.store.expert_blob_bytes
    assert model.stats["cache_hits"] == 0 and model.stats["cache_bytes"] == 0


def test_cache_serves_repeats_within_its_budget(built):
    store = built.store("qwen3_5_moe", 4)
    blob = flashmoe.load(store).store.expert_blob_bytes
    budget_blobs = 40  # of 64; below one token's working set (16) LRU over cycling layers never hits
    model = flashmoe.load(store, cache_gb=budget_blobs * blob / 1e9)
    list(model.generate(PROMPT[:8], 16, stop_token_ids=[]))
    s = model.stats
    assert s["cache_bytes"] <= budget_blobs * blob
    assert s["cache_evictions"] > 0 and s["cache_hits"] > 0
    assert s["cache_misses"] == s["expert_reads"]  # every miss is exactly one read

    roomy = flashmoe.load(store, cache_gb=1.0)  # everything fits: a repeat prompt reads nothing new
    roomy.logits(PROMPT)
    first = roomy.stats["expert_bytes_read"]
    roomy.logits(PROMPT)
    assert roomy.stats["expert_bytes_read"] == first and roomy.stats["cache_hits"] > 0


def test_generation_rss_stays_far_below_store_size(tmp_path):
    # ~150 MB of bf16 experts, a 5 MB cache: streaming must not pull the store into the process
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", "qwen3_5_moe", hidden_size=256, moe_intermediate_size=128,
                                 num_experts=64, num_hidden_layers=12, num_experts_per_tok=8, max_shard_size="5MB")
    store = convert(ckpt, tmp_path / "store", bits=None)
    gc.collect()
    model = flashmoe.load(store, cache_gb=0.005)
    expert_bytes = model.store.expert_bytes
    assert expert_bytes > 120e6
    process = psutil.Process()
    model.logits(PROMPT[:4])  # warm up allocator and thread pool
    before = process.memory_info().rss
    tokens = list(model.generate(PROMPT[:6], 24, temperature=1.0, seed=0, stop_token_ids=[]))
    growth = process.memory_info().rss - before
    assert len(tokens) == 24
    assert model.stats["expert_bytes_read"] > expert_bytes / 4  # it really touched much of the store
    assert growth < expert_bytes / 10, f"RSS grew {growth / 1e6:.1f} MB for a {expert_bytes / 1e6:.0f} MB store"
