"""The reference checks on an NVIDIA GPU (run through the device tool; skipped where CUDA is absent)."""

from __future__ import annotations

import pytest
import torch

import flashmoe
from flashmoe.errors import FlashMoeError
from flashmoe.kernels import cpu_int4, cpu_native
from flashmoe.store import Store
from conftest import ARCHS, LAYOUTS, load_reference, rel_error
from test_reference import PROMPT

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_float32_matches_transformers_exactly(built, arch):
    model = flashmoe.load(built.store(arch, None), device="cuda", dtype=torch.float32)
    ref = load_reference(built.checkpoint(arch), arch)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
        greedy = ref.generate(torch.tensor([PROMPT[:11]]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                              min_new_tokens=20)[0, 11:].tolist()
    assert rel_error(model.logits(PROMPT).cpu(), expected) < 1e-3
    assert list(model.generate(PROMPT[:11], 20, stop_token_ids=[])) == greedy


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_bfloat16_is_close(built, arch):
    model = flashmoe.load(built.store(arch, None), device="cuda")  # bf16 by default on the GPU
    ref = load_reference(built.checkpoint(arch), arch)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
    assert rel_error(model.logits(PROMPT).cpu(), expected) < 3e-2


def test_cuda_4bit_matches_cpu_4bit(built, monkeypatch):
    store = built.store("qwen3_5_moe", 4)
    # the CPU's exact path: experts dequantized to float (not torch's bf16 int4 kernel), residents in float32
    monkeypatch.setattr(cpu_int4.KernelForm, "for_store", classmethod(lambda *a, **k: None))
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    cpu = flashmoe.load(store, resident_format="float").logits(PROMPT)
    gpu = flashmoe.load(store, device="cuda", dtype=torch.float32).logits(PROMPT).cpu()
    assert rel_error(gpu, cpu) < 1e-3


def test_small_vram_cache_gives_the_same_answer_and_counts_its_tiers(built):
    store = built.store("qwen3_5_moe", 4)
    everything = flashmoe.load(store, device="cuda", dtype=torch.float32)
    expected = everything.logits(PROMPT).cpu()
    assert everything.stats["vram_cache_misses"] > 0 and everything.stats["vram_cache_evictions"] == 0
    blob = everything.store.expert_blob_bytes
    small = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=6 * blob / 1e9,
                          cache_gb=20 * blob / 1e9)
    assert rel_error(small.logits(PROMPT).cpu(), expected) < 1e-5
    tokens = list(small.generate(PROMPT[:8], 12, stop_token_ids=[]))
    assert tokens == list(everything.generate(PROMPT[:8], 12, stop_token_ids=[]))
    s = small.stats
    assert s["vram_cache_evictions"] > 0 and s["vram_cache_bytes"] <= 6 * blob
    assert s["cache_hits"] > 0 and s["cache_bytes"] <= 20 * blob  # the pinned RAM tier served some misses
    assert s["expert_bytes_copied"] == s["vram_cache_misses"] * blob
    small.close()


@pytest.mark.parametrize("arch", LAYOUTS)
def test_gpu_prefill_equals_chunked_decode(built, arch):
    model = flashmoe.load(built.store(arch, 4), device="cuda", dtype=torch.float32)
    whole = model.logits(PROMPT).cpu()
    state = model.new_state()
    parts = [model.forward(PROMPT[:30], state).cpu()]
    parts += [model.forward([t], state).cpu() for t in PROMPT[30:40]]
    parts.append(model.forward(PROMPT[40:], state).cpu())
    assert rel_error(torch.cat(parts), whole) < 1e-4


def test_gpu_bfloat16_4bit_is_close_to_cpu(built):
    store = built.store("qwen3_next", 4)
    cpu = flashmoe.load(store).logits(PROMPT)
    gpu = flashmoe.load(store, device="cuda").logits(PROMPT).cpu()
    assert rel_error(gpu, cpu) < 3e-2


def test_gpu_direct_io(built):
    store = built.store("qwen3_5_moe", 4)
    expected = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=0, cache_gb=0).logits(PROMPT).cpu()
    model = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=0, cache_gb=0, direct_io=True)
    assert rel_error(model.logits(PROMPT).cpu(), expected) == 0.0


