"""Mixtral (8x7B, 8x22B): Qwen3-MoE's decoder without query/key norms, its MoE block under other names
(block_sparse_moe, experts' w1 / w3 / w2 for gate / up / down), a router always renormalised over its top K, and
an optional sliding window (each query sees sliding_window positions, itself included).

The math follows transformers' modeling_mixtral.py; the layers are qwen3_moe.AttentionMoEModel's.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, config_value
from ..errors import FlashMoeError
from . import qwen3_moe
from .qwen3_moe import GGUF_NAMES, gguf_rows_only, resident_sources

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
    return [qwen3_moe.attention_layers(cfg, window), qwen3_moe.describe(cfg)[1]]


GGUF_LAYER_NAMES = qwen3_moe.gguf_layer_names(MLP)


def from_gguf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """llama.cpp writes Mixtral as a Llama, whose converter permutes each q and k head's rows for its interleaved
    RoPE (conversion/llama.py: permute); this puts them back. Rows only, so quantized rows move as they are."""
    heads = {"self_attn.q_proj.weight": cfg.num_attention_heads, "self_attn.k_proj.weight": cfg.num_key_value_heads}
    n = next((h for suffix, h in heads.items() if name.endswith(suffix)), None)
    if n is None:
        return t
    return t.reshape(n, t.shape[0] // n // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)  # its inverse


def config_from_gguf(metadata: dict, names: tuple[str, ...]) -> dict:
    """config.json of a Mixtral GGUF (`llama` with experts), from the keys llama.cpp's converter writes."""
    arch = metadata["general.architecture"]
    if not metadata.get(f"{arch}.expert_count"):
        raise FlashMoeError(f"this GGUF is a dense {arch} model; flashmoe runs Mixture-of-Experts models "
                            "(a llama GGUF with experts is read as Mixtral)")
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            **qwen3_moe.gguf_config_fields(metadata, names), "num_local_experts": metadata[f"{arch}.expert_count"],
            "intermediate_size": metadata[f"{arch}.feed_forward_length"]}


__all__ = ["ARCHITECTURES", "ZERO_CENTRED_NORMS", "EXPERT_PROJECTIONS", "config_from_hf", "resident_shapes", "resident_sources",
           "expert_prefix", "describe", "Model", "GGUF_NAMES", "GGUF_LAYER_NAMES", "from_gguf", "gguf_rows_only",
           "config_from_gguf"]


class Model(qwen3_moe.AttentionMoEModel):
    MLP = MLP
    QK_NORM = "none"
