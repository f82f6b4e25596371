"""Random-weight stores of any geometry, written directly (no checkpoint): for benchmarks at real model sizes.

A Qwen3.5-397B-shaped store holds hundreds of GB of experts; building it through transformers and
`convert` would need four times that in bf16. Here resident tensors are drawn at random and expert blobs
are filled with random codes and plausible scales, in exactly the store format that `convert` writes,
so the engine cannot tell the difference. The numbers are meaningless; the bytes and shapes are real.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .convert import DEFAULT_SHARD_BYTES, write_manifest
from .errors import FlashMoeError
from .models import family_of
from .quant import SCALE_DTYPE
from .store import BlobLayout, crc32, expert_file_name

# Qwen3.5-397B-A17B's text config (its config.json); num_hidden_layers is set by the caller
QWEN3_5_397B = dict(
    architectures=["Qwen3_5MoeForCausalLM"], vocab_size=248320, hidden_size=4096, num_attention_heads=32,
    num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=64,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512,
    num_experts_per_tok=10, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
    full_attention_interval=4, rms_norm_eps=1e-6, partial_rotary_factor=0.25, rope_theta=10_000_000,
    max_position_embeddings=262144, tie_word_embeddings=False,
)
# Qwen3.5-35B-A3B's text config; num_hidden_layers is set by the caller (40 in the real model)
QWEN3_5_35B = dict(
    QWEN3_5_397B, hidden_size=2048, num_attention_heads=16, linear_num_value_heads=32, num_experts=256,
    num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
)
# Qwen3-Next-80B-A3B's config.json
QWEN3_NEXT_80B = dict(
    architectures=["Qwen3NextForCausalLM"], vocab_size=151936, hidden_size=2048, num_attention_heads=16,
    num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512,
    num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512, intermediate_size=5120,
    full_attention_interval=4, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
    partial_rotary_factor=0.25, rope_theta=10_000_000, max_position_embeddings=262144, tie_word_embeddings=False,
    norm_topk_prob=True, num_hidden_layers=48,
)
# Qwen3-235B-A22B's config.json (Qwen3-MoE: full attention only, no shared expert); num_hidden_layers 94 in the real one
QWEN3_235B = dict(
    architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=4096, num_attention_heads=64,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536,
    intermediate_size=12288, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, rms_norm_eps=1e-6,
    rope_theta=1_000_000, max_position_embeddings=40960, tie_word_embeddings=False, num_hidden_layers=94,
)
# GLM-4.5-Air's config.json: 128 experts of 1408 at K=8 under a sigmoid router, a shared expert, q/k/v biases,
# half-rotary heads, the first layer dense; 46 layers
GLM4_5_AIR = dict(
    architectures=["Glm4MoeForCausalLM"], vocab_size=151552, hidden_size=4096, num_attention_heads=96,
    num_key_value_heads=8, head_dim=128, n_routed_experts=128, num_experts_per_tok=8, moe_intermediate_size=1408,
    intermediate_size=10944, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1,
    routed_scaling_factor=1.0, norm_topk_prob=True, attention_bias=True, use_qk_norm=False, partial_rotary_factor=0.5,
    rms_norm_eps=1e-5, rope_theta=1_000_000, max_position_embeddings=131072, tie_word_embeddings=False,
    num_hidden_layers=46,
)
# DeepSeek-V3's config.json (Kimi-K2 has its shapes with 384 experts): MLA, 256 experts of 2048 at K=8 in 8 groups,
# a shared expert, the first 3 layers dense, YaRN; 61 layers
DEEPSEEK_V3 = dict(
    architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168, num_attention_heads=128,
    num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048, intermediate_size=18432,
    first_k_dense_replace=3, n_group=8, topk_group=4, routed_scaling_factor=2.5, n_shared_experts=1,
    norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=163840, tie_word_embeddings=False,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, rope_theta=10000, num_hidden_layers=61,
)
# gpt-oss-120b's config.json: 128 experts of 2880 at K=4 with biases and a clamped SwiGLU, sinks, sliding (128) and
# full layers alternating, YaRN; 36 layers
GPT_OSS_120B = dict(
    architectures=["GptOssForCausalLM"], vocab_size=201088, hidden_size=2880, num_attention_heads=64,
    num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4, intermediate_size=2880,
    sliding_window=128, attention_bias=True,  # layer_types left out: sliding and full alternate, whatever the count
    swiglu_limit=7.0, rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
    num_hidden_layers=36, rope_theta=150000,
    rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                  "original_max_position_embeddings": 4096, "truncate": False},
)
# Mixtral-8x7B's config.json: 8 experts of 14336 at K=2, 32 layers
MIXTRAL_8X7B = dict(
    architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2, intermediate_size=14336,
    rms_norm_eps=1e-5, rope_theta=1_000_000, max_position_embeddings=32768, tie_word_embeddings=False,
    num_hidden_layers=32, sliding_window=None,
)


def expert_layout(cfg: ModelConfig, bits: int, group_size: int) -> BlobLayout:
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    per_byte = 8 // bits
    shapes = {"gate_up": (2 * i, h), "down": (h, i)}
    tensors = {}
    for name, (rows, cols) in shapes.items():
        tensors[f"{name}.packed"] = torch.empty(rows, cols // per_byte, dtype=torch.uint8)
        tensors[f"{name}.scales"] = torch.empty(rows, cols // group_size, dtype=SCALE_DTYPE)
        tensors[f"{name}.biases"] = torch.empty(rows, cols // group_size, dtype=SCALE_DTYPE)
    if cfg.expert_bias:  # as store.expert_layout: GPT-OSS's output biases, float32
        tensors["gate_up.bias"] = torch.empty(2 * i, dtype=torch.float32)
        tensors["down.bias"] = torch.empty(h, dtype=torch.float32)
    return BlobLayout.for_tensors(tensors)


def _random_resident(name: str, shape: tuple[int, ...], gen: torch.Generator, device: str,
                     zero_centred: bool) -> torch.Tensor:
    if name.endswith("A_log"):
        return torch.empty(shape, device=device).uniform_(0, 2.7, generator=gen).to(torch.bfloat16)
    if name.endswith(("dt_bias", "linear_attn.norm.weight")):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    if name.endswith("norm.weight"):  # a scale of 1: 0 where the family's norms store an offset from 1
        return torch.full(shape, 0.0 if zero_centred else 1.0, dtype=torch.bfloat16, device=device)
    std = 0.1 if name.endswith("conv1d.weight") else 0.02
    return (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16)


def _random_blobs(layout: BlobLayout, n: int, bits: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """n blobs with uniform random codes and scales/biases that put weights at about N(0, 0.02) magnitude."""
    blobs = torch.zeros(n, layout.blob_bytes, dtype=torch.uint8, device=device)
    levels = (1 << bits) - 1
    for s in layout.segments:
        region = blobs[:, s.offset : s.offset + s.nbytes]
        if s.name.endswith(".packed"):
            region.random_(0, 256, generator=gen)
        elif s.name.endswith(".bias"):  # an expert's float32 output bias
            bias = torch.empty(n, s.nbytes // 4, device=device).normal_(0, 0.02, generator=gen)
            region.copy_(bias.view(torch.uint8).view(n, s.nbytes))
        else:
            scale = torch.empty(n, s.nbytes // 2, device=device).uniform_(0.06, 0.08, generator=gen) / levels
            value = scale if s.name.endswith(".scales") else -scale * levels / 2
            region.copy_(value.to(SCALE_DTYPE).view(torch.uint8).view(n, s.nbytes))
    return blobs


def write_random_store(dst: str | os.PathLike, hf_config: dict, bits: int = 4, group_size: int = 64, seed: int = 0,
                       device: str = "cpu", progress: Callable[[int], None] | None = None,
                       sparse_experts: bool = False) -> Path:
    """Write a complete random-weight store for `hf_config` (a config.json dict) at `dst`; random numbers are
    drawn on `device` (a GPU makes tens of GB in seconds). sparse_experts: the expert files are holes of their full
    size (every blob reads as zeros, and its checksum is that of zeros), for a benchmark that writes random blobs
    straight into the caches because the disk cannot hold the experts."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FlashMoeError(f"destination {dst} exists and is not empty")
    progress = progress or (lambda n: None)
    cfg = ModelConfig.from_hf(hf_config)
    family = family_of(cfg.architecture)
    gen = torch.Generator(device).manual_seed(seed)
    (dst / "experts").mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(hf_config, indent=1))

    names = list(family.resident_shapes(cfg).items())  # the store's own names and shapes, untied head included
    files, shard, shard_bytes, resident_bytes = [], {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"resident-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(dst / name), metadata={"format": "pt"})
        files.append(name)
        shard, shard_bytes = {}, 0

    for name, shape in names:
        t = _random_resident(name, shape, gen, device, family.ZERO_CENTRED_NORMS).cpu()
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > DEFAULT_SHARD_BYTES:
            flush()
        shard[name] = t
        shard_bytes += nbytes
        resident_bytes += nbytes
        progress(nbytes)
    flush()

    layout = expert_layout(cfg, bits, group_size)
    layers = {}
    zeros_crc = crc32(torch.zeros(layout.blob_bytes, dtype=torch.uint8).numpy())
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for layer in cfg.moe_layers:
            rel = expert_file_name(layer)
            if sparse_experts:
                with open(dst / rel, "wb") as f:
                    f.truncate(cfg.num_experts * layout.blob_bytes)
                sums = [zeros_crc] * cfg.num_experts
            else:
                blobs = _random_blobs(layout, cfg.num_experts, bits, gen, device).cpu().numpy()
                sums = list(pool.map(crc32, blobs))
                with open(dst / rel, "wb") as f:
                    f.write(blobs.data)
            layers[str(layer)] = {"file": rel, "offsets": [e * layout.blob_bytes for e in range(cfg.num_experts)],
                                  "sizes": [layout.blob_bytes] * cfg.num_experts, "crc32": sums}
            progress(cfg.num_experts * layout.blob_bytes)
    write_manifest(dst, cfg, bits, group_size, "BF16", files, resident_bytes, layout, layers,
                   {"path": None, "synthetic": {"seed": seed}})
    return dst
