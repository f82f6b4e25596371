"""Tiny random-weight checkpoints built with transformers' own classes: the demo's model and the tests' fixtures.

They are saved with save_pretrained (sharded safetensors, bf16), byte for byte the format of the real
Qwen3.5-MoE / Qwen3-Next / Qwen3-MoE / Mixtral checkpoints, with a small byte-level BPE tokenizer and a chat template in the
family's own format (tools, tool calls, the thinking switch: see tiny_templates.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .tiny_templates import (DEEPSEEK_V3_CHAT_TEMPLATE, GLM4_CHAT_TEMPLATE, GPT_OSS_CHAT_TEMPLATE, KIMI_K2_CHAT_TEMPLATE,
                             MINIMAX_M2_CHAT_TEMPLATE, MIXTRAL_CHAT_TEMPLATE, QWEN3_5_CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE)

ARCHITECTURES = ("qwen3_5_moe", "qwen3_5_moe_vl", "qwen3_next", "qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3",
                 "minimax_m2", "gpt_oss", "kimi_k2")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Mixtral's: unknown, begin and end of a sequence, and the v3 tokenizer's control tokens for tools
MISTRAL_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                          "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
GLM_SPECIAL_TOKENS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
DEEPSEEK_SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
MINIMAX_SPECIAL_TOKENS = ["]~!b[", "]~b]", "[e~["]
# Kimi-K2's: its turn and tool-call markers are special tokens (so decoding keeps only the ones a parser reads)
KIMI_SPECIAL_TOKENS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
                       "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                       "<|tool_call_argument_begin|>", "<|tool_call_end|>"]
HARMONY_SPECIAL_TOKENS = ["<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>", "<|call|>"]  # GPT-OSS
# added but not special, as in the real Qwen vocabularies: they stay in decoded text, where the parsers find them
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
DEEPSEEK_MARKUP_TOKENS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                          "<｜tool▁sep｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
CORPUS = """Mixture-of-Experts language models route every token to a few experts out of many.
Only the experts the router picks are read from the disk, so a model far larger than memory still runs.
The quick brown fox jumps over the lazy dog. Hello world! What is the capital of France? Paris.
A fast SSD streams the weights; the page cache keeps the hottest ones; the GPU multiplies them.
Write a haiku about the sea. Waves fold into foam, salt wind carries gull voices, the tide keeps its time.
"""


def build_tokenizer(vocab_size: int, chat_template: str = QWEN3_5_CHAT_TEMPLATE, style: str = "qwen",
                    corpus: Iterable[str] | None = None):
    """A byte-level BPE tokenizer of the family's style, trained on `corpus` (lines of text; default a few lines:
    the random-weight checkpoints' own)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = {"mistral": MISTRAL_SPECIAL_TOKENS, "glm": GLM_SPECIAL_TOKENS, "deepseek": DEEPSEEK_SPECIAL_TOKENS,
               "minimax": MINIMAX_SPECIAL_TOKENS, "harmony": HARMONY_SPECIAL_TOKENS,
               "kimi": KIMI_SPECIAL_TOKENS}.get(style, SPECIAL_TOKENS)
    markup = {"qwen": MARKUP_TOKENS, "deepseek": DEEPSEEK_MARKUP_TOKENS}.get(style, [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(markup), special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines() * 4 if corpus is None else corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in markup])
    names = {"mistral": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
             "glm": dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
             "deepseek": dict(bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>"),
             "minimax": dict(bos_token="]~!b[", eos_token="[e~["),
             "harmony": dict(eos_token="<|return|>"),
             "kimi": dict(bos_token="[BOS]", eos_token="<|im_end|>")}.get(
        style, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = chat_template
    return fast


def tiny_config(arch: str = "qwen3_5_moe", **overrides):
    """A transformers config of the given family, small enough to build in a second."""
    from transformers import MixtralConfig, Qwen3_5MoeConfig, Qwen3_5MoeTextConfig, Qwen3MoeConfig, Qwen3NextConfig

    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, num_experts_per_tok=4, max_position_embeddings=4096, rms_norm_eps=1e-6)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**{**common, "num_experts": 16, "moe_intermediate_size": 64, "intermediate_size": 128,
                                 "norm_topk_prob": True, **overrides})
    if arch == "glm4_moe":  # GLM-4.5's settings (q/k/v biases, half-rotary heads, a scaled sigmoid router, a shared
        # expert, the first layer dense) with DeepSeek-style expert groups, so the group-limited routing is exercised
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(**{**common, "n_routed_experts": 16, "moe_intermediate_size": 64, "intermediate_size": 128,
                                "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                                "attention_bias": True, "norm_topk_prob": True, "num_nextn_predict_layers": 0,
                                **overrides})
    if arch == "deepseek_v3":  # DeepSeek-V3's structure at small sizes: MLA with q and kv LoRA, YaRN (factor 4 over
        # 32 original positions: the tests' prompts reach past them), groups, a shared expert, the first layer dense
        from transformers import DeepseekV3Config

        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
        # head_dim: transformers' config sets it to the rope dims (its RoPE reads it); 4 x 32 = 128 positions after YaRN
        return DeepseekV3Config(**{**common, "head_dim": 8, "max_position_embeddings": 128,
                                   "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32,
                                   "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                                   "n_routed_experts": 16, "moe_intermediate_size": 64, "intermediate_size": 128,
                                   "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
                                   "routed_scaling_factor": 2.5, "n_shared_experts": 1, "rope_parameters": rope,
                                   **overrides})
    if arch == "kimi_k2":  # Kimi-K2 is DeepSeek-V3's architecture with its own tokenizer and template; a longer
        # context than the DeepSeek tiny one's, for its tools' listing
        return tiny_config("deepseek_v3", **{"max_position_embeddings": 4096, **overrides})
    if arch == "minimax_m2":  # MiniMax-M2's structure: half-rotary heads, whole-vector q/k norms, a sigmoid router
        from transformers import MiniMaxM2Config

        return MiniMaxM2Config(**{**common, "num_local_experts": 16, "intermediate_size": 64, "bos_token_id": None,
                                  "eos_token_id": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                                            "partial_rotary_factor": 0.5}, **overrides})
    if arch == "gpt_oss":  # GPT-OSS's structure: sinks, alternating sliding (8) / full layers, YaRN over 32 original
        # positions (the tests' prompts reach past them), biases everywhere, the clamped SwiGLU (a limit the random
        # weights' gates (std ~0.16) cross: 0.1)
        from transformers import GptOssConfig

        rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
        return GptOssConfig(**{**common, "head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
                               "intermediate_size": 64, "sliding_window": 8, "max_position_embeddings": 128,
                               "rope_parameters": rope, "swiglu_limit": 0.1, "rms_norm_eps": 1e-5, **overrides})
    if arch == "mixtral":  # 8 experts, K=2, head_dim = hidden / heads, as the real ones (mlx-lm assumes the last)
        return MixtralConfig(**{**common, "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64,
                                "rms_norm_eps": 1e-5, "head_dim": 16, **overrides})
    text = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, moe_intermediate_size=64, shared_expert_intermediate_size=64,
        num_experts=16, num_experts_per_tok=4, max_position_embeddings=4096, rms_norm_eps=1e-6,
    )
    text.update(overrides)
    if arch == "qwen3_next":
        text.setdefault("intermediate_size", 128)
        return Qwen3NextConfig(**text)
    if arch == "qwen3_5_moe":
        return Qwen3_5MoeTextConfig(**text)
    if arch == "qwen3_5_moe_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"])
        return Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")