@pytest.mark.parametrize("t", [1, 5, 130])
def test_fla_gated_delta_rule_matches_torch(t):
    from flashmoe.kernels import gated_delta as gd

    if not gd.fla_available():
        pytest.skip("fla-core is not installed")
    gen = torch.Generator().manual_seed(t)
    b, hk, hv, dk, dv = 1, 2, 4, 32, 32
    q, k = (torch.randn(b, t, hk, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, t, hv, dv, generator=gen)
    g = -torch.rand(b, t, hv, generator=gen)
    beta = torch.rand(b, t, hv, generator=gen)
    state = torch.randn(b, hv, dk, dv, generator=gen) * 0.1
    rule = gd.recurrent_gated_delta_rule if t == 1 else gd.chunk_gated_delta_rule
    ref_out, ref_state = rule(q, k, v, g, beta, state)
    out, final = gd.gated_delta_rule(*(x.cuda() for x in (q, k, v, g, beta, state)))
    assert rel_error(out.cpu(), ref_out) < 2e-3 and rel_error(final.cpu(), ref_state) < 2e-3


@pytest.mark.parametrize("arch", LAYOUTS)
def test_cuda_graph_decode_equals_eager(built, arch):
    store = built.store(arch, 4)
    eager = flashmoe.load(store, device="cuda", dtype=torch.float32, cuda_graphs=False)
    blob = eager.store.expert_blob_bytes
    graphed = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=10 * blob / 1e9, cache_gb=0)
    s_eager, s_graphed = eager.new_state(), graphed.new_state()
    eager.forward(PROMPT[:8], s_eager)
    graphed.forward(PROMPT[:8], s_graphed)
    for t in PROMPT[8:24]:
        assert rel_error(graphed.forward([t], s_graphed).cpu(), eager.forward([t], s_eager).cpu()) < 1e-5
    assert s_graphed.decode_graphs and not s_eager.decode_graphs
    assert graphed.stats["vram_cache_evictions"] > 0  # the graphs read slots the host refilled between replays
    assert list(graphed.generate(PROMPT[:8], 16, stop_token_ids=[])) == list(eager.generate(PROMPT[:8], 16, stop_token_ids=[]))


@pytest.mark.parametrize("arch", LAYOUTS)
def test_resident_experts_decode_without_host_lookups_and_match(built, arch):
    """With every expert in VRAM the GPU finds the slots itself (whole-layer graphs, eager attention layers
    without a sync); the answers are those of the host-driven path."""
    store = built.store(arch, 4)
    blob = Store(store).expert_blob_bytes
    host_driven = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=10 * blob / 1e9,
                                  cache_gb=0)
    resident = flashmoe.load(store, device="cuda", dtype=torch.float32)  # the default VRAM cache holds them all
    assert resident.fetcher.resident_slots() is None
    resident.warm_cache()
    table = resident.fetcher.resident_slots()
    assert table is not None and int(table[resident.config.moe_layers].min()) >= 0
    s_host, s_res = host_driven.new_state(), resident.new_state()
    host_driven.forward(PROMPT[:8], s_host)
    resident.forward(PROMPT[:8], s_res)
    for t in PROMPT[8:20]:
        assert rel_error(resident.forward([t], s_res).cpu(), host_driven.forward([t], s_host).cpu()) < 1e-5
    assert "step" in s_res.decode_graphs  # the whole step as one graph (the next test compares it with a graph a layer)
    stats = resident.stats
    assert stats["vram_cache_misses"] == 0 and stats["vram_cache_hits"] > 0 and stats["expert_reads"] == 0
    assert list(resident.generate(PROMPT[:8], 12, stop_token_ids=[])) == list(
        host_driven.generate(PROMPT[:8], 12, stop_token_ids=[]))
    # past 256 positions the KV caches double: the attention graphs are captured again for the new tensors
    long_prompt = (PROMPT * 40)[:250]
    assert list(resident.generate(long_prompt, 16, stop_token_ids=[])) == list(
        host_driven.generate(long_prompt, 16, stop_token_ids=[]))


