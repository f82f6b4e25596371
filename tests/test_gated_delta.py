"""The chunked gated delta rule equals the recurrent one, and both equal transformers' reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashmoe.kernels.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule


def inputs(t, hk=2, hv=4, dk=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, hk, dk, generator=g)
    k = torch.randn(1, t, hk, dk, generator=g)
    v = torch.randn(1, t, hv, dv, generator=g)
    decay = -F.softplus(torch.randn(1, t, hv, generator=g))
    beta = torch.rand(1, t, hv, generator=g)
    state = torch.randn(1, hv, dk, dv, generator=g) * 0.1
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("t", [1, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_equals_recurrent(t, with_state):
    q, k, v, g, beta, state = inputs(t)
    state = state if with_state else None
    out_c, s_c = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=16)
    out_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(out_c, out_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_c, s_r, rtol=1e-4, atol=1e-4)


def test_fast_decays_make_no_denormals_and_still_equal_the_recurrent_form():
    """Heads whose decay is fast (log decays of -2 to -8 a token: a 64-token chunk cumulates to e^-500) used to
    leave denormal floats in the chunk's decay matrix, which x86 multiplies through a slow microcode assist; decays
    below e^-30 are now exact zeros, and the result is that of the step-by-step form."""
    from flashmoe.kernels.gated_delta import _decay

    assert _decay(torch.tensor([-30.5, -29.5, 0.0])).tolist() == [0.0, pytest.approx(1.5e-13, rel=0.1), 1.0]
    q, k, v, _, beta, state = inputs(130, seed=3)
    g = -2 - 6 * torch.rand(1, 130, 4, generator=torch.Generator().manual_seed(4))
    seen = []
    real_solve = torch.linalg.solve_triangular

    def solve(a, b, **kw):
        seen.append(a)
        return real_solve(a, b, **kw)

    torch.linalg.solve_triangular = solve
    try:
        out_c, s_c = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=64)
    finally:
        torch.linalg.solve_triangular = real_solve
    assert seen and all(((a != 0) & (a.abs() < torch.finfo(torch.float32).tiny)).sum() == 0 for a in seen)
    out_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(out_c, out_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_c, s_r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [1, 70])
def test_matches_transformers(t, monkeypatch):
    from transformers.models.qwen3_next import modeling_qwen3_next
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    # where fla-core is installed transformers may take fla's Triton l2norm, which refuses CPU tensors
    torch_l2norm = lambda x, dim=-1, eps=1e-6: x * torch.rsqrt((x * x).sum(dim, keepdim=True) + eps)  # noqa: E731
    monkeypatch.setattr(modeling_qwen3_next, "l2norm", torch_l2norm, raising=False)

    # equal q/k and v head counts: transformers before 5.2x expanded grouped heads outside this function
    q, k, v, g, beta, state = inputs(t, hk=4, seed=1)
    expected, expected_state = torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state,
                                                            output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, s = chunk_gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, expected_state, rtol=1e-4, atol=1e-4)
