"""Layer math and checkpoint naming, one module per architecture family (mlx-lm's models/<family>.py); nothing
here opens a file. Outside this package no module names a family: it asks `family_of(architecture)`.

A family module provides:
  ARCHITECTURES: {config.json's architectures[0]: the checkpoint layout it stands for (ModelConfig.family)}
  config_from_hf(arch, raw) -> ModelConfig          config.json -> the numbers the engine needs
  resident_shapes(cfg) -> {store name: shape}       the resident tensors a store holds
  resident_sources(cfg) -> [ResidentItem]           those the checkpoint does not hold one to one
  expert_prefix(layer) -> str                       where the checkpoint keeps a layer's routed experts
  EXPERT_PROJECTIONS: (gate, up, down)              their names there: PREFIX{e}.{name}.weight
  ZERO_CENTRED_NORMS: bool                          whether RMSNorm weights are offsets from 1
  FLOAT32_RESIDENTS (optional): name suffixes       resident tensors kept in float32 whatever the model dtype
  describe(cfg) -> [(label, text)]                  what `flashmoe info` says of its layers
  GGUF_NAMES, GGUF_LAYER_NAMES, from_gguf(cfg, name, t)   llama.cpp's names and changes, undone
  config_from_gguf(metadata, names) -> config.json  for a GGUF architecture transformers has no mapping for
  Model(cfg, weights)                               the layer math over the resident weights: new_state, embed,
                                                    mix, moe_projections, route, shared_expert(_parts), dense_mlp,
                                                    kv_cache, logits, compress_matrices (qwen3_moe.py is the plainest)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from ..errors import FlashMoeError

# architectures[0] -> module under flashmoe.models (mlx-lm finds its model files the same way)
FAMILIES = {
    "Qwen3_5MoeForCausalLM": "qwen3_next",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_next",
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Glm4MoeForCausalLM": "glm4_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "MiniMaxM2ForCausalLM": "minimax_m2",
    "GptOssForCausalLM": "gpt_oss",
}


# llama.cpp's general.architecture -> the same modules
GGUF_FAMILIES = {"qwen35moe": "qwen3_next", "qwen3next": "qwen3_next", "qwen3moe": "qwen3_moe", "glm4moe": "glm4_moe",
                 "deepseek2": "deepseek_v3", "minimax-m2": "minimax_m2", "llama": "mixtral", "gpt-oss": "gpt_oss"}  # llama.cpp writes Mixtral as a llama with experts


def family_of_gguf(architecture: str) -> ModuleType | None:
    name = GGUF_FAMILIES.get(architecture)
    return None if name is None else importlib.import_module(f"{__name__}.{name}")


def family_of(architecture: str) -> ModuleType:
    name = FAMILIES.get(architecture)
    if name is None:
        raise FlashMoeError(f"unsupported architecture {architecture!r}; flashmoe supports: {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{name}")


def end_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The resident tensors at a decoder's two ends, every family's: the embedding, the head (only when untied) and
    the final norm."""
    h = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    shapes["model.norm.weight"] = (h,)
    return shapes


@dataclass
class ResidentItem:
    """Store tensors made from checkpoint tensors: usually one to one, sometimes a split or a merge."""

    sources: dict[str, tuple[int, ...]]  # checkpoint name -> expected shape
    outputs: list[str]  # store names
    make: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    rows_only: bool = True  # make only moves whole rows, so it serves quantized codes, scales and biases alike