@pytest.mark.parametrize("arch", LAYOUTS)
def test_whole_step_graph_matches_a_graph_per_layer_across_cache_growth(built, arch):
    """With every expert resident a decode step is one graph from token to logits; it answers as the graph-per-layer
    path does, across the KV caches' doubling at 256 positions (captured again), and
    the logits it returns stay the caller's after later steps."""
    store = built.store(arch, 4)
    whole, layered = (flashmoe.load(store, device="cuda", dtype=torch.float32) for _ in range(2))
    for m in (whole, layered):
        m.warm_cache()
    layered.whole_step_graphs = False
    s_whole, s_layered = whole.new_state(), layered.new_state()
    long_prompt = (PROMPT * 40)[:250]
    whole.forward(long_prompt, s_whole)
    layered.forward(long_prompt, s_layered)
    kept, token = [], PROMPT[0]
    for _ in range(12):
        got, want = whole.forward([token], s_whole), layered.forward([token], s_layered).cpu()
        assert rel_error(got.cpu(), want) < 1e-5
        kept.append((got, want))
        token = int(want.argmax())
    assert all(rel_error(got.cpu(), want) < 1e-5 for got, want in kept)
    assert "step" in s_whole.decode_graphs and "step" not in s_layered.decode_graphs
    assert any(isinstance(key, tuple) and key[0] == "resident" for key in s_layered.decode_graphs)
    assert whole.stats["vram_cache_hits"] > 0 and whole.stats["expert_reads"] == 0


@pytest.mark.parametrize("arch", LAYOUTS)
def test_zero_copy_decode_reads_ram_experts_in_the_kernels_and_matches(built, arch):
    """A small VRAM cache and a pinned RAM cache holding every expert: decode reads the RAM ones over PCIe from
    inside the kernels (whole-layer graphs, no copies) and answers as a model with everything in VRAM does."""
    store = built.store(arch, 4)
    blob = Store(store).expert_blob_bytes
    everything = flashmoe.load(store, device="cuda", dtype=torch.float32)
    everything.warm_cache()
    every_expert = everything.fetcher.every_expert
    small = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=10 * blob / 1e9,
                          cache_gb=(every_expert + 1) * blob / 1e9)  # the GPU reads them all (cpu_share=0)
    assert small.fetcher.resident_slots() is None  # nothing read yet
    small.warm_cache()
    table = small.fetcher.resident_slots()
    moe = table[small.config.moe_layers]
    assert int((moe >= 0).sum()) == 10 and int((moe < 0).sum()) == every_expert - 10
    s_all, s_small = everything.new_state(), small.new_state()
    everything.forward(PROMPT[:8], s_all)
    small.forward(PROMPT[:8], s_small)
    small.reset_stats()
    for t in PROMPT[8:20]:
        assert rel_error(small.forward([t], s_small).cpu(), everything.forward([t], s_all).cpu()) < 1e-5
    assert "step" in s_small.decode_graphs
    stats = small.stats
    assert stats["expert_bytes_copied"] == 0 and stats["expert_reads"] == 0
    assert stats["expert_bytes_zero_copy"] == stats["vram_cache_misses"] * blob > 0
    assert stats["vram_cache_hits"] + stats["vram_cache_misses"] == 12 * len(small.config.moe_layers) * small.experts_per_token
    assert list(small.generate(PROMPT[:8], 12, stop_token_ids=[])) == list(
        everything.generate(PROMPT[:8], 12, stop_token_ids=[]))
    copying = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=10 * blob / 1e9,
                            cache_gb=(every_expert + 1) * blob / 1e9, zero_copy=False)
    copying.warm_cache()
    assert copying.fetcher.resident_slots() is None