def _randomize(model: torch.nn.Module, seed: int, zero_centred: bool, gpt_oss: bool = False) -> None:
    """Give norms and DeltaNet parameters non-trivial values too, so the checks exercise them. zero_centred: the
    family's norms store an offset from 1 (Qwen3.5/Next's), else the scale itself."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                one = not zero_centred or "linear_attn.norm" in name
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if one else 0.0))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)  # a confident router
            elif gpt_oss and name.endswith(("_bias", ".bias", "sinks")):  # its biases and sinks (initialised to 0);
                # biases no larger than the embeddings, or every token's hidden state looks alike and routes alike
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if name.endswith("sinks") else 0.02))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a sigmoid router's choosing bias (GLM-4.5, DeepSeek-V3)
                b.copy_(torch.rand(b.shape, generator=gen) * 0.2)


def build_tiny_checkpoint(path: str | Path, arch: str = "qwen3_5_moe", seed: int = 0, dtype=torch.bfloat16,
                          max_shard_size: str = "200KB", **overrides) -> Path:
    """Save a random-weight checkpoint of `arch` with transformers' save_pretrained; returns its folder."""
    from transformers import (DeepseekV3ForCausalLM, GenerationConfig, Glm4MoeForCausalLM, GptOssForCausalLM,
                              MiniMaxM2ForCausalLM,
                              MixtralForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration,
                              Qwen3MoeForCausalLM, Qwen3NextForCausalLM)

    path = Path(path)
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    cls = {"qwen3_5_moe": Qwen3_5MoeForCausalLM, "qwen3_5_moe_vl": Qwen3_5MoeForConditionalGeneration,
           "qwen3_next": Qwen3NextForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM, "mixtral": MixtralForCausalLM,
           "glm4_moe": Glm4MoeForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM,
           "minimax_m2": MiniMaxM2ForCausalLM, "gpt_oss": GptOssForCausalLM, "kimi_k2": DeepseekV3ForCausalLM}[arch]
    model = cls(config)
    _randomize(model, seed, zero_centred=arch.startswith(("qwen3_5", "qwen3_next")), gpt_oss=arch == "gpt_oss")
    template = {"qwen3_next": QWEN3_CHAT_TEMPLATE, "qwen3_moe": QWEN3_CHAT_TEMPLATE, "mixtral": MIXTRAL_CHAT_TEMPLATE,
                "glm4_moe": GLM4_CHAT_TEMPLATE, "deepseek_v3": DEEPSEEK_V3_CHAT_TEMPLATE,
                "minimax_m2": MINIMAX_M2_CHAT_TEMPLATE, "gpt_oss": GPT_OSS_CHAT_TEMPLATE,
                "kimi_k2": KIMI_K2_CHAT_TEMPLATE}.get(arch, QWEN3_5_CHAT_TEMPLATE)
    style = {"mixtral": "mistral", "glm4_moe": "glm", "deepseek_v3": "deepseek", "minimax_m2": "minimax",
             "gpt_oss": "harmony", "kimi_k2": "kimi"}.get(arch, "qwen")
    tokenizer = build_tokenizer(getattr(config, "text_config", config).vocab_size, template, style)
    eos = tokenizer.eos_token_id
    if arch == "glm4_moe":  # GLM-4.5's generation_config: a reply ends at <|endoftext|>, <|user|> or <|observation|>
        eos = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    if arch == "gpt_oss":  # gpt-oss's generation_config: a reply ends at <|return|>, or at <|call|> after a tool call
        eos = tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>"])
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    if arch == "minimax_m2":  # the released config.json's keys, which mlx-lm and llama.cpp read (transformers drops them)
        import json

        cfg = json.loads((path / "config.json").read_text())
        rotary = int(cfg["head_dim"] * (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
        cfg.update(rotary_dim=rotary, shared_intermediate_size=0, use_qk_norm=True, qk_norm_type="per_layer",
                   scoring_func="sigmoid", use_routing_bias=True)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def split_experts(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, tuple[list, list]]]:
    """A checkpoint's tensors with its per-expert projections (mlp.experts.E.{gate,up,down}_proj.weight) taken out:
    (the rest, {layer prefix: (each expert's gate_up [2I, H], each expert's down [H, I])})."""
    rest, experts = {}, {}
    for key, t in tensors.items():
        if ".mlp.experts." in key:
            prefix, tail = key.split(".mlp.experts.")
            e, proj, _ = tail.split(".")
            experts.setdefault(prefix, {}).setdefault(proj, {})[int(e)] = t
        else:
            rest[key] = t
    return rest, {prefix: ([torch.cat([p["gate_proj"][e], p["up_proj"][e]]) for e in range(len(p["gate_proj"]))],
                           [p["down_proj"][e] for e in range(len(p["down_proj"]))]) for prefix, p in experts.items()}


def hf_as_mlx_lm_reads_it(src, dst):
    """A copy of a tiny checkpoint in the layout mlx-lm's converter reads: Qwen3.5's experts fused
    (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I], as the official releases hold them; mlx-lm 0.32 reads
    no other), the rope settings at the top of config.json (where transformers 4 wrote them), Qwen3-MoE's expert count
    as num_experts, GPT-OSS's experts as its release holds them ([E, out, in]) with its clamp at mlx-lm's fixed 7."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    tensors = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    out = tensors
    if "text_config" in cfg:
        out, experts = split_experts(tensors)
        for prefix, (gate_up, down) in experts.items():
            out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
            out[f"{prefix}.mlp.experts.down_proj"] = torch.stack(down)
    else:
        rope = cfg.get("rope_parameters") or {}
        cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if cfg.get("model_type") == "qwen3_next" or "partial_rotary_factor" in rope:
            cfg.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))
        cfg.setdefault("rope_scaling", None)
    if cfg.get("model_type") == "qwen3_moe":  # the released configs' name, which mlx-lm reads (transformers 5 renames it)
        cfg.setdefault("num_experts", cfg.get("num_local_experts"))
    if cfg.get("model_type") == "gpt_oss":  # the release's expert layout ([E, out, in], gate/up rows alternating)
        for name in [n for n in out if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            out[name + ".weight"] = out.pop(name).transpose(-1, -2).contiguous()  # mlx-lm's sanitize reads X.weight
        rope = cfg.get("rope_parameters") or {}
        if rope.get("rope_type") == "yarn":
            cfg["rope_scaling"] = rope
        cfg["swiglu_limit"] = 7.0  # mlx-lm's SwigluOAI clamps at 7 whatever config.json says
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst
