"""GPT-OSS (gpt-oss-120b, gpt-oss-20b): GQA attention with q/k/v/o biases and a learned sink per head, layers
alternating between a sliding window and full attention, YaRN RoPE, and a MoE of experts with biases and a clamped
SwiGLU (gate <= 7, |up| <= 7, (up + 1) * gate * sigmoid(1.702 gate)) under a softmax over the top-K router logits
(a router with a bias). No shared expert, no dense layers.

The math follows transformers' modeling_gpt_oss.py. The checkpoint's experts are fused: float ones [E, in, out] with
gate and up columns alternating, MXFP4 ones (the release) [E, out, in] with alternating rows; the converter turns both
into flashmoe's blob (gate rows first) with the two biases beside the codes.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, config_value, rope_settings
from ..errors import FlashMoeError
from ..kernels.linear import linear
from ..layers.attention import Attention, AttentionSpec
from . import qwen3_moe
from .qwen3_moe import GGUF_NAMES, gguf_rows_only, resident_sources

ARCHITECTURES = {"GptOssForCausalLM": "gpt_oss"}
ZERO_CENTRED_NORMS = False
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # the checkpoints have fused experts only
FUSED_EXPERTS_TRANSPOSED = True  # float experts [E, in, out] (convert.ExpertSource)
GATE_UP_INTERLEAVED = True
EXPERT_BIASES = ("gate_up_proj_bias", "down_proj_bias")
FLOAT32_RESIDENTS = ("self_attn.sinks",)
MLP = "mlp."
LAYER_TYPES = ("sliding_attention", "full_attention")


def config_from_hf(arch: str, raw: dict) -> ModelConfig:
    def get(key: str, kind: type, default=KeyError):
        return config_value(raw, key, kind, default)

    rope, rope_type = rope_settings(raw)
    if rope_type not in ("default", "yarn"):
        raise FlashMoeError(f"{arch}: rope type {rope_type!r} is not supported (default or yarn)")
    theta = config_value(rope, "rope_theta", float, get("rope_theta", float, 150000.0))
    # qwen3_moe's parser refuses biases and YaRN for its own families; this one has both
    f = qwen3_moe.config_fields(arch, ARCHITECTURES[arch], {**raw, "attention_bias": False,
                                                            "rope_parameters": {"rope_type": "default", "rope_theta": theta}})
    layers = f["num_hidden_layers"]
    types = get("layer_types", list, None) or [LAYER_TYPES[i % 2] for i in range(layers)]
    if len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise FlashMoeError(f"config.json: layer_types {types!r} is not one of {LAYER_TYPES} per layer")
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta",)} if rope_type == "yarn" else {}
    return ModelConfig(
        **{**f, "layer_types": types}, moe_intermediate_size=get("intermediate_size", int), norm_topk_prob=True,
        sliding_window=get("sliding_window", int, 0), attention_bias=get("attention_bias", bool, True),
        rope_scaling=scaling, expert_bias=True, swiglu_limit=get("swiglu_limit", float, 7.0),
        swiglu_alpha=get("swiglu_alpha", float, 1.702), attention_sinks=True,
    )


def resident_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = qwen3_moe.resident_shapes(cfg, qk_norm=False)
    nh, nkv, hd, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.{MLP}"
        del shapes[m + "gate.weight"]
        shapes.update({a + "sinks": (nh,), m + "router.weight": (cfg.num_experts, h), m + "router.bias": (cfg.num_experts,)})
        if cfg.attention_bias:
            shapes.update({a + "q_proj.bias": (nh * hd,), a + "k_proj.bias": (nkv * hd,), a + "v_proj.bias": (nkv * hd,),
                           a + "o_proj.bias": (h,)})
    return shapes


def expert_prefix(layer: int) -> str:
    """The checkpoint's routed experts of a layer: PREFIXgate_up_proj, down_proj and their _bias (or _blocks/_scales)."""
    return f"model.layers.{layer}.{MLP}experts."


