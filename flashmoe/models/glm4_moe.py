"""GLM-4.5 / GLM-4.6 (Glm4MoeForCausalLM): GQA attention with q/k/v biases, partial RoPE (half of each head) and
optional per-head q/k norms; the first layers dense, the rest a MoE of SwiGLU experts under a sigmoid router (a
bias that only chooses, group-limited top-K, weights renormalised and scaled) plus an always-on shared expert.

The math follows transformers' modeling_glm4_moe.py; the layers are qwen3_moe.AttentionMoEModel's with this
router and shared expert. The multi-token-prediction layer (num_nextn_predict_layers, stored as one more layer)
is not part of the text model and is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig, config_value
from ..errors import FlashMoeError
from ..kernels import fused
from ..kernels.linear import linear
from . import qwen3_moe
from .qwen3_moe import (EXPERT_PROJECTIONS, GGUF_NAMES, ZERO_CENTRED_NORMS, expert_prefix, from_gguf, gguf_rows_only,
                        resident_sources)

ARCHITECTURES = {"Glm4MoeForCausalLM": "glm4_moe"}
FLOAT32_RESIDENTS = (".e_score_correction_bias",)  # transformers keeps it float32: it decides close calls


def config_from_hf(arch: str, raw: dict) -> ModelConfig:
    def get(key: str, kind: type, default=KeyError):
        return config_value(raw, key, kind, default)

    experts = get("n_routed_experts", int)
    # its biases are read below (qwen3_moe's reader refuses them)
    fields = qwen3_moe.config_fields(arch, ARCHITECTURES[arch], {**raw, "attention_bias": False, "num_experts": experts})
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    layers = fields["num_hidden_layers"]
    moe_inter = get("moe_intermediate_size", int)
    if get("topk_method", str, "noaux_tc") != "noaux_tc":
        raise FlashMoeError(f"{arch}: topk_method {raw.get('topk_method')!r} is not supported (only noaux_tc)")
    return ModelConfig(
        **fields, moe_intermediate_size=moe_inter,
        norm_topk_prob=get("norm_topk_prob", bool, True),
        partial_rotary_factor=config_value(rope, "partial_rotary_factor", float,
                                           get("partial_rotary_factor", float, 0.5)),
        shared_expert_intermediate_size=moe_inter * get("n_shared_experts", int, 1),
        dense_layers=list(range(min(get("first_k_dense_replace", int, 0), layers))),
        intermediate_size=get("intermediate_size", int), attention_bias=get("attention_bias", bool, False),
        qk_norm=get("use_qk_norm", bool, False), n_group=get("n_group", int, 1), topk_group=get("topk_group", int, 1),
        routed_scaling_factor=get("routed_scaling_factor", float, 1.0),
    )


def resident_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = qwen3_moe.resident_shapes(cfg, qk_norm=cfg.qk_norm)
    hd, si, h = cfg.head_dim, cfg.shared_expert_intermediate_size, cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (cfg.num_attention_heads * hd,),
                           p + "self_attn.k_proj.bias": (cfg.num_key_value_heads * hd,),
                           p + "self_attn.v_proj.bias": (cfg.num_key_value_heads * hd,)})
        if cfg.is_moe_layer(i):
            m = p + "mlp."
            shapes.update({m + "gate.e_score_correction_bias": (cfg.num_experts,),
                           m + "shared_experts.gate_proj.weight": (si, h), m + "shared_experts.up_proj.weight": (si, h),
                           m + "shared_experts.down_proj.weight": (h, si)})
    return shapes


def describe(cfg: ModelConfig) -> list[tuple[str, str]]:
    groups = f", {cfg.topk_group} of {cfg.n_group} expert groups" if cfg.n_group > 1 else ""
    return [qwen3_moe.attention_layers(cfg, f", the first {len(cfg.dense_layers)} dense"),
            ("experts", f"{cfg.num_experts} per layer, K={cfg.num_experts_per_tok} by a sigmoid router{groups} "
                        f"(weights x {cfg.routed_scaling_factor:g}), shared expert {cfg.shared_expert_intermediate_size}")]


# llama.cpp's names: qwen3_moe's, with its post-attention norm's own name, the biases and the shared expert
GGUF_LAYER_NAMES = {**{k: v for k, v in qwen3_moe.GGUF_LAYER_NAMES.items() if k != "ffn_norm.weight"},
                    "post_attention_norm.weight": "post_attention_layernorm.weight",
                    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
                    "attn_v.bias": "self_attn.v_proj.bias", "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
                    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
                    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
                    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight"}
SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


def config_from_gguf(metadata: dict, names: tuple[str, ...]) -> dict:
    """config.json of a GLM-4.5 GGUF (`glm4moe`: transformers 5 maps none), from the keys llama.cpp's converter writes
    (conversion/glm.py); it changes no tensor (NEOX RoPE), and its MTP layers, if any, are the last blocks."""
    arch, key = metadata["general.architecture"], qwen3_moe.gguf_keys(metadata)

    if key("expert_gating_func", SIGMOID_GATING) != SIGMOID_GATING:
        raise FlashMoeError(f"this {arch} GGUF's router is not a sigmoid one (expert_gating_func "
                            f"{key('expert_gating_func')}); flashmoe runs this family's sigmoid router only")
    fields = qwen3_moe.gguf_config_fields(metadata, names)
    fields["num_hidden_layers"] -= key("nextn_predict_layers", 0)
    return {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", **fields,
            "partial_rotary_factor": key("rope.dimension_count") / fields["head_dim"],
            "n_routed_experts": key("expert_count"), "moe_intermediate_size": key("expert_feed_forward_length"),
            "n_shared_experts": key("expert_shared_count", 1), "first_k_dense_replace": key("leading_dense_block_count", 0),
            "intermediate_size": key("feed_forward_length"), "n_group": key("expert_group_count", 1),
            "topk_group": key("expert_group_used_count", 1), "routed_scaling_factor": key("expert_weights_scale", 1.0),
            "norm_topk_prob": bool(key("expert_weights_norm", True)), "attention_bias": "blk.0.attn_q.bias" in names,
            "use_qk_norm": "blk.0.attn_q_norm.weight" in names}


__all__ = ["ARCHITECTURES", "ZERO_CENTRED_NORMS", "EXPERT_PROJECTIONS", "FLOAT32_RESIDENTS", "config_from_hf",
           "resident_shapes", "resident_sources", "expert_prefix", "describe", "Model", "GGUF_NAMES",
           "GGUF_LAYER_NAMES", "from_gguf", "gguf_rows_only", "config_from_gguf"]


class Model(qwen3_moe.AttentionMoEModel):
    def qk_norm(self, cfg: ModelConfig) -> str:
        return "plain" if cfg.qk_norm else "none"

    def fused_groups(self, p: str) -> list[tuple[str, tuple[str, ...]]]:
        # the router first: its logits are then the product's first E columns
        return super().fused_groups(p) + [(p + "mlp.moe_in.fused", (
            "mlp.gate.weight", "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"))]

    def moe_projections(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """[T, router logits | shared gate | shared up]: everything that reads the MoE input, in one product."""
        return linear(h, self.w[f"model.layers.{layer}.mlp.moe_in.fused"])

    def route(self, layer: int, projections: torch.Tensor, top_k: int, slot_table: torch.Tensor | None = None,
              counts: torch.Tensor | None = None):
        cfg = self.cfg
        return fused.route_sigmoid(projections[:, : cfg.num_experts],
                                   self.w[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"], top_k,
                                   cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor,
                                   slot_table, counts)

    def shared_expert(self, layer: int, projections: torch.Tensor) -> torch.Tensor:
        return self.shared_expert_parts(layer, projections)[0]

    def shared_expert_parts(self, layer: int, projections: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The shared expert's output, and no gate (it is always on)."""
        e, si = self.cfg.num_experts, self.cfg.shared_expert_intermediate_size
        gate, up = projections[:, e : e + si], projections[:, e + si : e + 2 * si]
        return linear(F.silu(gate) * up, self.w[f"model.layers.{layer}.mlp.shared_experts.down_proj.weight"]), None
