"""Several sequences in one forward (Model.forward_batch / Model.step, issue 15): each gets what it gets alone, and
an expert several of them choose is read once."""

from __future__ import annotations

import copy

import pytest
import torch

import flashmoe
from conftest import LAYOUTS

PROMPTS = [[5, 9, 31, 2, 7, 11], [100, 3], [17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]]


def alone(model, prompt, n, **kw):
    return list(model.generate(prompt, n, stop_token_ids=[], **kw))


def together(model, prompts, n, prefill_chunk=None, seeds=None, **kw):
    """The prompts run as the server runs them: one step of every unfinished sequence per forward, prompts in chunks
    beside the others' decoding; seeds: each sequence's own."""
    seeds = seeds or [None] * len(prompts)
    seqs = [model.sequence(p, n, stop_token_ids=[], prefill_chunk=prefill_chunk, seed=seed, **kw)
            for p, seed in zip(prompts, seeds)]
    made = [[] for _ in prompts]
    while any(not s.done for s in seqs):
        running = [i for i, s in enumerate(seqs) if not s.done]
        rows = model.step([seqs[i] for i in running])
        for i, row in zip(running, rows):
            token = seqs[i].advance(row)
            if token is not None:
                made[i].append(token)
    for s in seqs:
        s.close()
    return made


@pytest.mark.parametrize("arch", LAYOUTS)
def test_sequences_in_one_forward_make_what_they_make_alone(built, arch):
    model = flashmoe.load(built.store(arch, 4), cache_gb=0.01)
    expected = [alone(model, p, 10) for p in PROMPTS]
    assert together(model, PROMPTS, 10) == expected
    # prompts in chunks of 4, running beside the others' tokens
    assert together(model, PROMPTS, 10, prefill_chunk=4) == expected


def test_forward_batch_logits_equal_forward(built):
    model = flashmoe.load(built.store("qwen3_5_moe", None))  # float32 weights
    states = [model.new_state() for _ in PROMPTS]
    for p, s in zip(PROMPTS, states):
        model.forward(p[:-1], s)
    rows = model.forward_batch([(p[-1:], s) for p, s in zip(PROMPTS, states)])
    for p, row, s in zip(PROMPTS, rows, states):
        ref_state = model.new_state()
        model.forward(p[:-1], ref_state)
        ref = model.forward(p[-1:], ref_state, all_logits=False)
        assert row.shape == ref.shape == (1, model.config.vocab_size)
        torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-5)
        assert s.position == ref_state.position == len(p)


def test_sampled_sequences_keep_their_seeds(built):
    model = flashmoe.load(built.store("qwen3_5_moe", 4), cache_gb=0.01)
    kw = dict(temperature=0.9, top_p=0.95)
    expected = [alone(model, p, 8, seed=i) for i, p in enumerate(PROMPTS)]
    made = together(model, PROMPTS, 8, seeds=list(range(len(PROMPTS))), **kw)
    assert made == [alone(model, p, 8, seed=i, **kw) for i, p in enumerate(PROMPTS)]
    assert made != expected  # the sampling was not greedy


def test_an_expert_chosen_by_several_sequences_is_read_once(built):
    """A decode step of three sequences reads the union of their experts, each once (a cold RAM cache: the prompts
    ran on another copy of the model)."""
    store = built.store("qwen3_5_moe", 4)
    warm = flashmoe.load(store, cache_gb=1.0)
    states = [warm.new_state() for _ in PROMPTS]
    for p, s in zip(PROMPTS, states):
        warm.forward(p[:-1], s)
    model = flashmoe.load(store, cache_gb=1.0)
    with model.recording_routing() as recorder:
        model.forward_batch([(p[-1:], s) for p, s in zip(PROMPTS, states)])
        step = recorder.trace()
    layers = range(len(model.config.moe_layers))
    chosen = {(i, e) for i in layers for e in step[:, i].ravel().tolist()}
    per_token = sum(len({(i, e) for i in layers for e in step[t, i].tolist()}) for t in range(len(PROMPTS)))
    assert step.shape[0] == len(PROMPTS)
    assert model.stats["expert_reads"] == len(chosen)
    assert len(chosen) < per_token  # some expert was chosen by two of them and read once


