"""MXFP4 (GPT-OSS's expert format): e2m1 codes with e8m0 scales per 32, kept as they are in a store of scheme
"mxfp4"; checked against transformers' own MXFP4 dequantizer and, end to end, against transformers on the weights
the MXFP4 experts stand for."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_runs_on_the_gpu, blob_views, load_reference, rel_error, weights_elsewhere
from safetensors.torch import load_file, save_file

import flashmoe
from flashmoe import mxfp4
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.store import Store
from flashmoe.tiny import split_experts

PROMPT = [7, 300, 12, 45, 99, 3, 250, 18, 77, 401, 5, 66, 129, 88, 42, 310, 2, 19, 200]


def transformers_dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """transformers' MXFP4 dequantizer (integrations/mxfp4.py) on one [rows, cols] matrix, in GPT-OSS's block layout."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks = packed.reshape(1, packed.shape[0], -1, 16)
    return convert_moe_packed_tensors(blocks, scales[None], dtype=torch.float32)[0].t()  # it returns [E, in, out]


def test_codes_and_scales_mean_what_transformers_reads():
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (24, 64), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 135, (24, 4), dtype=torch.uint8, generator=g)
    assert torch.equal(mxfp4.dequantize(packed, scales), transformers_dequantize(packed, scales))


def test_quantize_rounds_to_the_nearest_e2m1_value_of_the_group_scale():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    packed, scales = mxfp4.quantize(w)
    back = mxfp4.dequantize(packed, scales)
    scale = mxfp4.scale_values(scales).repeat_interleave(32, dim=1)
    # the group's largest weight lands in [4, 8) x scale (above 6 it is clamped to 6); e2m1's grid is 0.5 apart
    # below 2, 1 below 4, 2 above: each weight is within half its spacing of the grid
    a = w.abs() / scale
    half_step = 0.5 * torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)) * scale
    assert torch.all((back - w).abs() <= torch.maximum(half_step, (w.abs() - 6 * scale).clamp(min=0)) + 1e-6)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(back)), back)  # what is on the grid stays where it is


def test_as_affine8_is_exact():
    from flashmoe.quant import dequantize

    g = torch.Generator().manual_seed(2)
    packed = torch.randint(0, 256, (8, 32), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (8, 2), dtype=torch.uint8, generator=g)
    assert torch.equal(dequantize(mxfp4.as_affine8(packed, scales)), mxfp4.dequantize(packed, scales))
    # every code, at the smallest, the unit and the largest scale the docstring promises
    every = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    for s in (0, 1, 127, 248):
        scale = torch.full((4, 4), s, dtype=torch.uint8)
        assert torch.equal(dequantize(mxfp4.as_affine8(every, scale)), mxfp4.dequantize(every, scale)), s


