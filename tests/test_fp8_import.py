"""FP8 block-scaled checkpoints (DeepSeek / Kimi / Qwen `-FP8` layout: F8_E4M3 weights, F32 weight_scale_inv per
block of config.json's weight_block_size): dequantized as read, checked against transformers on the same dequantized
weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import flashmoe
from conftest import assert_runs_on_the_gpu, blob_views, load_reference, rel_error, weights_elsewhere
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.store import Store

PROMPT = [7, 300, 12, 45, 99, 3, 250, 18, 77, 401, 5, 66, 129, 88, 42, 310, 2, 19, 200, 150]
BLOCK = (32, 48)  # not dividing 64: every matrix has short blocks at its edges


def write_fp8(src, fp8_dir, float_dir, block=BLOCK):
    """The checkpoint as an FP8 release holds it (every projection FP8 with its scale_inv; embeddings, norms, routers
    stay bf16), and the float checkpoint those FP8 weights stand for, for transformers."""
    tensors = weights_elsewhere(src, fp8_dir, float_dir)
    fp8, dense = {}, {}
    for name, w in tensors.items():
        if not name.endswith("_proj.weight"):
            fp8[name] = dense[name] = w
            continue
        rows, cols = w.shape
        padded = torch.zeros(-(-rows // block[0]) * block[0], -(-cols // block[1]) * block[1])
        padded[:rows, :cols] = w.float()
        blocks = padded.view(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
        scale = (blocks.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)
        codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
        fp8[name] = codes.view(padded.shape)[:rows, :cols].contiguous()
        fp8[name + "_scale_inv"] = scale
        # what the FP8 weights stand for, block by block (independently of flashmoe's dequantize_fp8)
        dense[name] = (codes.float() * scale[:, None, :, None]).view(padded.shape)[:rows, :cols].to(torch.bfloat16)
    save_file(fp8, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(dense, str(float_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block), "modules_to_not_convert": ["lm_head", "mlp.gate"]}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    return fp8_dir, float_dir


@pytest.fixture(scope="module")
def fp8_pair(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return write_fp8(built.checkpoint("qwen3_5_moe_vl"), root / "fp8", root / "float")


def test_fp8_checkpoint_matches_transformers_on_its_dequantized_weights(fp8_pair, tmp_path):
    fp8_dir, float_dir = fp8_pair
    store = convert(fp8_dir, tmp_path / "exact", bits=None)
    with torch.no_grad():
        expected = load_reference(float_dir, "qwen3_5_moe_vl")(torch.tensor([PROMPT])).logits[0]
    assert rel_error(flashmoe.load(store).logits(PROMPT), expected) < 1e-3
    source = Store(store).manifest["source"]
    assert source["quantization"] == {"method": "fp8", "weight_block_size": list(BLOCK)}


def test_fp8_experts_quantize_to_bits(fp8_pair, tmp_path):
    fp8_dir, float_dir = fp8_pair
    exact = flashmoe.load(convert(float_dir, tmp_path / "from-float", bits=4)).logits(PROMPT)
    ours = flashmoe.load(convert(fp8_dir, tmp_path / "from-fp8")).logits(PROMPT)
    assert Store(tmp_path / "from-fp8").quantization["bits"] == 4
    assert rel_error(ours, exact) < 1e-2  # the same bf16 weights quantized the same way: only the reads differ


def _with_config(fp8_dir, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(fp8_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    edit(cfg)
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["quantization_config"].update(quant_method="fbgemm_fp8"), "FBGEMM FP8, which flashmoe does not convert yet"),
    (lambda c: c["quantization_config"].update(quant_method="hqq"), "'hqq', which flashmoe does not convert yet"),
    (lambda c: c["quantization_config"].update(quant_method="awq_marlin"), "'awq_marlin'.*does not convert yet"),
    (lambda c: c["quantization_config"].pop("weight_block_size"), "weight_block_size None.*never assumed"),
    (lambda c: c["quantization_config"].update(weight_block_size=[32, 32]), "does not match the file"),
    (lambda c: c.pop("quantization_config"), "no FP8 quantization_config"),
])
def test_an_fp8_checkpoint_we_cannot_read_is_one_clear_line(fp8_pair, tmp_path, edit, message):
    with pytest.raises(FlashMoeError, match=message):
        convert(_with_config(fp8_pair[0], tmp_path, edit), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_fp8_weight_without_its_scales_is_named(fp8_pair, tmp_path):
    copy = _with_config(fp8_pair[0], tmp_path, lambda c: None)
    tensors = load_file(copy / "model.safetensors")
    name = next(n for n in tensors if n.endswith("o_proj.weight"))
    del tensors[name + "_scale_inv"]
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FlashMoeError, match=f"{name} has no {name}_scale_inv"):
        convert(copy, tmp_path / "out")


@pytest.fixture(scope="module")
def fp8_whole_blocks(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-kept")
    return write_fp8(built.checkpoint("qwen3_5_moe"), root / "fp8", root / "float", block=(16, 32))


def test_fp8_experts_kept_as_they_are(fp8_whole_blocks, tmp_path, run_cli):
    fp8_dir, float_dir = fp8_whole_blocks
    code, out, err = run_cli("convert", fp8_dir, tmp_path / "store", "--bits", "fp8")
    assert code == 0, err
    store = Store(tmp_path / "store")
    code, out, _ = run_cli("info", store.path)
    assert "FP8 e4m3, kept as the checkpoint has it (a scale per row per 32 columns) (FP8 checkpoint, experts repacked)" in out
    q = store.manifest["quantization"]
    assert (q["scheme"], q["bits"], q["group_size"], q["scale_dtype"]) == ("fp8", 8, 32, "float32")
    assert store.manifest["source"]["experts"] == "repacked"
    source = load_file(fp8_dir / "model.safetensors")
    views = blob_views(store, 2, 9)
    p = "model.layers.2.mlp.experts.9."
    gate, up = (source[p + x + "_proj.weight"].view(torch.uint8) for x in ("gate", "up"))
    assert torch.equal(views["gate_up.packed"], torch.cat([gate, up]))
    assert torch.equal(views["down.scales"], source[p + "down_proj.weight_scale_inv"].repeat_interleave(16, dim=0))
    with torch.no_grad():
        expected = load_reference(float_dir, "qwen3_5_moe")(torch.tensor([PROMPT])).logits[0]
    # the CPU dequantizes FP8 experts when they run: the same weights transformers has
    assert rel_error(flashmoe.load(store.path, resident_format="float").logits(PROMPT), expected) < 1e-3


def test_bits_fp8_needs_an_fp8_source_with_whole_blocks(built, fp8_pair, tmp_path):
    with pytest.raises(FlashMoeError, match="--bits fp8 keeps an FP8 checkpoint's experts.*not FP8"):
        convert(built.checkpoint("qwen3_5_moe"), tmp_path / "a", bits="fp8")
    with pytest.raises(FlashMoeError, match=r"weight_block_size \[32, 48\] does not divide"):
        convert(fp8_pair[0], tmp_path / "b", bits="fp8")


@pytest.mark.gpu
def test_fp8_experts_on_the_gpu(fp8_whole_blocks, tmp_path):
    fp8_dir, float_dir = fp8_whole_blocks
    store = convert(fp8_dir, tmp_path / "store", bits="fp8")
    with torch.no_grad():
        ref = load_reference(float_dir, "qwen3_5_moe")(torch.tensor([PROMPT])).logits[0]
    assert_runs_on_the_gpu(store, PROMPT, ref)
