"""The model seam: families are found by architecture name, and the engine's generic parts name none."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import flashmoe
from flashmoe.errors import FlashMoeError
from flashmoe.models import FAMILIES, family_of
from conftest import LAYOUTS

GENERIC = ["engine.py", "convert.py", "decode_graphs.py", "routed.py", "experts.py", "store.py", "server.py"]
FAMILY_WORDS = re.compile(r"qwen|deltanet|linear_attention|full_attention|mixtral|deepseek", re.IGNORECASE)


@pytest.mark.parametrize("name", GENERIC)
def test_generic_modules_name_no_family(name):
    source = (Path(flashmoe.__file__).parent / name).read_text()
    assert not FAMILY_WORDS.findall(source), f"{name} names a family: ask models.family_of(architecture) instead"


def test_every_registered_architecture_has_a_module_that_knows_it():
    for arch in FAMILIES:
        family = family_of(arch)
        assert arch in family.ARCHITECTURES
        for name in ("config_from_hf", "resident_shapes", "resident_sources", "expert_prefix", "describe", "Model"):
            assert hasattr(family, name), f"{family.__name__} lacks {name}"


def test_an_unknown_architecture_names_the_supported_ones():
    with pytest.raises(FlashMoeError, match="unsupported architecture 'LlamaForCausalLM'.*Qwen3NextForCausalLM"):
        family_of("LlamaForCausalLM")


# ---- the plain attention + MoE families (Qwen3-MoE, Mixtral) on awkward shapes ----------------------------------
ODD = {
    # 6 query / 3 key-value heads of 24, 10 experts at K=3 with unnormalised weights, a dense layer between MoE
    # ones, tied embeddings
    "qwen3_moe": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, head_dim=24,
                      num_experts=10, num_experts_per_tok=3, moe_intermediate_size=96, intermediate_size=160,
                      mlp_only_layers=[1], norm_topk_prob=False, tie_word_embeddings=True),
    # GLM-4.5 the other way round from the tiny default: q/k norms, no biases, one expert group, unnormalised
    # weights, two shared experts, two dense layers first
    "glm4_moe": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, head_dim=24,
                     n_routed_experts=10, num_experts_per_tok=3, moe_intermediate_size=64, intermediate_size=160,
                     first_k_dense_replace=2, n_group=1, topk_group=1, use_qk_norm=True, attention_bias=False,
                     norm_topk_prob=False, n_shared_experts=2, routed_scaling_factor=1.8),
    # DeepSeek-V3 without a query LoRA (q_proj), with rotate-half RoPE dims, YaRN whose mscale differs from
    # mscale_all_dim (cos and sin scaled), one expert group, unnormalised weights, two shared experts, two dense layers
    "deepseek_v3": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6, head_dim=8,
                        q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=24,
                        n_routed_experts=10, num_experts_per_tok=3, moe_intermediate_size=64, intermediate_size=160,
                        first_k_dense_replace=2, n_group=1, topk_group=1, norm_topk_prob=False, n_shared_experts=2,
                        routed_scaling_factor=1.8, rope_interleave=False, max_position_embeddings=256,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
                                         "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                                         "mscale": 0.707, "mscale_all_dim": 1.0}),
    # MiniMax-M2 with 6 query / 2 key-value heads of 24, 12 of them rotated, 10 experts at K=3
    "minimax_m2": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=24,
                       num_local_experts=10, num_experts_per_tok=3, intermediate_size=64,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # GPT-OSS with no attention biases, the default RoPE, layer kinds out of the usual order, a 12-token window,
    # 10 experts at K=3 and a clamped SwiGLU of its own limit and alpha
    "gpt_oss": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=24,
                    num_local_experts=10, num_experts_per_tok=3, intermediate_size=96, sliding_window=12,
                    attention_bias=False, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, swiglu_limit=0.15,
                    swiglu_alpha=1.2),
    # 5 experts at K=3, a 12-token sliding window (the prompt crosses it many times)
    "mixtral": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                    num_local_experts=5, num_experts_per_tok=3, intermediate_size=64, sliding_window=12),
}


@pytest.fixture(scope="module", params=sorted(ODD))
def odd(request, tmp_path_factory):
    from flashmoe.convert import convert
    from flashmoe.tiny import build_tiny_checkpoint

    arch = request.param
    root = tmp_path_factory.mktemp(f"odd-{arch}")
    ckpt = build_tiny_checkpoint(root / "ckpt", arch, **ODD[arch])
    return arch, ckpt, {bits: convert(ckpt, root / f"store-{bits}", bits=bits, group_size=bits and 32)
                        for bits in (None, 4)}


def test_odd_shapes_match_transformers(odd):
    import torch

    from conftest import load_reference, rel_error
    from test_reference import PROMPT

    arch, ckpt, stores = odd
    model = flashmoe.load(stores[None])
    ref = load_reference(ckpt, arch)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
        greedy = ref.generate(torch.tensor([PROMPT[:11]]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                              min_new_tokens=20)[0, 11:].tolist()
    assert rel_error(model.logits(PROMPT), expected) < 1e-3
    assert list(model.generate(PROMPT[:11], 20, stop_token_ids=[])) == greedy
    assert 0 < rel_error(flashmoe.load(stores[4], resident_format="float").logits(PROMPT), expected) < 0.2


def test_odd_shapes_prompt_in_one_pass_equals_token_by_token(odd, monkeypatch):
    """Chunks and single tokens through the KV caches (for Mixtral, across its sliding window) give one answer."""
    import torch

    from conftest import rel_error
    from flashmoe.kernels import cpu_int4, cpu_native
    from test_reference import PROMPT

    _, _, stores = odd
    # float residents and experts in float: this is about the state's paths, not rounding (the int4 kernel's one-token
    # and many-token paths round differently, ~1e-4 apart; so do our kernels' int8 activations)
    monkeypatch.setattr(cpu_int4.KernelForm, "for_store", classmethod(lambda *a, **k: None))
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", False)
    model = flashmoe.load(stores[4], resident_format="float")
    whole = model.logits(PROMPT)
    state = model.new_state()
    parts = [PROMPT[:30]] + [[t] for t in PROMPT[30:40]] + [PROMPT[40:]]
    assert rel_error(torch.cat([model.forward(p, state) for p in parts]), whole) < 1e-5


def test_a_sliding_window_limits_what_a_token_sees(odd):
    """Tokens further back than the window change nothing (Mixtral's); within it they do."""
    from conftest import rel_error
    from test_reference import PROMPT

    arch, _, stores = odd
    if arch != "mixtral":
        pytest.skip("only Mixtral's odd config has a window")
    model = flashmoe.load(stores[None])
    window = model.config.sliding_window
    tail = PROMPT[40 : 40 + window]
    prompt = PROMPT[:30] + tail
    base = model.logits(prompt)[-1]

    def changed(positions):
        return model.logits([(t + 1) % 512 if i in positions else t for i, t in enumerate(prompt)])[-1]

    # the last token sees `window` positions per layer, so 3 layers reach 3 * (window - 1) back and no further
    reach = len(prompt) - 1 - model.config.num_hidden_layers * (window - 1)
    assert rel_error(changed(range(reach)), base) == 0
    assert rel_error(changed([reach]), base) > 1e-4


def test_info_describes_each_family(run_cli, built):
    expected = {"qwen3_5_moe": "Gated DeltaNet", "qwen3_next": "Gated DeltaNet", "qwen3_moe": "no shared expert",
                "mixtral": "no shared expert", "glm4_moe": "sigmoid router, 2 of 4 expert groups (weights x 2.5)",
                "deepseek_v3": "multi-head latent attention (4 heads, a 32+8 latent per token, YaRN x4)",
                "minimax_m2": "K=4 by a sigmoid router, no shared expert"}
    for arch, words in expected.items():
        code, out, err = run_cli("info", built.store(arch, 4))
        assert code == 0, err
        assert words in out and flashmoe.load(built.store(arch, 4)).config.architecture in out


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3", "minimax_m2", "gpt_oss"])
def test_generate_chat_renders_the_family_template(run_cli, built, arch):
    code, out, err = run_cli("generate", built.store(arch, 4), "--prompt", "Hello world", "--chat", "--max-tokens", "4")
    assert code == 0, err
    assert "4 tokens" in err or "stop" in err


def test_gpt_oss_chat_is_harmony_and_its_replies_end_at_return(built):
    model = flashmoe.load(built.store("gpt_oss", 4))
    ids = model.encode_chat([{"role": "user", "content": "Hello world"}])
    assert model.tokenizer.decode(ids) == "<|start|>user<|message|>Hello world<|end|><|start|>assistant"
    assert model.eos_token_ids == sorted(model.tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>"]))


def test_a_store_written_before_a_config_field_existed_still_loads(built, tmp_path):
    """Format 1 stores carry the config fields of their day; fields added since (with defaults) may be absent."""
    import json
    import shutil

    import torch

    from flashmoe.manifest import manifest_crc32
    from test_reference import PROMPT

    first = {"architecture", "family", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "partial_rotary_factor", "layer_types",
             "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
             "linear_num_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "shared_expert_intermediate_size", "norm_topk_prob", "tie_word_embeddings", "max_position_embeddings",
             "hidden_act", "dense_layers", "intermediate_size", "eos_token_id"}  # what format 1 wrote at first
    src = built.store("qwen3_5_moe", 4)
    old = tmp_path / "old"
    shutil.copytree(src, old)
    manifest = json.loads((old / "manifest.json").read_text())
    assert set(manifest["config"]) > first  # fields were added since
    manifest["config"] = {k: v for k, v in manifest["config"].items() if k in first}
    manifest["manifest_crc32"] = manifest_crc32(manifest)
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert torch.equal(flashmoe.load(old).logits(PROMPT[:9]), flashmoe.load(src).logits(PROMPT[:9]))


def test_multi_token_prediction_layers_are_left_out_and_said(built, tmp_path, run_cli):
    """GLM-4.5 and DeepSeek-V3 checkpoints carry their MTP module as one more numbered layer: not the text model's."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    src = tmp_path / "ckpt"
    shutil.copytree(built.checkpoint("glm4_moe"), src)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    extra = {f"model.layers.{layers}.eh_proj.weight": torch.zeros(64, 128), f"model.layers.{layers}.enorm.weight": torch.ones(64)}
    save_file(extra, str(src / "mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, "mtp.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out, err = run_cli("convert", src, tmp_path / "store", "--bits", "4")
    assert code == 0, err
    assert "leaving out the multi-token-prediction layers: 2 tensors" in err
    assert flashmoe.load(tmp_path / "store").config.num_hidden_layers == layers


@pytest.mark.parametrize("arch", LAYOUTS)
def test_a_small_expert_cache_holds_its_budget_and_changes_no_answer(built, arch):
    """Every family streams: with room for a fifth of its experts the cache evicts, stays within its bytes, and the
    tokens are those of an uncached run."""
    from test_reference import PROMPT

    store = built.store(arch, 4)
    with flashmoe.load(store, cache_gb=0) as uncached:
        expected = list(uncached.generate(PROMPT[:8], 10, stop_token_ids=[]))
        form = uncached.fetcher.kernel_form  # on the CPU a slot holds an expert in the int4 kernel's form
        budget = uncached.fetcher.every_expert // 5 * (form.slot_bytes if form else uncached.store.expert_blob_bytes)
    with flashmoe.load(store, cache_gb=budget / 1e9) as model:
        assert list(model.generate(PROMPT[:8], 10, stop_token_ids=[])) == expected
        s = model.stats
        assert s["cache_evictions"] > 0 and 0 < s["cache_bytes"] <= budget


# ---- the released checkpoints' config.json files (the keys that matter, as published) --------------------------
REAL_CONFIGS = {
    "Qwen3-235B-A22B": {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
        "max_window_layers": 94, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 1536,
        "norm_topk_prob": True, "num_attention_heads": 64, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 94, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "use_sliding_window": False,
        "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645},
    "Mixtral-8x7B": {
        "architectures": ["MixtralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "vocab_size": 32000},
    "GLM-4.5-Air": {
        "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "first_k_dense_replace": 1, "head_dim": 128,
        "hidden_size": 4096, "intermediate_size": 10944, "max_position_embeddings": 131072,
        "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
        "norm_topk_prob": True, "num_attention_heads": 96, "num_experts_per_tok": 8, "num_hidden_layers": 46,
        "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 1000000, "routed_scaling_factor": 1.0, "tie_word_embeddings": False,
        "topk_group": 1, "use_qk_norm": False, "vocab_size": 151552, "eos_token_id": [151329, 151336, 151338]},
    "DeepSeek-V3": {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
        "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 4,
        "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280},
    "Kimi-K2": {
        "architectures": ["DeepseekV3ForCausalLM"], "first_k_dense_replace": 1, "hidden_size": 7168,
        "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 131072,
        "moe_intermediate_size": 2048, "n_group": 1, "n_routed_experts": 384, "n_shared_experts": 1,
        "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8, "num_hidden_layers": 61,
        "num_key_value_heads": 64, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06, "rope_theta": 50000.0, "rope_scaling": {
            "beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn"}, "routed_scaling_factor": 2.827,
        "topk_group": 1, "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 163840, "eos_token_id": 163585},
    "MiniMax-M2": {
        "architectures": ["MiniMaxM2ForCausalLM"], "head_dim": 128, "hidden_size": 3072, "intermediate_size": 1536,
        "max_position_embeddings": 196608, "num_attention_heads": 48, "num_experts_per_tok": 8,
        "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256, "qk_norm_type": "per_layer",
        "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64, "scoring_func": "sigmoid",
        "shared_intermediate_size": 0, "tie_word_embeddings": False, "use_qk_norm": True, "use_routing_bias": True,
        "vocab_size": 200064},
    "gpt-oss-120b": {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": 200002, "experts_per_token": 4,
        "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
        "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 18,
        "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
        "num_experts_per_tok": 4, "num_hidden_layers": 36, "num_key_value_heads": 8, "num_local_experts": 128,
        "pad_token_id": 199999, "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
        "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                                "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                                "truncate": False},
        "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
        "vocab_size": 201088},
}
# per model: (experts, K, MoE layers, the expert's intermediate size, a word of its `info`)
REAL_SIZES = {"Qwen3-235B-A22B": (128, 8, 94, 1536, "no shared expert"), "Mixtral-8x7B": (8, 2, 32, 14336, "full attention"),
              "GLM-4.5-Air": (128, 8, 45, 1408, "sigmoid router"), "DeepSeek-V3": (256, 8, 58, 2048, "YaRN x40"),
              "Kimi-K2": (384, 8, 60, 2048, "a 512+64 latent"), "MiniMax-M2": (256, 8, 62, 1536, "sigmoid router"),
              "gpt-oss-120b": (128, 4, 36, 2880, "sinks, YaRN x32), 18 of them in a sliding window of 128")}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_the_released_configs_parse_as_their_models_are(name):
    """What a user's download says: its family parses it, the MoE is the published size, and info describes it."""
    from flashmoe.config import ModelConfig

    cfg = ModelConfig.from_hf(REAL_CONFIGS[name])
    experts, k, moe_layers, inter, word = REAL_SIZES[name]
    assert (cfg.num_experts, cfg.num_experts_per_tok, len(cfg.moe_layers), cfg.moe_intermediate_size) == (
        experts, k, moe_layers, inter)
    family = family_of(cfg.architecture)
    assert word in " ".join(text for _, text in family.describe(cfg))
    assert all(all(n > 0 for n in shape) for shape in family.resident_shapes(cfg).values())


def test_released_configs_we_do_not_run_are_refused_in_one_line():
    from flashmoe.config import ModelConfig

    v2 = dict(REAL_CONFIGS["DeepSeek-V3"], topk_method="greedy")  # DeepSeek-V2's router
    with pytest.raises(FlashMoeError, match="topk_method 'greedy' is not supported"):
        ModelConfig.from_hf(v2)
    qwen_yarn = dict(REAL_CONFIGS["Qwen3-235B-A22B"], rope_scaling={"type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 32768})
    with pytest.raises(FlashMoeError, match="rope type 'yarn' is not supported yet"):
        ModelConfig.from_hf(qwen_yarn)
    oss = dict(REAL_CONFIGS["gpt-oss-120b"], layer_types=["sliding_attention", "chunked_attention"] * 18)
    with pytest.raises(FlashMoeError, match="layer_types .* is not one of"):
        ModelConfig.from_hf(oss)


def test_gpt_oss_sink_attention_in_query_blocks_is_the_whole_prompts(built, monkeypatch):
    """A prompt's sink attention runs a block of queries at a time, a sliding layer over the keys the block can see
    only: blocks of 7 (windows of 8 crossing them) give what one block of the whole prompt gives."""
    import torch

    from flashmoe.layers import attention
    from test_reference import PROMPT

    model = flashmoe.load(built.store("gpt_oss", None))
    whole = model.logits(PROMPT)
    monkeypatch.setattr(attention, "SINK_QUERY_BLOCK", 7)
    blocked = model.logits(PROMPT)
    state = model.new_state()
    chunked = torch.cat([model.forward(PROMPT[i : i + 13], state) for i in range(0, len(PROMPT), 13)])
    assert (blocked - whole).abs().max() < 1e-5 and (chunked - whole).abs().max() < 1e-5
