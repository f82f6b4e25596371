"""The fused small ops (kernels/fused.py) against their torch references, over awkward shapes.

On the GPU they run compiled; on a CPU machine they run in Triton's interpreter (TRITON_INTERPRET=1, set in
conftest), so CI checks their indexing too.
"""

from __future__ import annotations

import pytest
import torch

from conftest import LAYOUTS, rel_error
from flashmoe.kernels import fused

pytestmark = pytest.mark.skipif(fused.triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 4096), (3, 96), (5, 7)])
@pytest.mark.parametrize("kind", ["zero_centred", "plain_gated", "residual"])
def test_rms_norm(dtype, rows, d, kind):
    gen = torch.Generator().manual_seed(rows * d)
    x, w = randn(rows, d, dtype=dtype, gen=gen), randn(d, dtype=dtype, gen=gen) * 0.1
    kw = {}
    if kind == "plain_gated":
        kw = dict(zero_centred=False, gate=randn(rows, 2 * d, dtype=dtype, gen=gen)[:, ::2])  # strided rows
    if kind == "residual":
        kw = dict(residual=randn(rows, d, dtype=dtype, gen=gen))
    got = fused.rms_norm_triton(x, w, 1e-6, **kw)
    ref = fused.reference_rms_norm(x, w, 1e-6, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    if kind == "residual":
        assert rel_error(got[0], ref[0]) < tol  # equal but for rounding (the interpreter truncates to bf16)
        got, ref = got[1], ref[1]
    assert got.dtype == dtype and rel_error(got, ref) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,kernel", [(300, 4), (64, 2), (33, 3)])
def test_conv_step_output_and_state(dtype, channels, kernel):
    gen = torch.Generator().manual_seed(channels)
    w = randn(channels, 1, kernel, dtype=dtype, gen=gen)
    state, state_ref = randn(channels, kernel - 1, dtype=dtype, gen=gen), None
    state_ref = state.clone()
    for step in range(3):
        mixed = randn(channels, dtype=dtype, gen=gen)
        got = fused.conv_step_triton(mixed, state, w)
        ref = fused.reference_conv_step(mixed, state_ref, w)
        assert rel_error(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
        assert torch.equal(state, state_ref)


@pytest.mark.parametrize("kernel", [4, 3])
def test_conv_step_of_several_sequences_each_with_its_state(kernel):
    """A batch's decode tokens (strided rows of the input projection) through their own stacked conv windows: each
    row as it would go alone."""
    gen = torch.Generator().manual_seed(kernel)
    channels = 300
    w = randn(channels, 1, kernel, gen=gen)
    states = randn(3, channels, kernel - 1, gen=gen)
    alone = [s.clone() for s in states]
    proj = randn(3, channels + 7, gen=gen)
    got = fused.conv_step_triton(proj[:, :channels], states, w)
    for i in range(3):
        want = fused.reference_conv_step(proj[i, :channels], alone[i], w)
        assert rel_error(got[i], want) < 1e-5
        assert torch.equal(states[i], alone[i])
    ref_states = torch.stack([s.clone() for s in alone])
    mixed = randn(3, channels, gen=gen)
    torch.testing.assert_close(fused.reference_conv_step(mixed, ref_states, w), fused.conv_step_triton(mixed, states, w))
    assert torch.equal(states, ref_states)


@pytest.mark.parametrize("rows,heads", [(1, 64), (4, 5)])
def test_delta_gates(rows, heads):
    gen = torch.Generator().manual_seed(heads)
    proj = randn(rows, 3 * heads, dtype=torch.bfloat16, gen=gen) * 8  # past softplus's threshold, both ways
    a, b = proj[:, :heads], proj[:, heads : 2 * heads]
    a_log, dt_bias = torch.rand(heads, generator=gen).to(DEVICE) * 2.7, randn(heads, gen=gen)
    g, beta = fused.delta_gates_triton(a, b, a_log, dt_bias)
    g_ref, beta_ref = fused.reference_delta_gates(a, b, a_log, dt_bias)
    assert rel_error(g, g_ref) < 1e-5 and rel_error(beta, beta_ref) < 1e-2 and beta.dtype == b.dtype


@pytest.mark.parametrize("experts,top_k,default_k,normalize", [(512, 4, 10, True), (512, 10, 10, True),
                                                                (60, 3, 8, False), (60, 8, 8, False), (7, 2, 1, False)])
def test_route_picks_the_same_experts_sorted_with_their_weights_and_slots(experts, top_k, default_k, normalize):
    gen = torch.Generator().manual_seed(experts + top_k)
    # strided rows, as in a fused GEMV; float32, so no two logits tie (ties may break either way)
    logits = randn(3, experts + 5, gen=gen)[:, :experts]
    table = torch.randperm(experts, generator=gen).to(DEVICE, torch.int32)
    ids, weights, slots = fused.route_triton(logits, top_k, default_k, normalize, table)
    ids_ref, weights_ref, slots_ref = fused.reference_route(logits, top_k, default_k, normalize, table)
    assert torch.equal(ids, ids_ref) and torch.equal(slots, slots_ref)
    table[::3] = -1 - table[::3]  # a third of the experts in pinned RAM: the kernel counts both tiers
    counts, counts_ref = (torch.zeros(2, dtype=torch.int64, device=DEVICE) for _ in range(2))
    fused.route_triton(logits, top_k, default_k, normalize, table, counts)
    fused.reference_route(logits, top_k, default_k, normalize, table, counts_ref)
    assert torch.equal(counts, counts_ref) and int(counts.sum()) == 3 * top_k
    assert torch.all(ids[:, 1:] > ids[:, :-1])
    torch.testing.assert_close(weights, weights_ref, rtol=1e-5, atol=1e-6)
    if normalize:
        torch.testing.assert_close(weights.sum(-1).cpu(), torch.ones(3))


def test_route_breaks_ties_to_the_lowest_id_and_orders_negative_scores():
    """The top-k's packed keys (a float's bits in integer order, the id below them): among equal logits the lowest
    ids win; negative choosing scores (a sigmoid router's bias below zero) rank as the floats do."""
    logits = torch.zeros(1, 40, device=DEVICE)
    logits[0, [31, 9, 5, 22]] = 3.0  # four tied best
    logits[0, 17] = 2.0
    assert fused.route_triton(logits, 2, 2, True)[0].tolist() == [[5, 9]]
    assert fused.route_triton(logits, 5, 5, True)[0].tolist() == [[5, 9, 17, 22, 31]]
    gen = torch.Generator().manual_seed(3)
    logits = randn(4, 64, dtype=torch.float32, gen=gen)
    bias = torch.full((64,), -2.5, device=DEVICE)  # every choosing score below zero
    args = (logits, bias, 6, 1, 1, True, 1.0)
    assert torch.equal(fused.route_sigmoid_triton(*args)[0], fused.reference_route_sigmoid(*args)[0])


@pytest.mark.parametrize("experts,top_k,n_group,topk_group,normalize,scale", [
    (256, 8, 8, 4, True, 2.5),   # DeepSeek-V3's
    (160, 8, 1, 1, True, 2.5),   # GLM-4.5's
    (24, 3, 3, 2, False, 1.0),   # three groups (not a power of two), unnormalised
    (10, 1, 1, 1, True, 1.0),
])
def test_route_sigmoid(experts, top_k, n_group, topk_group, normalize, scale):
    gen = torch.Generator().manual_seed(experts)
    logits = randn(5, experts + 3, dtype=torch.float32, gen=gen)[:, 3:]  # strided rows
    bias = (torch.rand(experts, generator=gen) * 0.1).to(DEVICE)
    args = (logits, bias, top_k, n_group, topk_group, normalize, scale)
    ids, weights, _ = fused.route_sigmoid_triton(*args)
    ids_ref, weights_ref, _ = fused.reference_route_sigmoid(*args)
    assert torch.equal(ids, ids_ref) and torch.all(ids[:, 1:] > ids[:, :-1])
    torch.testing.assert_close(weights, weights_ref, rtol=1e-5, atol=1e-6)
    if normalize:
        torch.testing.assert_close(weights.sum(-1).cpu(), torch.full((5,), scale))
    if n_group > 1:  # every chosen expert lies in one of the topk_group eligible groups
        assert all(len({e // (experts // n_group) for e in row}) <= topk_group for row in ids.tolist())
    table = torch.arange(experts, dtype=torch.int32, device=DEVICE) * 2
    _, _, slots = fused.route_sigmoid_triton(*args, slot_table=table)
    assert torch.equal(slots, (ids * 2).int())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,heads,kv_heads,head_dim,rot", [(1, 4, 2, 32, 8), (3, 8, 1, 256, 64), (2, 2, 2, 24, 24)])
@pytest.mark.parametrize("gated,qk_norm", [(True, "zero_centred"), (False, "plain"), (False, "none")])
def test_qk_norm_rope(dtype, t, heads, kv_heads, head_dim, rot, gated, qk_norm):
    gen = torch.Generator().manual_seed(head_dim)
    q_width = (2 if gated else 1) * head_dim
    proj = randn(t, heads * q_width + 2 * kv_heads * head_dim, dtype=dtype, gen=gen)
    positions = torch.tensor([5, 900, 70000][:t], device=DEVICE)
    q_norm, k_norm = randn(head_dim, dtype=dtype, gen=gen) * 0.1, randn(head_dim, dtype=dtype, gen=gen) * 0.1
    if qk_norm == "plain":
        q_norm, k_norm = q_norm + 1, k_norm + 1
    inv_freq = (1.0 / (10_000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))).to(DEVICE)
    args = (proj, positions, q_norm, k_norm, inv_freq, heads, kv_heads, head_dim, 1e-6, gated, qk_norm)
    q, k = fused.qk_norm_rope_triton(*args)
    q_ref, k_ref = fused.reference_qk_norm_rope(*args)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert q.shape == (t, heads, head_dim) and k.shape == (t, kv_heads, head_dim)
    assert rel_error(q, q_ref) < tol and rel_error(k, k_ref) < tol
    # unnormed, RoPE only rotates: each key keeps the length it has where the layout puts it
    if qk_norm == "none":
        keys = proj[:, heads * q_width: heads * q_width + kv_heads * head_dim].view(t, kv_heads, head_dim)
        torch.testing.assert_close(k.float().norm(dim=-1), keys.float().norm(dim=-1), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("arch", LAYOUTS)
def test_model_through_the_fused_kernels_matches_transformers(built, arch, monkeypatch):
    """The model's wiring of the fused ops (strided slices of fused projections, the conv state, the router's
    order): every op that has a Triton version runs it (the interpreter, on a CPU), prompt and decode steps."""
    import flashmoe
    from conftest import load_reference
    from test_reference import PROMPT

    if DEVICE == "cpu":
        monkeypatch.setattr(fused, "use_triton", lambda x: True)
    model = flashmoe.load(built.store(arch, None), device=DEVICE, dtype=torch.float32)
    ref = load_reference(built.checkpoint(arch), arch)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
    state = model.new_state()
    prompt_logits = model.forward(PROMPT[:9], state)
    step_logits = [model.forward([token], state)[0] for token in PROMPT[9:13]]
    tol = 1e-4 if DEVICE == "cpu" else 1e-3  # fla's kernels sum in another order
    assert rel_error(prompt_logits.cpu(), expected[:9]) < tol
    assert rel_error(torch.stack(step_logits).cpu(), expected[9:13]) < tol
