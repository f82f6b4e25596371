"""Warming the expert caches: whether they have room for every expert, and that a warmed model reads no expert from
disk again (what `flashmoe serve` does at start when they have)."""

import flashmoe
from flashmoe.data import SMALL_MOE


def test_a_warmed_model_whose_caches_hold_every_expert_reads_none_again():
    model = flashmoe.load(SMALL_MOE, device="cpu", cache_gb=1.0)
    try:
        assert model.caches_hold_every_expert
        done = []
        model.warm_cache(progress=done.append)
        assert sum(done) == model.fetcher.every_expert * model.store.expert_blob_bytes and len(done) > 1
        list(model.generate(model.tokenizer.encode("The sea"), 6))
        assert model.stats["expert_reads"] == 0
    finally:
        model.close()


def test_caches_with_room_for_some_experts_do_not_hold_every_expert():
    model = flashmoe.load(SMALL_MOE, device="cpu", cache_gb=0.001)
    try:
        assert not model.caches_hold_every_expert
        list(model.generate(model.tokenizer.encode("The sea"), 6))
        assert model.stats["expert_reads"] > 0
    finally:
        model.close()


def test_warm_batches_does_nothing_where_batches_are_not_graphs():
    model = flashmoe.load(SMALL_MOE, device="cpu")
    try:
        assert model.warm_batches(8) == []
    finally:
        model.close()


def test_warm_prompts_runs_nothing_on_the_cpu():
    """The CPU's kernels are built at load: no throwaway prompt to pay for at start."""
    model = flashmoe.load(SMALL_MOE, device="cpu")
    try:
        steps = []
        model.step = steps.append  # a warm-up would step its prompt through the model
        model.warm_prompts()
        assert steps == []
    finally:
        model.close()