def write_mxfp4(src, mx_dir, float_dir):
    """The checkpoint with its routed experts in GPT-OSS's MXFP4 layout (fused `experts.gate_up_proj_blocks`
    [E, 2I, H/32, 16] + `_scales` [E, 2I, H/32], down likewise), and the float checkpoint they stand for."""
    tensors = weights_elsewhere(src, mx_dir, float_dir)
    rest, experts = split_experts(tensors)
    mx, dense = dict(rest), dict(rest)
    for prefix, (gate_ups, downs) in experts.items():
        for fused, ws in (("gate_up_proj", gate_ups), ("down_proj", downs)):
            parts = [mxfp4.quantize(w) for w in ws]
            blocks = torch.stack([p.reshape(p.shape[0], -1, 16) for p, _ in parts])
            scales = torch.stack([s for _, s in parts])
            mx[f"{prefix}.mlp.experts.{fused}_blocks"], mx[f"{prefix}.mlp.experts.{fused}_scales"] = blocks, scales
            for e, (p, s) in enumerate(parts):  # what transformers' dequantizer makes of them, per expert again
                w = transformers_dequantize(p, s).to(torch.bfloat16)
                rows = w.shape[0] // 2
                if fused == "gate_up_proj":
                    dense[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = w[:rows].contiguous()
                    dense[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = w[rows:].contiguous()
                else:
                    dense[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = w.contiguous()
    save_file(mx, str(mx_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(dense, str(float_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((mx_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                      "model.layers.*.mlp.gate", "lm_head"]}
    (mx_dir / "config.json").write_text(json.dumps(cfg))
    return mx_dir, float_dir


@pytest.fixture(scope="module")
def mx_pair(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    return write_mxfp4(built.checkpoint("qwen3_5_moe"), root / "mx", root / "float")


def test_mxfp4_experts_are_kept_as_they_are_and_match_transformers(mx_pair, tmp_path):
    mx_dir, float_dir = mx_pair
    store = Store(convert(mx_dir, tmp_path / "store"))
    q = store.manifest["quantization"]
    assert (q["scheme"], q["bits"], q["group_size"], q["scale_dtype"]) == ("mxfp4", 4, 32, "e8m0")
    assert store.manifest["source"]["experts"] == "repacked"
    source = load_file(mx_dir / "model.safetensors")
    views = blob_views(store, 1, 6)
    blocks = source["model.layers.1.mlp.experts.down_proj_blocks"][6]
    assert torch.equal(views["down.packed"], blocks.reshape(blocks.shape[0], -1))
    assert torch.equal(views["down.scales"], source["model.layers.1.mlp.experts.down_proj_scales"][6])
    assert "down.biases" not in views
    with torch.no_grad():
        expected = load_reference(float_dir, "qwen3_5_moe")(torch.tensor([PROMPT])).logits[0]
    # the CPU runs MXFP4 experts as the 8-bit affine matrices they equal; the rest is bf16 activations
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), expected) < 1e-2


def test_mxfp4_requantized_on_request_and_bad_files_named(mx_pair, tmp_path):
    mx_dir, _ = mx_pair
    with pytest.raises(FlashMoeError, match="MXFP4 checkpoint whose experts are 4-bit.*--requantize"):
        convert(mx_dir, tmp_path / "a", bits=4)
    store = Store(convert(mx_dir, tmp_path / "b", bits=4, requantize=True))
    assert (store.manifest["quantization"]["scheme"], store.manifest["source"]["experts"]) == ("affine", "requantized")
    broken = tmp_path / "broken"
    tensors = weights_elsewhere(mx_dir, broken)
    tensors.pop("model.layers.0.mlp.experts.down_proj_scales")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FlashMoeError, match="down_proj_blocks has no .*down_proj_scales beside it"):
        convert(broken, tmp_path / "c")


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(bits=8), "quantization.scheme.*'mxfp4' .bits 4, group 32."),
    (lambda q: q.update(scheme="affine"), "quantization.scale_dtype: is 'e8m0' in a store of scheme 'affine'"),
])
def test_a_store_claiming_another_scheme_is_refused(mx_pair, tmp_path, edit, message):
    import shutil

    from flashmoe.manifest import manifest_crc32

    store = convert(mx_pair[0], tmp_path / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest["quantization"])
    manifest["manifest_crc32"] = manifest_crc32(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FlashMoeError, match=message):
        Store(store)
    shutil.rmtree(store)


@pytest.mark.gpu
def test_mxfp4_store_on_the_gpu(mx_pair, tmp_path):
    """The expert kernels decode e2m1 and e8m0 themselves: prompt (grouped kernels) and decode (matrix-vector kernels
    in the CUDA graphs) against transformers."""
    mx_dir, float_dir = mx_pair
    store = convert(mx_dir, tmp_path / "store")
    with torch.no_grad():
        ref = load_reference(float_dir, "qwen3_5_moe")(torch.tensor([PROMPT])).logits[0]
    assert_runs_on_the_gpu(store, PROMPT, ref)


def write_gpt_oss_mxfp4(src, mx_dir, float_dir) -> tuple[dict, dict]:
    """A GPT-OSS checkpoint as released (experts MXFP4 [E, 2I, H/32, 16], gate and up rows alternating, bf16 biases)
    and the float one its codes stand for (transformers' layout, [E, H, 2I]); returns (the MXFP4 tensors, the
    source's)."""
    tensors = weights_elsewhere(src, mx_dir, float_dir)
    mx, dense = {}, {}
    for name, t in tensors.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            mx[name] = dense[name] = t
            continue
        parts = [mxfp4.quantize(w.t().float()) for w in t]  # per expert, rows = outputs
        mx[name + "_blocks"] = torch.stack([p.reshape(p.shape[0], -1, 16) for p, _ in parts])
        mx[name + "_scales"] = torch.stack([s for _, s in parts])
        dense[name] = torch.stack([transformers_dequantize(p, s).t() for p, s in parts]).to(t.dtype)
    save_file(mx, str(mx_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(dense, str(float_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((mx_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (mx_dir / "config.json").write_text(json.dumps(cfg))
    return mx, tensors


def test_gpt_oss_release_layout_converts_with_its_codes_and_matches_transformers(built, tmp_path):
    """GPT-OSS as released: MXFP4 experts [E, 2I, H/32, 16] whose gate and up rows alternate, bf16 biases beside them.
    The store keeps the codes (rows reordered, gate first) and answers as transformers does on the weights they
    stand for (its own float layout: [E, H, 2I], columns alternating)."""
    mx_dir, float_dir = tmp_path / "mx", tmp_path / "float"
    mx, tensors = write_gpt_oss_mxfp4(built.checkpoint("gpt_oss"), mx_dir, float_dir)
    store = Store(convert(mx_dir, tmp_path / "store"))
    assert store.manifest["quantization"]["scheme"] == "mxfp4" and store.manifest["source"]["experts"] == "repacked"
    views = blob_views(store, 1, 5)
    blocks, inter = mx["model.layers.1.mlp.experts.gate_up_proj_blocks"][5], store.config.moe_intermediate_size
    codes = blocks.reshape(blocks.shape[0], -1)
    assert torch.equal(views["gate_up.packed"], torch.cat([codes[0::2], codes[1::2]]))  # the source's bytes, gate first
    bias = tensors["model.layers.1.mlp.experts.gate_up_proj_bias"][5].float()
    assert torch.equal(views["gate_up.bias"], torch.cat([bias[0::2], bias[1::2]])) and views["gate_up.bias"].shape == (2 * inter,)
    with torch.no_grad():
        expected = load_reference(float_dir, "gpt_oss")(torch.tensor([PROMPT])).logits[0]
    assert rel_error(flashmoe.load(store.path, resident_format="float").logits(PROMPT), expected) < 1e-2


@pytest.mark.gpu
def test_gpt_oss_mxfp4_release_on_the_gpu(built, tmp_path):
    """GPT-OSS's own MXFP4 experts (its biases and clamped SwiGLU beside the e2m1 codes) through the GPU's expert
    kernels, prompt and decode, against transformers on the weights they stand for."""
    mx_dir, float_dir = tmp_path / "mx", tmp_path / "float"
    write_gpt_oss_mxfp4(built.checkpoint("gpt_oss"), mx_dir, float_dir)
    store = convert(mx_dir, tmp_path / "store")
    with torch.no_grad():
        ref = load_reference(float_dir, "gpt_oss")(torch.tensor([PROMPT])).logits[0]
    assert_runs_on_the_gpu(store, PROMPT, ref)