@pytest.mark.parametrize("arch", LAYOUTS)
def test_cpu_share_computes_ram_experts_on_the_cpu_and_matches(built, arch):
    """With experts in pinned RAM, the CPU computes a share of them while the GPU reads the rest (cpu_share.py):
    the answers are those of a model with everything in VRAM, at any share, fixed or following the times."""
    store = built.store(arch, 4)
    blob = Store(store).expert_blob_bytes
    everything = flashmoe.load(store, device="cuda", dtype=torch.float32)
    everything.warm_cache()
    every_expert = everything.fetcher.every_expert
    expected = list(everything.generate(PROMPT[:8], 12, stop_token_ids=[]))
    for share in (1.0, 0.5, "auto"):
        shared = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=10 * blob / 1e9,
                               cache_gb=(every_expert + 1) * blob / 1e9, cpu_share=share)
        shared.warm_cache()
        s_all, s_shared = everything.new_state(), shared.new_state()
        for tokens in (PROMPT[:8], PROMPT[8:9]):  # the prompt, then the first step (eager: it compiles the kernels)
            everything.forward(tokens, s_all)
            shared.forward(tokens, s_shared)
        shared.reset_stats()
        for t in PROMPT[9:20]:
            assert rel_error(shared.forward([t], s_shared).cpu(), everything.forward([t], s_all).cpu()) < 1e-5
        assert any(isinstance(key, tuple) and key[0] == "shared" for key in s_shared.decode_graphs)
        stats = shared.stats
        assert stats["experts_on_cpu"] > 0 and stats["expert_reads"] == 0 and stats["expert_bytes_copied"] == 0
        moe_steps = 11 * len(shared.config.moe_layers) * shared.experts_per_token
        assert stats["vram_cache_hits"] + stats["vram_cache_misses"] == moe_steps
        if share == "auto":  # the faster way each token, sharing or not, each tried: both kinds of graphs exist
            assert 1 <= stats["tokens_shared_with_cpu"] < 11
            assert any(isinstance(key, tuple) and key[0] == "resident" for key in s_shared.decode_graphs)
        else:  # every token shares: every RAM-held expert is computed by one side or the other
            assert stats["tokens_shared_with_cpu"] == 11
            assert stats["experts_on_cpu"] + stats["experts_over_pcie"] == stats["vram_cache_misses"]
            assert stats["expert_bytes_zero_copy"] == stats["experts_over_pcie"] * blob
        if share == 1.0:
            assert stats["experts_over_pcie"] == 0
        assert list(shared.generate(PROMPT[:8], 12, stop_token_ids=[])) == expected


def stepped(model, seqs) -> list[list[int]]:
    """Each sequence's new tokens, the sequences stepped together through model.step until all are done."""
    made = [[] for _ in seqs]
    while not all(s.done for s in seqs):
        for s, out, row in zip(seqs, made, model.step(seqs)):
            out += [t for t in [s.advance(row)] if t is not None]
    return made


def test_with_a_cpu_share_batches_step_in_their_graph_and_a_lone_sequence_shares(built):
    """cpu_share and batches: two sequences decode through the batch graph (the GPU reading every RAM-held expert
    over PCIe), a lone one through its own graphs with the CPU's share, as the server steps them (no graph per
    sequence); all equal to a model with every expert in VRAM."""
    store = built.store("qwen3_5_moe", 4)
    blob = Store(store).expert_blob_bytes
    everything = flashmoe.load(store, device="cuda", dtype=torch.float32)
    everything.warm_cache()
    model = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=10 * blob / 1e9,
                          cache_gb=(everything.fetcher.every_expert + 1) * blob / 1e9, cpu_share=1.0)
    model.warm_cache()
    model.graph_per_sequence = False  # as the server sets it
    assert model.batches_well
    prompts = [PROMPT[:8], PROMPT[3:9]]
    want = [list(everything.generate(p, 6, stop_token_ids=[])) for p in prompts]
    assert stepped(model, [model.sequence(p, 6, stop_token_ids=[]) for p in prompts]) == want
    graphs = model.stages[0].graphs
    assert graphs.batch_captures >= 1 and 2 in graphs.bucket_graphs
    model.reset_stats()
    alone = stepped(model, [model.sequence(PROMPT[:8], 6, stop_token_ids=[])])[0]  # as the server steps it
    assert alone == want[0] and model.stats["tokens_shared_with_cpu"] > 0 and 1 not in graphs.bucket_graphs


@pytest.mark.parametrize("arch", LAYOUTS)
def test_batched_steps_on_the_gpu_match_alone_and_graphs_resume_after_them(built, arch):
    """Sequences stepped together (eager, grouped kernels) give the logits each gets alone (graphs, decode kernels),
    and a sequence's graphs still match after batched steps moved its caches on (issue 15)."""
    model = flashmoe.load(built.store(arch, 4), device="cuda", dtype=torch.float32)
    prompts = [PROMPT[:8], PROMPT[3:7], PROMPT[:13]]
    alone = []  # per prompt: its greedy tokens and each step's logits, one sequence at a time
    for p in prompts:
        state, rows, tokens = model.new_state(), [], []
        logits = model.forward(p, state, all_logits=False)
        for _ in range(8):
            tokens.append(int(logits[-1].argmax()))
            logits = model.forward(tokens[-1:], state, all_logits=False)
            rows.append(logits.cpu())
        alone.append((tokens, rows))
    states = [model.new_state() for _ in prompts]
    for p, s in zip(prompts, states):
        model.forward(p, s, all_logits=False)
    for step in range(8):
        if step < 5:  # together
            got = model.forward_batch([([tokens[step]], s) for (tokens, _), s in zip(alone, states)])
        else:  # alone again, through its graphs
            got = [model.forward([tokens[step]], s, all_logits=False) for (tokens, _), s in zip(alone, states)]
        for row, (_, rows) in zip(got, alone):
            assert rel_error(row.cpu(), rows[step]) < 1e-4
    assert all(s.decode_graphs for s in states)


