"""DeepSeek-V3 / R1 (DeepseekV3ForCausalLM; Kimi-K2's checkpoints use it too): multi-head latent attention (a
compressed query, one compressed KV latent per token, a shared RoPE key part; YaRN RoPE), the first layers dense,
the rest a MoE under GLM-4.5's sigmoid router (group-limited, scaled) with always-on shared experts.

The math follows transformers' modeling_deepseek_v3.py; the MoE is glm4_moe.Model's, the attention layers/mla.py's
(the cache keeps the latent, and kv_b_proj is absorbed into queries and outputs). RoPE frequencies and YaRN's
scales come from transformers' own RoPE code for this config. The multi-token-prediction layer (stored as layer
num_hidden_layers) is not part of the text model and is left out.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, config_value, rope_settings
from ..errors import FlashMoeError
from ..kernels.affine import AffineMatrix
from ..layers.mla import MLA, LatentCache, MLASpec
from ..layers.state import SequenceState
from . import glm4_moe, qwen3_moe
from . import ResidentItem
from .qwen3_moe import EXPERT_PROJECTIONS, ZERO_CENTRED_NORMS, expert_prefix

ARCHITECTURES = {"DeepseekV3ForCausalLM": "deepseek_v3"}
FLOAT32_RESIDENTS = glm4_moe.FLOAT32_RESIDENTS
FLOAT_MATRICES = ("kv_b_proj.weight",)  # absorbed into W_uk / W_uv at load: float whatever the resident format
ROPE_TYPES = ("default", "yarn")


def config_from_hf(arch: str, raw: dict) -> ModelConfig:
    def get(key: str, kind: type, default=KeyError):
        return config_value(raw, key, kind, default)

    rope, rope_type = rope_settings(raw)
    if rope_type not in ROPE_TYPES:
        raise FlashMoeError(f"{arch}: rope type {rope_type!r} is not supported (only {', '.join(ROPE_TYPES)})")
    if get("topk_method", str, "noaux_tc") != "noaux_tc":
        raise FlashMoeError(f"{arch}: topk_method {raw.get('topk_method')!r} is not supported (only noaux_tc)")
    nope, rope_dim = get("qk_nope_head_dim", int), get("qk_rope_head_dim", int)
    experts, moe_inter = get("n_routed_experts", int), get("moe_intermediate_size", int)
    # qwen3_moe's reader with the rope type and biases set aside (read here), and MLA's head size
    fields = qwen3_moe.config_fields(arch, ARCHITECTURES[arch], {
        **raw, "rope_parameters": {"rope_type": "default", "rope_theta": rope.get("rope_theta", get("rope_theta", float, 10000.0))},
        "attention_bias": False, "num_experts": experts, "head_dim": nope + rope_dim})
    layers = fields["num_hidden_layers"]
    if get("attention_bias", bool, False):
        raise FlashMoeError(f"{arch}: attention_bias is true; flashmoe runs DeepSeek-V3's attention without biases")
    return ModelConfig(
        **{**fields, "num_key_value_heads": fields["num_attention_heads"]}, moe_intermediate_size=moe_inter,
        norm_topk_prob=get("norm_topk_prob", bool, True), partial_rotary_factor=rope_dim / (nope + rope_dim),
        shared_expert_intermediate_size=moe_inter * get("n_shared_experts", int, 1),
        dense_layers=list(range(min(get("first_k_dense_replace", int, 0), layers))),
        intermediate_size=get("intermediate_size", int), n_group=get("n_group", int, 1),
        topk_group=get("topk_group", int, 1), routed_scaling_factor=get("routed_scaling_factor", float, 1.0),
        q_lora_rank=get("q_lora_rank", int, None) or 0, kv_lora_rank=get("kv_lora_rank", int),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=get("v_head_dim", int),
        rope_interleave=get("rope_interleave", bool, True),
        rope_scaling={**rope, "rope_type": rope_type} if rope_type != "default" else {},
    )


def resident_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """glm4_moe's (the MoE and dense layers), with MLA's projections in place of q/k/v."""
    shapes = glm4_moe.resident_shapes(cfg)
    h, nh, r, dr = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    qk, v = cfg.qk_nope_head_dim + dr, cfg.v_head_dim
    for i in range(cfg.num_hidden_layers):
        a = f"model.layers.{i}.self_attn."
        for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
            shapes.pop(a + name)
        if cfg.q_lora_rank:
            shapes.update({a + "q_a_proj.weight": (cfg.q_lora_rank, h), a + "q_a_layernorm.weight": (cfg.q_lora_rank,),
                           a + "q_b_proj.weight": (nh * qk, cfg.q_lora_rank)})
        else:
            shapes[a + "q_proj.weight"] = (nh * qk, h)
        shapes.update({a + "kv_a_proj_with_mqa.weight": (r + dr, h), a + "kv_a_layernorm.weight": (r,),
                       a + "kv_b_proj.weight": (nh * (qk - dr + v), r), a + "o_proj.weight": (h, nh * v)})
    return shapes


def resident_sources(cfg: ModelConfig) -> list[ResidentItem]:
    """mlx-lm's sanitize() and llama.cpp's converter split kv_b_proj per head into [H, rank, nope] (transposed:
    embed_q, attn_k_b) and [H, v, rank] (unembed_out, attn_v_b); they are put back together where a checkpoint has
    them instead (in float: the transpose moves columns). Every other resident tensor is stored as it is."""
    h, r, dn, dv = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim

    def merge(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        embed_q, unembed_out = ts
        return [torch.cat([embed_q.transpose(1, 2), unembed_out], dim=1).reshape(h * (dn + dv), r).contiguous()]

    items = []
    for i in range(cfg.num_hidden_layers):
        a = f"model.layers.{i}.self_attn."
        items.append(ResidentItem({a + "embed_q.weight": (h, r, dn), a + "unembed_out.weight": (h, dv, r)},
                                  [a + "kv_b_proj.weight"], merge, rows_only=False))
    return items


# llama.cpp's names: GLM-4.5's MoE ones (its post-attention norm is ffn_norm here), MLA's projections
GGUF_NAMES = glm4_moe.GGUF_NAMES
GGUF_LAYER_NAMES = {**{k: v for k, v in glm4_moe.GGUF_LAYER_NAMES.items() if not k.startswith("attn_")},
                    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                    "attn_q.weight": "self_attn.q_proj.weight", "attn_q_a.weight": "self_attn.q_a_proj.weight",
                    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
                    "attn_q_b.weight": "self_attn.q_b_proj.weight",
                    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
                    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
                    "attn_k_b.weight": "self_attn.embed_q.weight", "attn_v_b.weight": "self_attn.unembed_out.weight",
                    "attn_output.weight": "self_attn.o_proj.weight"}
GGUF_LAYER_NAMES.pop("post_attention_norm.weight", None)
from_gguf, gguf_rows_only = glm4_moe.from_gguf, glm4_moe.gguf_rows_only


def config_from_gguf(metadata: dict, names: tuple[str, ...]) -> dict:
    """config.json of a DeepSeek-V3 GGUF (`deepseek2`: transformers 5 maps none), from the keys llama.cpp's converter
    writes (conversion/deepseek.py). It keeps the interleaved RoPE pairs, and stores YaRN's mscale_all_dim as
    yarn_log_multiplier = 0.1 x mscale_all_dim (mscale, which it does not keep, is taken equal: DeepSeek-V3's are)."""
    key = qwen3_moe.gguf_keys(metadata)
    fields = glm4_moe.config_from_gguf(metadata, names)  # the MoE and the model's sizes, the same keys
    rope_dim = key("rope.dimension_count")
    rope = {"rope_type": "default", "rope_theta": key("rope.freq_base", 10000.0)}
    if key("rope.scaling.type", "none") == "yarn":
        mscale = round(key("rope.scaling.yarn_log_multiplier", 0.0) / 0.1, 6)
        rope.update(rope_type="yarn", factor=key("rope.scaling.factor"),
                    original_max_position_embeddings=key("rope.scaling.original_context_length"),
                    beta_fast=key("rope.scaling.yarn_beta_fast", 32.0), beta_slow=key("rope.scaling.yarn_beta_slow", 1.0),
                    mscale=mscale, mscale_all_dim=mscale)
    for k in ("partial_rotary_factor", "use_qk_norm", "attention_bias"):
        fields.pop(k)
    return {**fields, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "num_key_value_heads": fields["num_attention_heads"], "q_lora_rank": key("attention.q_lora_rank", 0) or None,
            "kv_lora_rank": key("attention.kv_lora_rank"), "qk_rope_head_dim": rope_dim,
            "qk_nope_head_dim": key("attention.key_length_mla") - rope_dim,
            "v_head_dim": key("attention.value_length_mla"), "rope_interleave": True, "rope_parameters": rope}


def describe(cfg: ModelConfig) -> list[tuple[str, str]]:
    yarn = f", YaRN x{cfg.rope_scaling.get('factor', 1):g}" if cfg.rope_scaling else ""
    return [("layers", f"{cfg.num_hidden_layers} multi-head latent attention ({cfg.num_attention_heads} heads, a "
                       f"{cfg.kv_lora_rank}+{cfg.qk_rope_head_dim} latent per token{yarn}), the first "
                       f"{len(cfg.dense_layers)} dense"),
            *glm4_moe.describe(cfg)[1:]]


__all__ = ["ARCHITECTURES", "ZERO_CENTRED_NORMS", "EXPERT_PROJECTIONS", "FLOAT32_RESIDENTS", "config_from_hf",
           "resident_shapes", "resident_sources", "expert_prefix", "describe", "Model", "GGUF_NAMES",
           "GGUF_LAYER_NAMES", "from_gguf", "gguf_rows_only", "config_from_gguf"]


def rope_of(cfg: ModelConfig, device) -> tuple[torch.Tensor, float, float]:
    """(inv_freq over the rope dims, YaRN's cos/sin factor, the softmax scale), from transformers' own RoPE code."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, yarn_apply_mscale

    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **cfg.rope_scaling}
    config = DeepseekV3Config(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                              qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                              max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope)
    emb = DeepseekV3RotaryEmbedding(config)
    scale = yarn_apply_mscale(config.rope_parameters, (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5)
    return emb.inv_freq.float().to(device), float(emb.attention_scaling), float(scale)


class Model(glm4_moe.Model):
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__(cfg, weights)
        inv_freq, factor, scale = rope_of(cfg, self.device)
        spec = MLASpec(cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                       cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.rms_norm_eps, scale, cfg.rope_interleave, factor)
        self.attention = MLA(spec, inv_freq)  # attend / attend_at as layers.attention's: qwen3_moe's mix runs it
        for layer in range(cfg.num_hidden_layers):
            a = f"model.layers.{layer}.self_attn."
            if a + "kv_b_proj.weight" not in self.w:  # a layer another device holds
                continue
            kv_b = self.w.pop(a + "kv_b_proj.weight")
            kv_b = kv_b.dequantize() if isinstance(kv_b, AffineMatrix) else kv_b  # absorbed: used as a tensor
            self.w[a + "kv_b_proj.uk"], self.w[a + "kv_b_proj.uv"] = MLA.absorb(kv_b, spec)

    def new_state(self) -> SequenceState:
        return SequenceState(layers=[LatentCache() for _ in range(self.cfg.num_hidden_layers)])
