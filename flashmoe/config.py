"""ModelConfig: the numbers the engine needs, parsed from a checkpoint's config.json by its family's parser
(flashmoe.models), with config_value's typed reads."""

from __future__ import annotations

import json
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

from .errors import FlashMoeError

KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
              dict: "an object"}


def is_json_type(value: Any, hint: Any) -> bool:
    """JSON types, strictly: true is not an int and 1.0 is not an int (but 1 is a float)."""
    if isinstance(hint, types.UnionType):
        return any(is_json_type(value, h) for h in get_args(hint))
    if get_origin(hint) is list:
        return type(value) is list
    return type(value) is hint or (hint is float and type(value) is int)


@dataclass
class ModelConfig:
    """What every family has, then what some have (defaults: absent). A family module parses config.json into it
    (flashmoe.models); the store's manifest keeps it, and a field added later has a default, so older stores load."""

    architecture: str  # as named in config.json, e.g. "Qwen3NextForCausalLM"
    family: str  # the checkpoint layout within the family module (its ARCHITECTURES), e.g. "qwen3_5_moe"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    layer_types: list[str]  # "full_attention" or the family's other kinds, one per layer
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool  # renormalise the top-K router weights to 1
    tie_word_embeddings: bool
    max_position_embeddings: int
    partial_rotary_factor: float = 1.0
    hidden_act: str = "silu"
    # Gated DeltaNet layers (Qwen3.5 / Qwen3-Next)
    linear_conv_kernel_dim: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    # dense MLP layers (Qwen3-Next's and Qwen3-MoE's mlp_only_layers / decoder_sparse_step); empty for Qwen3.5
    dense_layers: list[int] = field(default_factory=list)
    intermediate_size: int = 0
    eos_token_id: list[int] = field(default_factory=list)
    sliding_window: int = 0  # each query sees this many positions, itself included (Mixtral's); 0: all
    attention_bias: bool = False  # biases on the q, k, v projections (GLM-4.5)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys, where the family makes it optional (GLM-4.5)
    # sigmoid routers (GLM-4.5, DeepSeek-V3): experts in n_group groups, the best topk_group of which are eligible;
    # the kept weights times routed_scaling_factor
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # multi-head latent attention (DeepSeek-V3, Kimi-K2): head_dim is then qk_nope_head_dim + qk_rope_head_dim
    q_lora_rank: int = 0  # 0: no query compression (q_proj)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    rope_scaling: dict = field(default_factory=dict)  # config.json's rope parameters where not the default RoPE (YaRN)
    # GPT-OSS: routed experts with biases and a clamped SwiGLU: gate <= limit, -limit <= up <= limit,
    # act = (up + 1) * gate * sigmoid(alpha * gate); attention with a learned sink logit per head
    expert_bias: bool = False
    swiglu_limit: float = 0.0  # 0: the plain SwiGLU, silu(gate) * up
    swiglu_alpha: float = 1.0
    attention_sinks: bool = False

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, raw: dict) -> "ModelConfig":
        """Parse a Hugging Face config.json dict with its family's parser; FlashMoeError for anything unsupported."""
        from .models import FAMILIES, family_of

        architectures = raw.get("architectures") or []
        arch = next((a for a in architectures if a in FAMILIES), None)
        if arch is None:
            raise FlashMoeError(
                f"unsupported architecture {architectures or raw.get('model_type')!r}; "
                f"flashmoe supports: {', '.join(FAMILIES)}"
            )
        try:
            return family_of(arch).config_from_hf(arch, raw)
        except KeyError as missing:
            raise FlashMoeError(f"config.json has no {missing.args[0]!r}, which {arch} needs") from None


def config_value(source: dict, key: str, kind: type, default=KeyError):
    """config.json's value of `key` as `kind` (ints where floats are asked are fine; bools never count as
    numbers); absent or null gives `default`, or a KeyError (named by from_hf) when there is none; a wrong type
    is one clear line."""
    value = source.get(key)
    if value is None:
        if default is KeyError:
            raise KeyError(key)
        return default
    if not is_json_type(value, kind):
        raise FlashMoeError(f"config.json: {key} is {value!r}, not {KIND_NAMES[kind]}")
    return float(value) if kind is float else value


def rope_settings(source: dict) -> tuple[dict, str]:
    """config.json's RoPE parameters (`rope_parameters`, or the older `rope_scaling`) and their rope type, "default"
    where none is named; one clear line when they are not an object."""
    rope = source.get("rope_parameters") or source.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise FlashMoeError(f"config.json: rope_parameters is {rope!r}, not an object")
    return rope, rope.get("rope_type", rope.get("type", "default"))


def read_hf_config(checkpoint: Path) -> tuple[ModelConfig, dict]:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise FlashMoeError(f"{checkpoint} has no config.json: is it a Hugging Face checkpoint folder?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlashMoeError(f"cannot read {path}: {exc}") from None
    return ModelConfig.from_hf(raw), raw
