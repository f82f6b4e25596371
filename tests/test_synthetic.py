"""Random stores written directly have the store format: they load, verify, and run."""

from __future__ import annotations

import pytest

import flashmoe
from flashmoe.errors import FlashMoeError
from flashmoe.store import Store
from flashmoe.synthetic import DEEPSEEK_V3, GLM4_5_AIR, MIXTRAL_8X7B, QWEN3_5_397B, QWEN3_235B, QWEN3_NEXT_80B, write_random_store


def small(geometry: dict, **changes) -> dict:
    return {**geometry, "vocab_size": 300, "hidden_size": 128, "num_experts": 12, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
            "linear_value_head_dim": 32, "num_hidden_layers": 4, "intermediate_size": 96, "num_local_experts": 12,
            "n_routed_experts": 12, "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
            "v_head_dim": 16, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, **changes}


@pytest.mark.parametrize("geometry", [QWEN3_5_397B, QWEN3_NEXT_80B, QWEN3_235B, MIXTRAL_8X7B, GLM4_5_AIR, DEEPSEEK_V3])
def test_random_store_loads_verifies_and_generates(tmp_path, geometry):
    store = write_random_store(tmp_path / "store", small(geometry, mlp_only_layers=[1]), bits=4, group_size=32)
    assert Store(store).verify() == []
    model = flashmoe.load(store, cache_gb=0)
    tokens = list(model.generate([1, 2, 3], 5, stop_token_ids=[]))
    assert len(tokens) == 5 and model.stats["expert_reads"] > 0
    # Qwen3-Next's and Qwen3-MoE's mlp_only_layers are dense, GLM-4.5's first layer; Qwen3.5 and Mixtral have none
    expect_moe = 3 if geometry in (QWEN3_NEXT_80B, QWEN3_235B, GLM4_5_AIR, DEEPSEEK_V3) else 4
    assert len(model.config.moe_layers) == expect_moe
    logits = model.logits([5, 6, 7])
    assert logits.isfinite().all() and logits.std() > 0


def test_random_store_refuses_a_non_empty_destination(tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FlashMoeError, match="not empty"):
        write_random_store(tmp_path, small(QWEN3_5_397B))
