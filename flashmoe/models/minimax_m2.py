"""MiniMax-M2 (MiniMaxM2ForCausalLM): Mixtral's layout (block_sparse_moe, experts' w1 / w3 / w2) with one RMSNorm over
all of a token's queries and one over its keys (not per head), partial RoPE, and a sigmoid router whose choosing bias
(e_score_correction_bias, beside the gate) picks the top K; the kept scores are renormalised. No shared expert.

The math follows transformers' modeling_minimax_m2.py; the layers are qwen3_moe.AttentionMoEModel's.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, config_value
from ..errors import FlashMoeError
from ..kernels import fused
from . import glm4_moe, mixtral, qwen3_moe
from .mixtral import EXPERT_PROJECTIONS, MLP, ZERO_CENTRED_NORMS, expert_prefix
from .qwen3_moe import GGUF_NAMES, from_gguf, gguf_rows_only, resident_sources

ARCHITECTURES = {"MiniMaxM2ForCausalLM": "minimax_m2"}
FLOAT32_RESIDENTS = glm4_moe.FLOAT32_RESIDENTS


def config_from_hf(arch: str, raw: dict) -> ModelConfig:
    def get(key: str, kind: type, default=KeyError):
        return config_value(raw, key, kind, default)

    if get("scoring_func", str, "sigmoid") != "sigmoid" or not get("use_routing_bias", bool, True):
        raise FlashMoeError(f"{arch}: only the sigmoid router with a routing bias is supported")
    if get("qk_norm_type", str, "per_layer") != "per_layer" or not get("use_qk_norm", bool, True):
        raise FlashMoeError(f"{arch}: only the per-layer query/key norm is supported")
    if get("shared_intermediate_size", int, 0):
        raise FlashMoeError(f"{arch}: shared experts are not supported for this family")
    fields = qwen3_moe.config_fields(arch, ARCHITECTURES[arch], raw)
    rope = raw.get("rope_parameters") or {}
    head_dim = fields["head_dim"]
    rotary = config_value(rope, "partial_rotary_factor", float, None) or (
        get("rotary_dim", int, head_dim) / head_dim)
    return ModelConfig(**fields, moe_intermediate_size=get("intermediate_size", int), norm_topk_prob=True,
                       partial_rotary_factor=rotary, qk_norm=True)


def resident_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = qwen3_moe.resident_shapes(cfg, qk_norm=False, mlp=MLP)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_norm.weight": (cfg.num_attention_heads * cfg.head_dim,),
                       p + "self_attn.k_norm.weight": (cfg.num_key_value_heads * cfg.head_dim,),
                       p + MLP + "e_score_correction_bias": (cfg.num_experts,)})
    return shapes


def describe(cfg: ModelConfig) -> list[tuple[str, str]]:
    return [mixtral.describe(cfg)[0],
            ("experts", f"{cfg.num_experts} per layer, K={cfg.num_experts_per_tok} by a sigmoid router, "
                        "no shared expert")]


# llama.cpp's names: Mixtral's, and the router's choosing bias
GGUF_LAYER_NAMES = {**mixtral.GGUF_LAYER_NAMES, "exp_probs_b.bias": MLP + "e_score_correction_bias"}


def config_from_gguf(metadata: dict, names: tuple[str, ...]) -> dict:
    """config.json of a MiniMax-M2 GGUF (`minimax-m2`: transformers 5 maps none), from the keys llama.cpp's converter
    writes; it changes no tensor."""
    arch = metadata["general.architecture"]
    if metadata.get(f"{arch}.expert_gating_func", glm4_moe.SIGMOID_GATING) != glm4_moe.SIGMOID_GATING:
        raise FlashMoeError(f"this {arch} GGUF's router is not a sigmoid one; flashmoe runs MiniMax-M2's")
    return {"architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2",
            **qwen3_moe.gguf_config_fields(metadata, names), "num_local_experts": metadata[f"{arch}.expert_count"],
            "intermediate_size": metadata[f"{arch}.expert_feed_forward_length"],
            "rotary_dim": metadata[f"{arch}.rope.dimension_count"], "shared_intermediate_size": 0, "use_qk_norm": True,
            "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "use_routing_bias": True}


__all__ = ["ARCHITECTURES", "ZERO_CENTRED_NORMS", "EXPERT_PROJECTIONS", "FLOAT32_RESIDENTS", "config_from_hf",
           "resident_shapes", "resident_sources", "expert_prefix", "describe", "Model", "GGUF_NAMES",
           "GGUF_LAYER_NAMES", "from_gguf", "gguf_rows_only", "config_from_gguf"]


class Model(mixtral.Model):
    QK_NORM = "whole"

    def route(self, layer: int, projections: torch.Tensor, top_k: int, slot_table: torch.Tensor | None = None,
              counts: torch.Tensor | None = None):
        bias = self.w[f"model.layers.{layer}.{MLP}e_score_correction_bias"]
        return fused.route_sigmoid(projections, bias, top_k, 1, 1, True, 1.0, slot_table, counts)
