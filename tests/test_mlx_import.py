"""MLX checkpoints (mlx-lm's converter writes them here, as it writes mlx-community's) import without requantizing and
run as mlx-lm runs them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import blob_views, hf_as_mlx_lm_reads_it, mlx_logits, rel_error
from safetensors.torch import load_file

import flashmoe
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.models import qwen3_next
from flashmoe.quant import QuantizedTensor
from flashmoe.sources import hf, mlx
from flashmoe.store import Store

pytest.importorskip("mlx_lm")
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

PROMPT = [5, 17, 99, 3, 250, 41, 7, 300, 12, 88, 61, 400, 2, 9, 33, 120]


def to_torch(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a.astype(mx.float32)))


@pytest.mark.parametrize("arch,bits,group", [("qwen3_5_moe_vl", 4, 32), ("qwen3_next", 4, 64), ("qwen3_5_moe_vl", 8, 64),
                                             ("qwen3_moe", 4, 32), ("mixtral", 8, 64), ("glm4_moe", 4, 64),
                                             ("deepseek_v3", 4, 64), ("minimax_m2", 4, 32),
                                             ("gpt_oss", 4, 32)])
def test_mlx_checkpoint_runs_as_mlx_lm_runs_it(built, arch, bits, group):
    ours = flashmoe.load(built.mlx_store(arch, bits, group)).logits(PROMPT)
    ref = mlx_logits(built.mlx_checkpoint(arch, bits, group), PROMPT)
    # the rest is the CPU kernel's bf16 activations and scale/zero pairs (mlx-lm's own bf16 run is 1.6% off)
    assert rel_error(ours, ref) < 0.01
    # where the top token differs, it is a near tie in mlx-lm's logits too (random models have many)
    picked = ref.gather(1, ours.argmax(-1, keepdim=True))[:, 0]
    assert torch.all(ref.amax(-1) - picked <= 4 * (ours - ref).pow(2).mean().sqrt())


def test_codes_and_scales_are_repacked_not_requantized(built):
    folder = built.mlx_checkpoint("qwen3_5_moe_vl", 4, 32)
    store = Store(built.mlx_store("qwen3_5_moe_vl", 4, 32))
    q = store.manifest["quantization"]
    assert (q["bits"], q["group_size"], q["scale_dtype"]) == (4, 32, "bfloat16")
    assert store.manifest["source"]["experts"] == "repacked"
    quantized = store.resident_quantized
    assert quantized["model.layers.0.mlp.gate.weight"] == {"bits": 8, "group_size": 64}  # mlx-lm's router override
    assert quantized["model.layers.3.self_attn.o_proj.weight"] == {"bits": 4, "group_size": 32}
    assert quantized["model.embed_tokens.weight"] == {"bits": 4, "group_size": 32}
    assert "model.layers.0.linear_attn.conv1d.weight" not in quantized

    weights = mx.load(str(folder / "model.safetensors"))
    layer, expert = 2, 5
    views = blob_views(store, layer, expert)
    p = f"language_model.model.layers.{layer}.mlp.switch_mlp."

    def mlx_bytes(proj: str, part: str) -> torch.Tensor:
        return torch.from_numpy(np.array(weights[p + proj + part][expert].view(mx.uint8)))

    for name, projs in (("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",))):
        for part, field in ((".weight", "packed"), (".scales", "scales"), (".biases", "biases")):
            ours = views[f"{name}.{field}"]
            assert torch.equal(ours.contiguous().view(torch.uint8).flatten(),
                               torch.cat([mlx_bytes(proj, part).flatten() for proj in projs])), (name, field)
    assert views["gate_up.scales"].dtype == torch.bfloat16  # not rounded to float16


def test_gpt_oss_experts_keep_their_codes_and_their_biases(built):
    """mlx-lm's GPT-OSS keeps its experts under `experts.` (not `switch_mlp.`), gate and up split, each with a float
    bias: the blob holds the codes as mlx-lm wrote them and the biases gate first, then up, then down's."""
    folder = built.mlx_checkpoint("gpt_oss", 4, 32)
    store = Store(built.mlx_store("gpt_oss", 4, 32))
    assert store.manifest["source"]["experts"] == "repacked"
    weights = mx.load(str(folder / "model.safetensors"))
    layer, expert = 1, 6
    p = f"model.layers.{layer}.mlp.experts."
    views = blob_views(store, layer, expert)

    def mlx(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(weights[p + name][expert].astype(mx.float32) if name.endswith("bias")
                                         else weights[p + name][expert].view(mx.uint8)))

    assert torch.equal(views["gate_up.packed"].contiguous().view(torch.uint8).flatten(),
                       torch.cat([mlx("gate_proj.weight").flatten(), mlx("up_proj.weight").flatten()]))
    assert torch.equal(views["gate_up.bias"].float(), torch.cat([mlx("gate_proj.bias"), mlx("up_proj.bias")]))
    assert torch.equal(views["down.bias"].float(), mlx("down_proj.bias"))


