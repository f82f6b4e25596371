"""The prefix cache (prefix_cache.py): a request that begins with a kept state's tokens resumes from a copy of it,
prefills only the rest and answers as a fresh sequence would (hybrid DeltaNet, MLA, sink and plain attention
caches); kept states stay within their byte budget; a reply cut short is not kept; a served chat's second turn
hits it and /metrics counts it."""

from __future__ import annotations

import pytest
import torch

import flashmoe
from flashmoe.layers.attention import KVCache
from flashmoe.prefix_cache import PrefixCache, copy_cache

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 23, 84]


def _turns(model, first: list[int], follow: list[int], n: int = 6):
    """A first turn, then a second whose prompt is the first's, its reply and `follow`; the second's tokens and how
    many tokens the model ran for it."""
    reply = list(model.generate(first, n, stop_token_ids=[]))
    second = first + reply + follow
    before = model.stats["tokens"]
    out = list(model.generate(second, n, stop_token_ids=[]))
    return second, out, model.stats["tokens"] - before


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "deepseek_v3", "gpt_oss", "qwen3_moe"])
def test_a_second_turn_prefills_only_its_new_tokens(built, arch):
    store = built.store(arch, 4)
    with flashmoe.load(store, prefix_cache_gb=0.1) as model:
        second, tokens, ran = _turns(model, PROMPT, [7, 8, 9])
        stats = model.stats
    with flashmoe.load(store) as fresh:
        expected = list(fresh.generate(second, 6, stop_token_ids=[]))
    assert tokens == expected
    saved = len(PROMPT) + 6 - 1  # the reply's last token was sampled, never run: the next turn runs it
    assert stats["prefix_hits"] == 1 and stats["prefix_tokens_saved"] == saved
    assert ran == len(second) - saved + 5  # the rest of the prompt, then 5 decode steps for 6 tokens


def test_branches_from_one_kept_state_do_not_disturb_it(built):
    store = built.store("qwen3_5_moe", 4)
    with flashmoe.load(store, prefix_cache_gb=0.1) as model, flashmoe.load(store) as fresh:
        list(model.generate(PROMPT, 3, stop_token_ids=[]))
        for follow in ([5, 6], [40, 41, 42], [5, 6]):  # each resumes from the same end of PROMPT's reply or prompt
            prompt = PROMPT + follow
            assert list(model.generate(prompt, 4, stop_token_ids=[])) == list(fresh.generate(prompt, 4, stop_token_ids=[]))
        assert model.stats["prefix_hits"] == 3


