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
        layers = int(t["num_hidden_layers"])
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise FlashMoeError(f"rope type {rope_type!r} is not supported yet (only the default RoPE)")
        layer_types = t.get("layer_types")
        if layer_types is None:
            interval = int(t.get("full_attention_interval", 4))
            layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
        dense = []
        if family == "qwen3_next":
            step = int(t.get("decoder_sparse_step", 1))
            only = set(t.get("mlp_only_layers") or [])
            dense = [i for i in range(layers) if i in only or (i + 1) % step != 0]
        eos = outer.get("eos_token_id", t.get("eos_token_id"))
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        tie = outer.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        return cls(
            architecture=arch,
            family=family,
            vocab_size=int(t["vocab_size"]),
            hidden_size=int(t["hidden_size"]),
            num_hidden_layers=layers,
            num_attention_heads=int(t["num_attention_heads"]),
            num_key_value_heads=int(t["num_key_value_heads"]),
            head_dim=int(t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", t.get("partial_rotary_factor", 0.25))),
            layer_types=list(layer_types),
            linear_conv_kernel_dim=int(t.get("linear_conv_kernel_dim", 4)),
            linear_key_head_dim=int(t["linear_key_head_dim"]),
            linear_value_head_dim=int(t["linear_value_head_dim"]),
            linear_num_key_heads=int(t["linear_num_key_heads"]),
            linear_num_value_heads=int(t["linear_num_value_heads"]),
            num_experts=int(t["num_experts"]),
            num_experts_per_tok=int(t["num_experts_per_tok"]),
            moe_intermediate_size=int(t["moe_intermediate_size"]),
            shared_expert_intermediate_size=int(t["shared_expert_intermediate_size"]),
            # Qwen3.5's router always renormalises its top-K weights
            norm_topk_prob=bool(t.get("norm_topk_prob", True)),
            tie_word_embeddings=bool(tie),
            max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
            hidden_act=t.get("hidden_act", "silu"),
            dense_layers=dense,
            intermediate_size=int(t.get("intermediate_size") or 0),
            eos_token_id=eos,
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