@pytest.mark.parametrize("arch", LAYOUTS)
@torch.inference_mode()
def test_a_batchs_static_token_mixing_equals_each_sequence_eagerly(built, arch):
    """The token mixing a batch's CUDA graph holds (mix_many at device positions: each token's key and value written
    at its position, attention over its cache's whole capacity under a mask, the recurrences per sequence) gives
    every layer's output and caches as each sequence's eager step does."""
    model = flashmoe.load(built.store(arch, None))  # float32 weights
    m, layers = model.model, model.config.num_hidden_layers
    states = [model.new_state() for _ in PROMPTS]
    for p, s in zip(PROMPTS, states):
        model.forward(p[:-1], s)
    eager = copy.deepcopy(states)
    x = m.embed(torch.tensor([p[-1] for p in PROMPTS]))
    positions = torch.tensor([s.position for s in states])
    for layer in range(layers):
        caches = [c for c in (m.kv_cache(s, layer) for s in states) if c is not None]
        for cache in caches:
            cache.reserve(cache.length + 1, cache.k)
        got_x, got_h = m.mix_many(layer, x, states, [(i, i + 1) for i in range(len(states))], positions)
        for cache in caches:
            cache.length += 1  # the graph's caller advances them
        want = [m.mix_many(layer, x[i : i + 1], [e], [(0, 1)]) for i, e in enumerate(eager)]
        torch.testing.assert_close(got_x, torch.cat([w[0] for w in want]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_h, torch.cat([w[1] for w in want]), rtol=1e-5, atol=1e-5)
        x = got_x
    assert_same_caches(m, states, eager)


def assert_same_caches(m, states, eager):
    for s, e in zip(states, eager):
        for layer in range(len(s.layers)):
            got, want = s.layers[layer], e.layers[layer]
            if m.kv_cache(s, layer) is not None:
                n = want.length
                assert got.length == n and got.capacity >= n
                for name in ("k", "v"):
                    if getattr(want, name, None) is not None:
                        torch.testing.assert_close(getattr(got, name)[..., :n, :], getattr(want, name)[..., :n, :])
            else:  # a recurrent state
                for name, t in vars(want).items():
                    torch.testing.assert_close(getattr(got, name), t, rtol=1e-5, atol=1e-5)


def test_the_scheduler_batches_where_the_model_batches_well(built):
    """serve's default: one forward for all running requests on the CPU (the model says so); a GPU holding every
    expert says so too (tests/test_gpu.py)."""
    from flashmoe.scheduler import Scheduler

    model = flashmoe.load(built.store("qwen3_5_moe", 4), cache_gb=0.01)
    assert model.batches_well
    assert Scheduler(model).batch_steps is None and Scheduler(model, batch_steps=False).batch_steps is False


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
@torch.inference_mode()
def test_a_batchs_deltanet_tokens_in_one_pass_equal_each_alone(built, arch):
    """A GPU batch's DeltaNet decode step (conv windows and recurrent states gathered, each kernel once, written
    back) gives each sequence's output and states as its own step does; run here through the torch references."""
    model = flashmoe.load(built.store(arch, None))
    m = model.model
    layer = model.config.layer_types.index("linear_attention")
    p = f"model.layers.{layer}.linear_attn."
    states = [model.new_state() for _ in PROMPTS]
    for prompt, s in zip(PROMPTS, states):
        model.forward(prompt, s)
    nets = [s.layers[layer] for s in states]
    alone = copy.deepcopy(nets)
    h = torch.randn(len(nets), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    proj = torch.nn.functional.linear(h, m.w[p + "in_proj.fused"])
    got = m._delta_tokens(p, proj, h, nets)
    for i, net in enumerate(alone):
        torch.testing.assert_close(got[i : i + 1], m._delta_rule(p, proj[i : i + 1], h, net), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nets[i].conv, net.conv)
        torch.testing.assert_close(nets[i].recurrent, net.recurrent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [a for a in LAYOUTS if a != "deepseek_v3"])
@torch.inference_mode()
def test_a_batchs_token_mixing_from_a_table_of_addresses_serves_any_set(built, arch):
    """The token mixing of a graph for any set of sequences: their caches found through a table of addresses (the
    attention kernel, DeltaNet states gathered and written back by address; here in Triton's interpreter), padding
    rows stepping a blank state. Two different sets through the same code, each row as its sequence's eager step."""
    from flashmoe.decode_graphs import batch_table, table_row

    model = flashmoe.load(built.store(arch, None))  # float32 weights
    m, layers = model.model, range(model.config.num_hidden_layers)
    states = [model.new_state() for _ in PROMPTS + PROMPTS[:1]]
    for p, s in zip(PROMPTS + [PROMPTS[0][:3]], states):
        model.forward(p[:-1], s)
    blank = model.new_state()
    blank.layers = [c.blank() for c in states[0].layers]
    for members in ([0, 1, 2], [3, 1], [2]):  # a set of three (bucket 4), then another of two, then one alone
        batch = [states[i] for i in members]
        eager = copy.deepcopy(batch)
        for s in batch:
            for layer in layers:
                if (cache := m.kv_cache(s, layer)) is not None:
                    cache.reserve(cache.length + 1, cache.k)
        bucket = 1 << (len(batch) - 1).bit_length()
        rows = [table_row(s, layers) for s in batch] + [table_row(blank, layers)] * (bucket - len(batch))
        table = batch_table(rows, len(layers))
        tokens = [PROMPTS[i % 3][-1] for i in members] + [0] * (bucket - len(batch))
        x = m.embed(torch.tensor(tokens))
        positions = torch.tensor([s.position for s in batch] + [0] * (bucket - len(batch)))
        for layer in layers:
            got_x, got_h = m.mix_many(layer, x, None, [(i, i + 1) for i in range(bucket)], positions, table[layer])
            for s in batch:
                if (cache := m.kv_cache(s, layer)) is not None:
                    cache.length += 1
            want = [m.mix_many(layer, x[i : i + 1], [e], [(0, 1)]) for i, e in enumerate(eager)]
            torch.testing.assert_close(got_x[: len(batch)], torch.cat([w[0] for w in want]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_h[: len(batch)], torch.cat([w[1] for w in want]), rtol=1e-5, atol=1e-5)
            x = got_x
        assert_same_caches(m, batch, eager)
        for s in batch:
            s.position += 1