def test_logits_after_a_hit_are_a_fresh_sequences(built):
    store = built.store("qwen3_5_moe", 4)
    with flashmoe.load(store, prefix_cache_gb=0.1) as model:
        list(model.generate(PROMPT, 1, stop_token_ids=[]))
        state, done = model._resume(PROMPT + [5, 6, 7])
        assert done == len(PROMPT)
        ours = model.forward([5, 6, 7], state)
        reference = model.forward(PROMPT + [5, 6, 7], model.new_state())[-3:]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_kept_states_stay_within_their_budget(built):
    store = built.store("qwen3_5_moe", 4)
    with flashmoe.load(store, prefix_cache_gb=0.1) as probe:
        list(probe.generate(PROMPT, 1, stop_token_ids=[]))
        one = probe.prefix_cache.stats.bytes  # one state at the end of a 10-token prompt
    with flashmoe.load(store) as model:
        model.prefix_cache = PrefixCache(int(2.5 * one))
        for start in range(4):
            list(model.generate([start + 1] + PROMPT[1:], 1, stop_token_ids=[]))
            assert model.prefix_cache.stats.bytes <= model.prefix_cache.max_bytes
        assert len(model.prefix_cache) == 2  # the least recently used gave way
        model.prefix_cache = PrefixCache(one // 2)
        list(model.generate(PROMPT, 1, stop_token_ids=[]))
        assert len(model.prefix_cache) == 0  # a state larger than the whole budget is not kept


def test_a_reply_cut_short_is_not_kept(built, monkeypatch):
    store = built.store("qwen3_5_moe", 4)
    with flashmoe.load(store, prefix_cache_gb=0.1) as model:
        real, calls = model.forward, {"n": 0}

        def failing(tokens, state, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # the second decode step
                raise KeyboardInterrupt
            return real(tokens, state, **kwargs)

        monkeypatch.setattr(model, "forward", failing)
        with pytest.raises(KeyboardInterrupt):
            list(model.generate(PROMPT, 6, stop_token_ids=[]))
        monkeypatch.setattr(model, "forward", real)
        assert max(len(k) for k in model.prefix_cache._entries) == len(PROMPT)  # the prompt's end only
        with flashmoe.load(store) as fresh:
            prompt = PROMPT + [5, 6]
            assert list(model.generate(prompt, 4, stop_token_ids=[])) == list(fresh.generate(prompt, 4, stop_token_ids=[]))


def test_bad_budgets_and_distributed_runs_get_one_line(built):
    store = built.store("qwen3_5_moe", 4)
    with pytest.raises(flashmoe.FlashMoeError, match="prefix_cache_gb must be >= 0"):
        flashmoe.load(store, prefix_cache_gb=-1)
    with pytest.raises(flashmoe.FlashMoeError, match="not built for distributed runs"):
        flashmoe.load(store, prefix_cache_gb=1, distributed=True)
    with pytest.raises(flashmoe.FlashMoeError, match="prefix_cache_gb asks for .* GB of RAM .* is free"):
        flashmoe.load(store, prefix_cache_gb=1e6)  # a petabyte


def test_a_served_chats_second_turn_hits_the_cache(built):
    from server_harness import NO_THINKING, RunningServer, get

    s = RunningServer(built.store("qwen3_5_moe", 4), prefix_cache_gb=0.1)
    try:
        client = s.client()
        messages = [{"role": "user", "content": "Tell me about the sea."}]
        first = client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=6, temperature=0,
                                               extra_body=NO_THINKING)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And the mountains?"}]
        client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=6, temperature=0,
                                       extra_body=NO_THINKING)
        s.served.scheduler._copy_model_stats(force=True)
        code, text = get(s.url + "/metrics")
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith("flashmoe_prefix")}
        assert code == 200
        assert values['flashmoe_prefix_cache_lookups_total{result="hit"}'] >= 1
        first_history = s.served.chat.encode(s.served.chat.render(messages[:1], add_generation_prompt=False,
                                                                   enable_thinking=False))
        # at least the first turn's messages were not prefilled again (its reply, re-rendered without the empty
        # think block, branches from the end of the history)
        assert values["flashmoe_prefix_cache_tokens_saved_total"] >= len(first_history)
        assert values["flashmoe_prefix_cache_bytes"] > 0
    finally:
        s.close()


@pytest.mark.gpu
def test_on_the_gpu_a_resumed_sequence_answers_as_a_fresh_one(built):
    """Snapshots go to RAM and come back to the GPU; the resumed sequence then captures its own decode graphs."""
    store = built.store("qwen3_5_moe", 4)
    with flashmoe.load(store, device="cuda", prefix_cache_gb=0.1) as model:
        second, tokens, ran = _turns(model, PROMPT, [7, 8, 9], n=8)
        assert model.stats["prefix_hits"] == 1
        assert all(c is None or all(t.device.type == "cpu" for t in (c.k, c.v) if t is not None)
                   for c in model.prefix_cache._entries[tuple(PROMPT)].layers if hasattr(c, "v"))
    with flashmoe.load(store, device="cuda") as fresh:
        assert tokens == list(fresh.generate(second, 8, stop_token_ids=[]))


def test_a_snapshot_leaves_out_what_a_cache_derives_from_its_tensors():
    """A KV cache's device table (where its K and V are, and its capacity) describes the tensors it was made for: a
    snapshot that kept it would restore a table of tensors since freed."""
    cache = KVCache()
    cache.append(torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    cache.table, cache.table_of = torch.tensor(cache.addresses()), cache.addresses()  # as reserve() makes on a GPU
    copy = copy_cache(cache, "cpu")
    assert copy.table is None and copy.table_of == () and copy.length == 5 and torch.equal(copy.k, cache.k[:, :5])


@pytest.mark.gpu
def test_a_restored_cache_at_a_freed_caches_address_gets_its_own_table():
    """The caching allocator can give a restored cache's K the address a freed one's had, with another V and
    capacity (a 397B-geometry chat's third turn then read a stale table in its decode graph: an illegal memory
    access). reserve() remakes the table whenever any of the three differ."""
    like = torch.empty(2, 1, 256, dtype=torch.bfloat16, device="cuda")
    old = KVCache()
    old.reserve(600, like)
    restored = copy_cache(old, "cuda")
    assert restored.table is None
    # the worst case, made on purpose: K where the old K was, a smaller capacity, and the old table kept
    restored.k = old.k.flatten()[: 2 * 500 * 256].view(2, 500, 256)
    restored.v = torch.zeros_like(restored.k)
    restored.table, restored.table_of = old.table.clone(), old.table_of
    restored.reserve(10, like)
    assert restored.table.tolist() == list(restored.addresses()) != old.table.tolist()
