"""The batch decode-attention kernel against the torch way it replaces (Attention._attend_slot, a sequence at a time):
caches of different capacities and lengths, GQA groups, sliding windows, sinks, a token at position 0. On a CPU
machine it runs in Triton's interpreter (conftest)."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_error
from flashmoe.kernels.decode_attention import decode_attention, triton
from flashmoe.layers.attention import Attention, AttentionSpec, KVCache

pytestmark = pytest.mark.skipif(triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("heads,kv_heads,head_dim,window,sinks", [(4, 2, 32, 0, False), (8, 1, 64, 5, False),
                                                                  (6, 3, 48, 0, True), (4, 4, 16, 9, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_a_sequence_at_a_time(heads, kv_heads, head_dim, window, sinks, dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's CPU interpreter converts float32 -> bf16 wrongly inside tl.dot; checked on the GPU")
    gen = torch.Generator().manual_seed(heads * head_dim + window)
    spec = AttentionSpec(heads, kv_heads, head_dim, 1e-6, sliding_window=window, sinks=sinks)
    attention = Attention(spec, torch.ones(1))
    w = {"sinks": (torch.randn(heads, generator=gen) * 2).to(DEVICE)}
    capacities, positions = [8, 200, 140], [0, 150, 133]  # a first token; keys across several blocks
    caches, alone = [], []
    for capacity in capacities:  # garbage after the positions: the kernel must not read it
        k, v = (torch.randn(kv_heads, capacity, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
        caches.append(KVCache(k, v))
        alone.append(KVCache(k.clone(), v.clone()))
    q = torch.randn(3, heads, head_dim, generator=gen).to(DEVICE, dtype)
    k_new, v_new = (torch.randn(3, kv_heads, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    pos = torch.tensor(positions, device=DEVICE)
    got = decode_attention(q, k_new, v_new, [torch.tensor(c.addresses(), device=DEVICE) for c in caches], pos, spec.softmax_scale, window,
                           w["sinks"] if sinks else None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, cache in enumerate(alone):
        want = attention._attend_slot(w, "", q[i], k_new[i], v_new[i], cache, pos[i : i + 1])
        assert rel_error(got[i].float(), want[0].float()) < tol, i
        assert torch.equal(caches[i].k, cache.k) and torch.equal(caches[i].v, cache.v)  # the new key and value in place


def test_a_cache_keeps_its_table_current_across_growth():
    """reserve() refreshes the table the kernel reads when the cache moves (a GPU's; on a CPU there is none)."""
    cache = KVCache()
    like = torch.zeros(2, 1, 8, device=DEVICE)
    cache.reserve(3, like)
    if DEVICE == "cpu":
        assert cache.table is None
        return
    assert cache.table.tolist() == [cache.k.data_ptr(), cache.v.data_ptr(), cache.capacity]
    cache.length = 256
    cache.reserve(300, like)
    assert cache.table.tolist() == [cache.k.data_ptr(), cache.v.data_ptr(), cache.capacity] and cache.capacity >= 300


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_gathered_and_written_back_by_address(dtype):
    """by_address: each sequence's own tensor into a stacked row and back, found through a table's column."""
    from flashmoe.kernels import by_address

    gen = torch.Generator().manual_seed(3)
    own = [torch.randn(5, 300, generator=gen).to(DEVICE, dtype) for _ in range(3)]
    table = torch.tensor([[0, t.data_ptr(), 7] for t in own], device=DEVICE)  # a column of a [B, 3] table
    rows = by_address.gather(table[:, 1], (5, 300), dtype)
    assert torch.equal(rows, torch.stack(own))
    new = torch.randn(3, 5, 300, generator=gen).to(DEVICE, dtype)
    by_address.scatter(new, table[:, 1])
    assert all(torch.equal(t, r) for t, r in zip(own, new))