@pytest.mark.parametrize("arch", LAYOUTS)
def test_a_batch_of_decode_steps_is_one_graph_and_matches_each_alone(built, arch):
    """With every expert resident, sequences decoding together step as one CUDA graph and get the logits each gets
    alone, through a sequence leaving, one joining and a KV cache doubling at 256 positions; a prompt beside them
    runs alone (issue 15). The graph reads their caches through a table, so these changes capture nothing new
    (DeepSeek-V3's latent caches: a graph per set)."""
    model = flashmoe.load(built.store(arch, 4), device="cuda", dtype=torch.float32)
    model.warm_cache()
    assert model.batches_well
    prompts = [PROMPT[:8], PROMPT[3:7], (PROMPT * 40)[:250], PROMPT[:5]]
    starts, lengths = [0, 0, 0, 4], [12, 6, 12, 7]  # the second leaves after 6 tokens, the fourth joins at step 4
    alone = []  # per sequence: its logits after the prompt and after each of its tokens, and those greedy tokens
    for p, n in zip(prompts, lengths):
        state = model.new_state()
        rows = [model.forward(p, state, all_logits=False).cpu()]
        tokens = []
        for _ in range(n):
            tokens.append(int(rows[-1].argmax()))
            rows.append(model.forward(tokens[-1:], state, all_logits=False).cpu())
        alone.append((rows, tokens))
    states = [model.new_state() for _ in prompts]
    graphs = model.stages[0].graphs
    for step in range(13):
        inputs, who = [], []
        for i, (start, n) in enumerate(zip(starts, lengths)):
            if start <= step <= start + n:
                inputs.append((prompts[i] if step == start else alone[i][1][step - start - 1:step - start], states[i]))
                who.append(i)
        got = model.forward_batch(inputs)
        for i, row in zip(who, got):
            assert rel_error(row.cpu(), alone[i][0][step - starts[i]]) < 1e-4, (arch, step, i)
    if arch == "deepseek_v3":  # latent caches: a graph per set (the first, with the fourth, without the second)
        assert graphs.batch_captures >= 3 and graphs.batch_graph is not None
        for s in states:
            model.forget(s)
        assert graphs.batch_graph is None
    else:  # one graph for batches of 3-4, whoever they are and however long their caches
        assert graphs.batch_captures == 1 and list(graphs.bucket_graphs) == [4]


def test_with_no_ram_budget_a_model_vram_cannot_hold_is_resident_through_pinned_ram(built):
    """The default RAM tier on a GPU (memory.default_pinned_cache_bytes): with a VRAM cache of 10 experts, every
    expert lands in pinned RAM too, so once warm every one is resident and decode reads none from disk again; with a
    VRAM cache that holds them all, no RAM tier is pinned."""
    store = built.store("qwen3_5_moe", 4)
    blob = Store(store).expert_blob_bytes
    model = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=10 * blob / 1e9)
    assert model.fetcher.ram.cached_slots >= model.fetcher.every_expert
    model.warm_cache()
    assert model.fetcher.resident_slots() is not None and model.caches_hold_every_expert
    list(model.generate(PROMPT[:8], 6, stop_token_ids=[]))
    assert model.stats["expert_reads"] == 0 and model.stats["expert_bytes_zero_copy"] > 0
    assert flashmoe.load(store, device="cuda", dtype=torch.float32).fetcher.ram.cached_slots == 0