def describe(cfg: ModelConfig) -> list[tuple[str, str]]:
    window = sum(t == "sliding_attention" for t in cfg.layer_types)
    yarn = f", YaRN x{cfg.rope_scaling['factor']:g}" if cfg.rope_scaling else ""
    return [("layers", f"{cfg.num_hidden_layers} attention ({cfg.num_attention_heads} query / "
                       f"{cfg.num_key_value_heads} key-value heads of {cfg.head_dim}, sinks{yarn}), {window} of them "
                       f"in a sliding window of {cfg.sliding_window}"),
            ("experts", f"{cfg.num_experts} per layer, K={cfg.num_experts_per_tok}, with biases and a clamped SwiGLU "
                        f"(limit {cfg.swiglu_limit:g}), no shared expert")]


# llama.cpp's names (its `gpt-oss` architecture) -> the HF checkpoint's, per layer; its converter splits the experts'
# alternating gate/up into ffn_gate_exps and ffn_up_exps (sources/gguf.py fuses them back, gate rows first)
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{g}.{kind}": f"self_attn.{h}_proj.{kind}" for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))
       for kind in ("weight", "bias")},
    "attn_sinks.weight": "self_attn.sinks", "ffn_gate_inp.weight": f"{MLP}router.weight",
    "ffn_gate_inp.bias": f"{MLP}router.bias",
}


def from_gguf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return t  # llama.cpp keeps GPT-OSS's tensors as they are, but for the experts' split


def config_from_gguf(metadata: dict, names: tuple[str, ...]) -> dict:
    """config.json of a `gpt-oss` GGUF. llama.cpp alternates sliding and full layers from the first (its SWA pattern of
    2) and fixes the clamp at 7 and alpha at 1.702, so the file holds none of them: these are the released values."""
    key = qwen3_moe.gguf_keys(metadata)
    fields = qwen3_moe.gguf_config_fields(metadata, names)
    rope = {"rope_type": "yarn", "rope_theta": key("rope.freq_base"), "factor": key("rope.scaling.factor"),
            "original_max_position_embeddings": key("rope.scaling.original_context_length"),
            "beta_fast": key("rope.scaling.yarn_beta_fast", 32.0), "beta_slow": key("rope.scaling.yarn_beta_slow", 1.0),
            "truncate": False} if key("rope.scaling.type", "none") == "yarn" else fields["rope_parameters"]
    return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", **fields, "rope_parameters": rope,
            "num_local_experts": key("expert_count"), "intermediate_size": key("expert_feed_forward_length"),
            "sliding_window": key("attention.sliding_window", 0), "attention_bias": True, "swiglu_limit": 7.0,
            "swiglu_alpha": 1.702}


def rope_of(cfg: ModelConfig, device) -> tuple[torch.Tensor, float]:
    """(inv_freq, YaRN's cos/sin factor), from transformers' own RoPE code."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **cfg.rope_scaling}
    config = GptOssConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                          head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                          rope_parameters=rope)
    emb = GptOssRotaryEmbedding(config)
    return emb.inv_freq.float().to(device), float(emb.attention_scaling)


class Model(qwen3_moe.AttentionMoEModel):
    MLP = MLP
    QK_NORM = "none"

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__(cfg, weights)
        inv_freq, factor = rope_of(cfg, self.device)
        # YaRN multiplies cos and sin by `factor`: queries and keys both, so the scores by factor ** 2
        spec = AttentionSpec(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
                             bias=cfg.attention_bias, sinks=True, scale=cfg.head_dim ** -0.5 * factor ** 2)
        self.attention = Attention(spec, inv_freq)
        self.windowed = Attention(AttentionSpec(**{**spec.__dict__, "sliding_window": cfg.sliding_window}), inv_freq)

    def attention_of(self, layer: int):
        return self.windowed if self.cfg.layer_types[layer] == "sliding_attention" else self.attention

    def moe_projections(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The router's logits [T, experts], its bias added."""
        p = f"model.layers.{layer}.{MLP}router."
        return linear(h, self.w[p + "weight"]) + self.w[p + "bias"]

    # route(): a softmax over the top-K logits is the renormalised top-K of a softmax over all (norm_topk_prob)


__all__ = ["ARCHITECTURES", "ZERO_CENTRED_NORMS", "EXPERT_PROJECTIONS", "FUSED_EXPERTS_TRANSPOSED",
           "GATE_UP_INTERLEAVED", "EXPERT_BIASES", "FLOAT32_RESIDENTS", "config_from_hf", "resident_shapes",
           "resident_sources", "expert_prefix", "describe", "Model", "GGUF_NAMES", "GGUF_LAYER_NAMES", "from_gguf",
           "gguf_rows_only", "config_from_gguf"]
