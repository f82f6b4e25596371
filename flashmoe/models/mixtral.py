"""Mixtral (8x7B, 8x22B): Qwen3-MoE's decoder without query/key norms, its MoE block under other names
(block_sparse_moe, experts' w1 / w3 / w2 for gate / up / down), a router always renormalised over its top K, and
an optional sliding window (each query sees sliding_window positions, itself included).

The math follows transformers' modeling_mixtral.py; the layers are qwen3_moe.AttentionMoEModel's.
"""

from __future__ import annotations

from ..config import ModelConfig, config_value
from . import qwen3_moe
from .qwen3_moe import resident_sources

ARCHITECTURES = {"MixtralForCausalLM": "mixtral"}
ZERO_CENTRED_NORMS = False  # RMSNorm weights store an offset from 1 (else the scale itself)
EXPERT_PROJECTIONS = ("w1", "w3", "w2")
MLP = "block_sparse_moe."


def config_from_hf(arch: str, raw: dict) -> ModelConfig:
    window = config_value(raw, "sliding_window", int, 0)
    return ModelConfig(**qwen3_moe.config_fields(arch, ARCHITECTURES[arch], raw),
                       moe_intermediate_size=config_value(raw, "intermediate_size", int), norm_topk_prob=True,
                       sliding_window=window if window < config_value(raw, "max_position_embeddings", int, 1 << 62) else 0)


def resident_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return qwen3_moe.resident_shapes(cfg, qk_norm=False, mlp=MLP)


def expert_prefix(layer: int) -> str:
    """The checkpoint's routed experts of a layer: PREFIX{e}.w1.weight (gate), .w3 (up), .w2 (down)."""
    return f"model.layers.{layer}.{MLP}experts."


def describe(cfg: ModelConfig) -> list[tuple[str, str]]:
    window = f", sliding window {cfg.sliding_window}" if cfg.sliding_window else ""
    return [("layers", f"{cfg.num_hidden_layers} full attention ({cfg.num_attention_heads} query / "
                       f"{cfg.num_key_value_heads} key-value heads of {cfg.head_dim}){window}"),
            ("experts", f"{cfg.num_experts} per layer, K={cfg.num_experts_per_tok}, no shared expert")]


__all__ = ["ARCHITECTURES", "ZERO_CENTRED_NORMS", "EXPERT_PROJECTIONS", "config_from_hf", "resident_shapes", "resident_sources",
           "expert_prefix", "describe", "Model"]


class Model(qwen3_moe.AttentionMoEModel):
    MLP = MLP
    QK_NORM = "none"