def test_a_default_ram_tier_that_cannot_be_pinned_gives_way_to_the_page_cache(built, monkeypatch, capsys):
    """Pinning can fail (a container's limits): a RAM tier nobody asked for is then left out with one line; one that
    was asked for (cache_gb) still fails the load."""
    import flashmoe.experts as experts
    from flashmoe.expert_cache import PinningFailed

    real = experts.host_slab

    def failing(n_slots, slot_bytes, pinned):
        if pinned and n_slots > 64:  # the cache, not a batch of staging slots
            raise PinningFailed(f"cannot pin {n_slots * slot_bytes / 1e9:.2f} GB of RAM for the expert cache "
                                "(cudaHostRegister: CUDA error 2); pass a smaller cache_gb (--cache-gb)")
        return real(n_slots, slot_bytes, pinned)

    monkeypatch.setattr(experts, "host_slab", failing)
    store = built.store("qwen3_5_moe", 4)
    blob = Store(store).expert_blob_bytes
    model = flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=10 * blob / 1e9)
    assert model.fetcher.ram.cached_slots == 0 and "going on without a RAM expert cache" in capsys.readouterr().err
    assert len(list(model.generate(PROMPT[:8], 4, stop_token_ids=[]))) == 4
    with pytest.raises(FlashMoeError, match="cannot pin .* pass a smaller cache_gb"):
        flashmoe.load(store, device="cuda", dtype=torch.float32, vram_cache_gb=10 * blob / 1e9, cache_gb=1.0)


def test_warm_batches_captures_every_batch_size_a_server_will_use(built):
    """`serve` warms the batch graphs up to --max-concurrent: one per power-of-two batch size, so a batch of 3 later
    captures nothing, and its logits are each sequence's own; where sequences have no graph of their own (the
    server's way), a lone one steps through a bucket of one."""
    model = flashmoe.load(built.store("qwen3_5_moe", 4), device="cuda", dtype=torch.float32)
    model.warm_cache()
    graphs = model.stages[0].graphs
    assert model.warm_batches(5) == [2, 4, 8] and sorted(graphs.bucket_graphs) == [2, 4, 8]
    captured, prompts = graphs.batch_captures, [PROMPT[:6], PROMPT[2:9], PROMPT[1:4]]
    seqs = [model.sequence(p, 4, stop_token_ids=[]) for p in prompts]
    made = stepped(model, seqs)
    assert graphs.batch_captures == captured
    for s in seqs:
        s.close()
    assert made == [list(model.generate(p, 4, stop_token_ids=[])) for p in prompts]
    # as the server runs it: a lone sequence steps through a bucket of one, warmed too, and captures nothing
    model.graph_per_sequence = False
    assert model.warm_batches(5) == [1, 2, 4, 8] and sorted(graphs.bucket_graphs) == [1, 2, 4, 8]
    captured, state = graphs.batch_captures, model.new_state()
    alone = model.logits(PROMPT[:6])
    model.forward_batch([(PROMPT[:5], state)])
    got = model.forward_batch([(PROMPT[5:6], state)])[0]
    assert rel_error(got.cpu(), alone[-1:].cpu()) < 1e-4 and "step" not in state.decode_graphs
    assert graphs.batch_captures == captured


def test_warm_prompts_leaves_nothing_to_tune_for_a_prompt_and_its_continuation(built):
    """`serve` and `chat` run a throwaway prompt and its continuation at start (Model.warm_prompts): afterwards a
    request's prompt in two chunks tunes no kernel (fla-core tunes DeltaNet's prompt kernels with and without a
    state to start from: 28 s at the 397B geometry the first time, every stream waiting), the warm-up keeps nothing in
    the prefix cache, and the request's tokens are those of a model that never warmed."""
    import gc

    from triton.runtime.autotuner import Autotuner

    from flashmoe.kernels import gated_delta

    def tunings() -> int:
        return sum(len(o.cache) for o in gc.get_objects() if isinstance(o, Autotuner))

    store, prompt = built.store("qwen3_5_moe", 4), (PROMPT * 3)[:40]
    cold = list(flashmoe.load(store, device="cuda", dtype=torch.float32).generate(prompt, 4, stop_token_ids=[]))
    model = flashmoe.load(store, device="cuda", dtype=torch.float32, prefix_cache_gb=0.1)
    model.warm_cache()
    model.warm_prompts(chunk=16)
    assert len(model.prefix_cache) == 0 and model.stats["tokens"] == 0
    tuned = tunings()
    assert tuned > 0 or not gated_delta.fla_available()
    seq = model.sequence(prompt, 4, stop_token_ids=[], prefill_chunk=16)
    made = stepped(model, [seq])[0]
    seq.close()
    assert made == cold and tunings() == tuned


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "gpt_oss"])
def test_a_short_prompt_through_the_decode_kernels_is_the_grouped_kernels_prompt(built, arch, monkeypatch):
    """With every expert resident, a prompt of up to DECODE_KERNEL_PAIRS (token, expert) pairs runs a pair at a time
    through the decode kernels (no host sync to group them): the same logits as grouped by expert."""
    import flashmoe.routed as routed

    model = flashmoe.load(built.store(arch, 4), device="cuda", dtype=torch.float32)
    model.warm_cache()
    prompt = PROMPT[:10]
    assert len(prompt) * model.experts_per_token <= routed.DECODE_KERNEL_PAIRS
    paired = model.logits(prompt)
    monkeypatch.setattr(routed, "DECODE_KERNEL_PAIRS", 0)
    grouped = model.logits(prompt)
    assert rel_error(paired.cpu(), grouped.cpu()) < 1e-4