def test_mlx_mxfp4_checkpoint_keeps_its_codes_and_runs_as_mlx_lm_runs_it(built):
    """mlx-community's `-MXFP4` checkpoints (mlx-lm's q_mode mxfp4: e2m1 codes, uint8 e8m0 scales, no biases; the
    routers affine at 8 bits): the experts' bytes become the store's mxfp4 blobs as they are, the MXFP4 residents
    are dequantized (the affine router stays quantized), and the model runs as mlx-lm runs it."""
    folder = built.mlx_checkpoint("gpt_oss", 4, 32, "mxfp4")
    store = Store(built.mlx_store("gpt_oss", 4, 32, "mxfp4"))
    q = store.manifest["quantization"]
    assert (q["scheme"], q["bits"], q["group_size"]) == ("mxfp4", 4, 32)
    assert store.manifest["source"]["experts"] == "repacked"
    quantized = store.resident_quantized
    assert quantized["model.layers.0.mlp.router.weight"] == {"bits": 8, "group_size": 64}
    assert "model.layers.0.self_attn.o_proj.weight" not in quantized and "lm_head.weight" not in quantized

    weights = mx.load(str(folder / "model.safetensors"))
    layer, expert = 2, 3
    views = blob_views(store, layer, expert)
    p = f"model.layers.{layer}.mlp.experts."
    for name, projs in (("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",))):
        for part, field in ((".weight", "packed"), (".scales", "scales")):
            mlx_bytes = [np.array(weights[p + proj + part][expert].view(mx.uint8)).reshape(-1) for proj in projs]
            assert torch.equal(views[f"{name}.{field}"].contiguous().view(torch.uint8).flatten(),
                               torch.from_numpy(np.concatenate(mlx_bytes))), (name, field)

    ours = flashmoe.load(store.path).logits(PROMPT)
    ref = mlx_logits(folder, PROMPT)
    assert rel_error(ours, ref) < 0.01  # the CPU runs MXFP4 experts as exact 8-bit affine; bf16 activations


@pytest.mark.parametrize("arch", ["qwen3_5_moe_vl", "qwen3_next"])
def test_each_sanitize_change_is_undone(built, arch, tmp_path):
    """mlx-lm's sanitize() on the float checkpoint, then ours backwards: the conv1d layout and the norms' +1 come back
    to the HF tensors (float32 here, so mlx-lm's +1 rounds nothing away)."""
    from mlx_lm import load

    source = hf_as_mlx_lm_reads_it(built.checkpoint(arch), tmp_path / "hf")
    model, _ = load(str(built.mlx_checkpoint(arch, 4, 32)))
    tensors = load_file(source / "model.safetensors")
    original = {hf.canonical_name(k): v.float() for k, v in tensors.items()}
    sanitized = model.sanitize({k: mx.array(v.float().numpy()) for k, v in tensors.items()})
    checked = set()
    for key, value in sanitized.items():
        name = mlx.canonical_name(key)
        if name not in original or ".switch_mlp." in name:
            continue
        back = qwen3_next.from_mlx(name, to_torch(value))
        assert back.shape == original[name].shape, name
        torch.testing.assert_close(back.float(), original[name], rtol=0, atol=1e-6, msg=name)
        checked.add(name.rsplit(".", 2)[-2])
    assert {"conv1d", "input_layernorm", "q_norm", "norm"} <= checked


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_odd_widths_unpack_as_mlx_packs_them(bits):
    w = mx.random.normal((8, 128))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    q = QuantizedTensor(torch.from_numpy(np.array(packed)).view(torch.uint8), to_torch(scales), to_torch(biases), bits, 32)
    ours = mlx.dequantize_any(q, 128, chunk_rows=3)  # slices of rows, the last one short
    assert torch.equal(ours, to_torch(mx.dequantize(packed, scales, biases, group_size=32, bits=bits)))


def test_bits_on_an_mlx_source_needs_requantize(built, run_cli, tmp_path):
    folder = built.mlx_checkpoint("qwen3_5_moe_vl", 4, 32)
    code, out, err = run_cli("convert", folder, tmp_path / "a", "--bits", "8")
    assert code != 0 and "--requantize" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("convert", folder, tmp_path / "b", "--requantize", "--bits", "8")
    assert code == 0, err
    store = Store(tmp_path / "b")
    assert store.quantization["bits"] == 8 and store.manifest["source"]["experts"] == "requantized"
    # 4-bit codes sit on the 8-bit grid of the same range: requantizing loses only the scales' float16 rounding
    ours = flashmoe.load(tmp_path / "b").logits(PROMPT)
    assert rel_error(ours, mlx_logits(folder, PROMPT)) < 0.01


def test_mlx_widths_the_kernels_do_not_read_need_requantize(built, tmp_path):
    folder = built.mlx_checkpoint("qwen3_next", 3, 32)
    with pytest.raises(FlashMoeError, match="3-bit.*--requantize"):
        convert(folder, tmp_path / "a")
    store = convert(folder, tmp_path / "b", requantize=True, bits=8)
    manifest = Store(store).manifest
    # 3-bit resident matrices are dequantized; mlx-lm's 8-bit routers stay quantized
    assert {q["bits"] for q in manifest["resident"]["quantized"].values()} == {8}
    ours = flashmoe.load(store).logits(PROMPT)
    assert rel_error(ours, mlx_logits(folder, PROMPT)) < 0.02


