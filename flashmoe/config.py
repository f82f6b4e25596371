"""ModelConfig: the numbers the engine needs, parsed from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import FlashMoeError

# architecture name in config.json -> family handled by flashmoe.models.qwen3_next
SUPPORTED_ARCHITECTURES = {
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "Qwen3NextForCausalLM": "qwen3_next",
}


KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


@dataclass
class ModelConfig:
    architecture: str  # as named in config.json, e.g. "Qwen3NextForCausalLM"
    family: str  # "qwen3_5_moe" or "qwen3_next": they differ only in DeltaNet projection layout
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    layer_types: list[str]
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    hidden_act: str = "silu"
    # dense MLP layers (Qwen3-Next's mlp_only_layers / decoder_sparse_step); empty for Qwen3.5
    dense_layers: list[int] = field(default_factory=list)
    intermediate_size: int = 0
    eos_token_id: list[int] = field(default_factory=list)

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
    def from_dict(cls, data: dict) -> "ModelConfig":
        return cls(**data)

    @classmethod
    def from_hf(cls, raw: dict) -> "ModelConfig":
        """Parse a Hugging Face config.json dict; raises FlashMoeError for anything unsupported."""
        architectures = raw.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise FlashMoeError(
                f"unsupported architecture {architectures or raw.get('model_type')!r}; "
                f"flashmoe supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        text = raw.get("text_config", raw) if arch == "Qwen3_5MoeForConditionalGeneration" else raw
        try:
            return cls._from_text_config(arch, family, text, raw)
        except KeyError as missing:
            raise FlashMoeError(f"config.json has no {missing.args[0]!r}, which {arch} needs") from None

    @classmethod
    def _from_text_config(cls, arch: str, family: str, t: dict, outer: dict) -> "ModelConfig":
        def get(key: str, kind: type, default=KeyError, source: dict = t):
            """config.json's value of `key` as `kind` (ints where floats are asked are fine; bools never count
            as numbers); a missing key is a KeyError (named by from_hf), a wrong type one clear line."""
            value = source.get(key)
            if value is None:  # absent or null
                if default is KeyError:
                    raise KeyError(key)
                return default
            ok = kind is float and isinstance(value, (int, float)) or isinstance(value, kind)
            if not ok or (kind is not bool and isinstance(value, bool)):
                raise FlashMoeError(f"config.json: {key} is {value!r}, not {KIND_NAMES[kind]}")
            return float(value) if kind is float else value

        layers = get("num_hidden_layers", int)
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise FlashMoeError(f"config.json: rope_parameters is {rope!r}, not an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise FlashMoeError(f"rope type {rope_type!r} is not supported yet (only the default RoPE)")
        layer_types = t.get("layer_types")
        if layer_types is None:
            interval = get("full_attention_interval", int, 4)
            layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
        elif not (isinstance(layer_types, list) and len(layer_types) == layers
                  and set(layer_types) <= {"linear_attention", "full_attention"}):
            raise FlashMoeError(f"config.json: layer_types must list {layers} of 'linear_attention' or "
                                "'full_attention'")
        dense = []
        if family == "qwen3_next":
            step = get("decoder_sparse_step", int, 1)
            only = set(get("mlp_only_layers", list, []))
            dense = [i for i in range(layers) if i in only or (i + 1) % step != 0]
        eos = outer.get("eos_token_id", t.get("eos_token_id"))
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
        if not (isinstance(eos, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in eos)):
            raise FlashMoeError(f"config.json: eos_token_id is {eos!r}, not an id or a list of ids")
        tie = outer.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
        return cls(
            architecture=arch,
            family=family,
            vocab_size=get("vocab_size", int),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", int),
            head_dim=get("head_dim", int, None) or hidden // max(heads, 1),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=get("rope_theta", float, get("rope_theta", float, 10000.0), rope),
            partial_rotary_factor=get("partial_rotary_factor", float, get("partial_rotary_factor", float, 0.25), rope),
            layer_types=list(layer_types),
            linear_conv_kernel_dim=get("linear_conv_kernel_dim", int, 4),
            linear_key_head_dim=get("linear_key_head_dim", int),
            linear_value_head_dim=get("linear_value_head_dim", int),
            linear_num_key_heads=get("linear_num_key_heads", int),
            linear_num_value_heads=get("linear_num_value_heads", int),
            num_experts=get("num_experts", int),
            num_experts_per_tok=get("num_experts_per_tok", int),
            moe_intermediate_size=get("moe_intermediate_size", int),
            shared_expert_intermediate_size=get("shared_expert_intermediate_size", int),
            # Qwen3.5's router always renormalises its top-K weights
            norm_topk_prob=get("norm_topk_prob", bool, True),
            tie_word_embeddings=bool(tie),
            max_position_embeddings=get("max_position_embeddings", int, 32768),
            hidden_act=get("hidden_act", str, "silu"),
            dense_layers=dense,
            intermediate_size=get("intermediate_size", int, None) or 0,
            eos_token_id=list(eos),
        )


def read_hf_config(checkpoint: Path) -> tuple[ModelConfig, dict]:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise FlashMoeError(f"{checkpoint} has no config.json: is it a Hugging Face checkpoint folder?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlashMoeError(f"cannot read {path}: {exc}") from None
    return ModelConfig.from_hf(raw), raw