def test_sampling_on_the_gpu_cuts_as_the_reference_and_repeats_with_a_seed(built):
    """A row is sampled where it is (no copy of the vocabulary to the host): the cut equals the full sort's, a seeded
    generation repeats on the GPU, and greedy sampling there picks the argmax."""
    from flashmoe.sampling import distribution, reference_distribution, sample

    gen = torch.Generator().manual_seed(0)
    for temperature, top_p, top_k in [(0.7, 0.9, 0), (1.0, 0.5, 0), (1.0, 1.0, 40), (0.7, 0.95, 20)]:
        for scale in (0.3, 3.0):
            logits = torch.randn(5000, generator=gen) * scale
            ids, weights = distribution(logits.cuda(), temperature, top_p, top_k)
            assert ids.is_cuda
            got = torch.zeros(5000).index_put_((ids.cpu(),), weights.cpu())
            torch.testing.assert_close(got / got.sum(), reference_distribution(logits, temperature, top_p, top_k),
                                       atol=1e-6, rtol=1e-4)
    row = torch.randn(5000, device="cuda")
    assert sample(row) == int(row.argmax())
    draws = {sample(row, 1.0, 0.9, 50, torch.Generator("cuda").manual_seed(5)) for _ in range(3)}
    assert len(draws) == 1
    model = flashmoe.load(built.store("qwen3_5_moe", 4), device="cuda", dtype=torch.float32)
    runs = [list(model.generate(PROMPT[:6], 10, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[]))
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0] != list(model.generate(PROMPT[:6], 10, stop_token_ids=[]))


def test_traced_sequences_step_in_graphs_as_each_alone_under_its_trace(built):
    """Routing by a set of traces (replay.py): a lone sequence decodes through its whole-step graph, a batch through
    the batch graph (its rows from the batch buffer), each getting the logits it gets alone under its own trace."""
    from flashmoe.traces import TraceShape, calibrated_sequences

    store = built.store("qwen3_5_moe", 4)
    cfg = flashmoe.load(store).config
    traces = calibrated_sequences(TraceShape(64, len(cfg.moe_layers), cfg.num_experts, 3), 3, seed=4)
    prompts = [PROMPT[:8], PROMPT[3:7], PROMPT[:5]]
    alone = []
    for trace, prompt in zip(traces, prompts):
        model = flashmoe.load(store, device="cuda", dtype=torch.float32)
        model.warm_cache()
        model.route_by_trace(trace)
        state = model.new_state()
        rows, tokens = [model.forward(prompt, state, all_logits=False).cpu()], []
        for _ in range(6):
            tokens.append(int(rows[-1].argmax()))
            rows.append(model.forward(tokens[-1:], state, all_logits=False).cpu())
        assert "step" in state.decode_graphs  # its whole-step graph, the trace's rows read from the step buffer
        alone.append((rows, tokens))
    model = flashmoe.load(store, device="cuda", dtype=torch.float32)
    model.warm_cache()
    model.route_by_trace(traces)
    states = [model.new_state() for _ in prompts]
    for (rows, _), prompt, state in zip(alone, prompts, states):
        assert rel_error(model.forward(prompt, state, all_logits=False).cpu(), rows[0]) < 1e-4
    for step in range(6):
        got = model.forward_batch([(tokens[step : step + 1], s) for (_, tokens), s in zip(alone, states)])
        for row, (rows, _) in zip(got, alone):
            assert rel_error(row.cpu(), rows[step + 1]) < 1e-4, step
    graphs = model.stages[0].graphs
    assert graphs.batch_captures == 1 and list(graphs.bucket_graphs) == [4]