def _edited_copy(folder, tmp_path, edit) -> object:
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "config.json").read_text())
    edit(cfg)
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["quantization"].update(mode="nvfp4"), "mode 'nvfp4' is not supported"),
    (lambda c: c["quantization"].update(mode="mxfp4"), "MLX mxfp4 is 4 bits in groups of 32 .* does not match the file"),
    (lambda c: c["quantization"].update(mode="mxfp8", bits=8), "MLX mxfp8 is 8 bits in groups of 32 with uint8 scales"),
    (lambda c: c["quantization"].update(group_size=64), "does not match the file"),
])
def test_an_mlx_config_we_cannot_read_is_one_clear_line(built, tmp_path, edit, message):
    copy = _edited_copy(built.mlx_checkpoint("qwen3_5_moe_vl", 4, 32), tmp_path, edit)
    with pytest.raises(FlashMoeError, match=message):
        convert(copy, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.gpu
def test_mlx_store_on_the_gpu_runs_as_mlx_lm(built):
    """Quantized residents on the GPU: the Triton matrix-vector kernel for decode (in the CUDA graphs), slices
    dequantized into GEMMs for the prompt; both as mlx-lm's forward pass."""
    arch, bits, group = "qwen3_5_moe_vl", 4, 32
    ref = mlx_logits(built.mlx_checkpoint(arch, bits, group), PROMPT)
    for dtype, bound in ((torch.float32, 0.01), (torch.bfloat16, 0.03)):
        model = flashmoe.load(built.mlx_store(arch, bits, group), device="cuda", dtype=dtype)
        assert rel_error(model.logits(PROMPT).cpu(), ref) < bound
        state = model.new_state()
        parts = [model.forward(PROMPT[:6], state).cpu()] + [model.forward([t], state).cpu() for t in PROMPT[6:]]
        assert rel_error(torch.cat(parts), ref) < bound


@pytest.mark.gpu
def test_mlx_mxfp4_store_on_the_gpu_runs_as_mlx_lm(built):
    """GPT-OSS's MXFP4 experts from an MLX checkpoint through the GPU's expert kernels (e8m0 scales, the clamped
    SwiGLU, expert biases), prompt and decode, as mlx-lm's forward pass."""
    ref = mlx_logits(built.mlx_checkpoint("gpt_oss", 4, 32, "mxfp4"), PROMPT)
    for dtype, bound in ((torch.float32, 0.01), (torch.bfloat16, 0.03)):
        model = flashmoe.load(built.mlx_store("gpt_oss", 4, 32, "mxfp4"), device="cuda", dtype=dtype)
        assert rel_error(model.logits(PROMPT).cpu(), ref) < bound
        state = model.new_state()
        parts = [model.forward(PROMPT[:6], state).cpu()] + [model.forward([t], state).cpu() for t in PROMPT[6:]]
        assert rel_error(torch.cat(parts), ref) < bound


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_mlx_mxfp8_checkpoint_keeps_its_codes_as_fp8_and_runs_as_mlx_lm_runs_it(built, arch):
    """mlx-lm's q_mode mxfp8 (e4m3 codes, a uint8 e8m0 exponent per 32, no biases): the experts' codes become the
    store's fp8 blobs byte for byte, each exponent the float32 scale 2^(e - 127), the residents dequantized; the
    model runs as mlx-lm runs it."""
    folder = built.mlx_checkpoint(arch, 8, 32, "mxfp8")
    store = Store(built.mlx_store(arch, 8, 32, "mxfp8"))
    q = store.manifest["quantization"]
    assert (q["scheme"], q["bits"], q["group_size"]) == ("fp8", 8, 32)
    assert store.manifest["source"]["experts"] == "repacked"

    weights = mx.load(str(folder / "model.safetensors"))
    layer, expert = 1, 3
    views = blob_views(store, layer, expert)
    prefix = next(k for k in weights if k.endswith(f"layers.{layer}.mlp.switch_mlp.down_proj.weight") or
                  k.endswith(f"layers.{layer}.mlp.experts.down_proj.weight")).removesuffix("down_proj.weight")
    codes = np.array(weights[prefix + "down_proj.weight"][expert].view(mx.uint8)).reshape(-1)
    exponents = torch.from_numpy(np.array(weights[prefix + "down_proj.scales"][expert]).astype(np.int32))
    assert torch.equal(views["down.packed"].contiguous().view(torch.uint8).flatten(), torch.from_numpy(codes))
    assert torch.equal(views["down.scales"].float(), torch.ldexp(torch.ones(exponents.shape), exponents - 127))

    # float residents: the CPU's default int8 residents would add their own rounding to the import's
    ours = flashmoe.load(store.path, resident_format="float").logits(PROMPT)
    ref = mlx_logits(folder, PROMPT)
    assert rel_error(ours, ref) < 0.01
