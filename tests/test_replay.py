"""Routing by a trace (replay.py): the engine takes each token's experts from the trace, everything else unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashmoe
from conftest import rel_error
from flashmoe.errors import FlashMoeError
from flashmoe.traces import TraceShape, calibrated_sequences, calibrated_trace
from test_reference import PROMPT


def recorded_routing(model, prompt: list[int], steps: list[int]) -> np.ndarray:
    """The experts the model's own router picks for `prompt` then the tokens of `steps`, as a trace."""
    with model.recording_routing() as recorder:
        state = model.new_state()
        for tokens in [prompt] + [[t] for t in steps]:
            model.forward(tokens, state)
    trace = recorder.trace()
    assert trace.shape == (len(prompt) + len(steps), len(model.config.moe_layers), model.experts_per_token)
    return trace


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "mixtral"])  # routers whose kept weights are a softmax over the kept
def test_replaying_the_routers_own_choices_changes_nothing(built, arch):
    store = built.store(arch, None)
    model = flashmoe.load(store)
    trace = recorded_routing(model, PROMPT[:20], PROMPT[20:26])
    replayed = flashmoe.load(store)
    replayed.route_by_trace(trace)
    state = replayed.new_state()
    got = [replayed.forward(PROMPT[:20], state)] + [replayed.forward([t], state) for t in PROMPT[20:26]]
    state = model.new_state()
    expected = [model.forward(PROMPT[:20], state)] + [model.forward([t], state) for t in PROMPT[20:26]]
    assert rel_error(torch.cat(got), torch.cat(expected)) < 1e-6


def test_a_trace_decides_which_experts_are_read(built):
    store = built.store("qwen3_5_moe", 4)
    model = flashmoe.load(store, cache_gb=1.0)
    layers = len(model.config.moe_layers)
    same = np.tile(np.arange(3), (40, layers, 1))  # every token picks experts 0, 1, 2 in every layer (K=3)
    model.route_by_trace(same)
    tokens = list(model.generate(PROMPT[:8], 8, stop_token_ids=[]))
    assert len(tokens) == 8 and model.experts_per_token == 3
    assert model.stats["expert_reads"] == 3 * layers  # each layer's three, once: the cache serves the rest
    router = flashmoe.load(store, cache_gb=1.0)
    list(router.generate(PROMPT[:8], 8, stop_token_ids=[]))
    assert router.stats["expert_reads"] > 3 * layers


def test_a_calibrated_trace_reads_fewer_experts_than_uniform_routing(built):
    """The skewed, reusing routing of a trained model (traces.py) hits a small cache more than the random router."""
    store = built.store("qwen3_5_moe", 4)
    blob = flashmoe.load(store).store.expert_blob_bytes
    model = flashmoe.load(store, cache_gb=16 * blob * 1.2 / 1e9)  # about a quarter of the 64 experts
    cfg = model.config
    trace = calibrated_trace(TraceShape(200, len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok), seed=1)
    model.route_by_trace(trace)
    list(model.generate(PROMPT[:4], 60, stop_token_ids=[]))
    uniform = flashmoe.load(store, cache_gb=16 * blob * 1.2 / 1e9)
    list(uniform.generate(PROMPT[:4], 60, stop_token_ids=[]))
    assert model.stats["cache_hit_rate"] > uniform.stats["cache_hit_rate"]


def test_a_trace_that_does_not_fit_the_model_is_one_line(built):
    model = flashmoe.load(built.store("qwen3_5_moe", 4))
    layers, experts = len(model.config.moe_layers), model.config.num_experts
    for trace, message in [(np.zeros((5, layers + 1, 2), dtype=np.int64), r"is \[tokens, 4 MoE layers, K\]"),
                           (np.full((5, layers, 2), experts), "expert ids 0..15"),
                           (np.zeros((5, layers, 2), dtype=np.int64), "picks an expert twice")]:
        with pytest.raises(FlashMoeError, match=message):
            model.route_by_trace(trace)


def test_recording_and_replaying_span_every_part_of_a_split_model(built):
    """Over several devices (here CPU parts) each part's router is recorded and each replays the trace."""
    store = built.store("qwen3_5_moe", None)
    one = flashmoe.load(store)
    split = flashmoe.load(store, devices="cpu,cpu")
    trace = recorded_routing(split, PROMPT[:20], PROMPT[20:26])
    assert np.array_equal(trace, recorded_routing(one, PROMPT[:20], PROMPT[20:26]))
    shifted = (trace + 1) % split.config.num_experts  # another routing: the replay, not the router, decides
    for model in (one, split):
        model.route_by_trace(shifted)
    state_one, state_split = one.new_state(), split.new_state()
    got = [split.forward(PROMPT[:20], state_split)] + [split.forward([t], state_split) for t in PROMPT[20:26]]
    expected = [one.forward(PROMPT[:20], state_one)] + [one.forward([t], state_one) for t in PROMPT[20:26]]
    assert torch.equal(torch.cat(got), torch.cat(expected))
    assert recorded_routing(split, PROMPT[:4], []).shape[1] == len(split.config.moe_layers)


def test_sequences_stepped_together_replay_their_own_traces(built):
    """A set of traces [sequences, tokens, layers, K]: the n-th sequence the model meets replays trace n, alone or
    stepped together (the server's steps, prompts in chunks beside the others' tokens): what each makes is what it
    makes alone under its own trace."""
    from test_batched import PROMPTS, alone, together

    store = built.store("qwen3_5_moe", 4)
    cfg = flashmoe.load(store).config
    traces = calibrated_sequences(TraceShape(40, len(cfg.moe_layers), cfg.num_experts, 3), len(PROMPTS), seed=2)
    expected = []
    for trace, prompt in zip(traces, PROMPTS):
        model = flashmoe.load(store, cache_gb=0.01)
        model.route_by_trace(trace)
        expected.append(alone(model, prompt, 8))
    model = flashmoe.load(store, cache_gb=0.01)
    model.route_by_trace(traces)
    assert together(model, PROMPTS, 8) == expected
    model = flashmoe.load(store, cache_gb=0.01)
    model.route_by_trace(traces)
    assert together(model, PROMPTS, 8, prefill_chunk=4) == expected
    model = flashmoe.load(store, cache_gb=0.01)
    model.route_by_trace(traces[0])  # one trace for all: the second sequence makes something else
    assert together(model, PROMPTS, 8)[1] != expected[1]
