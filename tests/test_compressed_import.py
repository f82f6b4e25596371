"""compressed-tensors checkpoints (Kimi-K2-Thinking's INT4, llm-compressor's W4A16/W8A16: pack-quantized), written
here by the compressed-tensors library's own compressor and checked against transformers on the weights that
library's own decompressor gives back."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import blob_views, edited_copy, first_expert_tensor, load_reference, rel_error, weights_elsewhere
from safetensors.torch import load_file, save_file

import flashmoe
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.quant import QuantizedTensor, dequantize
from flashmoe.store import Store

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

PROMPT = [7, 300, 12, 45, 99, 3, 250, 18, 77, 401, 5, 66, 129, 88, 42, 310, 2, 19, 200]
EXPERTS = r"re:.*mlp\.experts\..*"
# Kimi-K2-Thinking's scheme for the routed experts; everything else a Linear at 8 bits (a second config group)
KIMI = {"experts": QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32),
        "rest": QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="group", group_size=64)}
LINEAR = re.compile(r".*(_proj|in_proj_\w+)\.weight$")
IGNORED = re.compile(r".*(mlp\.gate|shared_expert_gate|lm_head)\.weight$")  # the routers stay bf16, as Kimi's do


def quantized_linears(src, ct_dir, float_dir, out: dict, dense: dict, fits=lambda w: True):
    """The checkpoint at src copied to ct_dir and float_dir without its weights; each tensor an export leaves as it
    is goes into out and dense, each Linear it quantizes (that `fits` the format) is handed back, (name, weight)."""
    for name, w in weights_elsewhere(src, ct_dir, float_dir).items():
        if not LINEAR.match(name) or IGNORED.match(name) or w.ndim != 2 or not fits(w):
            out[name] = dense[name] = w
            continue
        yield name, w


def write_compressed(src, ct_dir, float_dir, groups: dict[str, QuantizationArgs]):
    """The checkpoint as llm-compressor saves it (every quantized Linear's weight_packed / weight_scale /
    weight_shape, compressed by compressed-tensors itself), and the float checkpoint its decompressor gives back."""
    schemes = {name: QuantizationScheme(targets=[EXPERTS] if name == "experts" else ["Linear"], weights=args)
               for name, args in groups.items()}
    packed, dense = {}, {}
    for name, w in quantized_linears(src, ct_dir, float_dir, packed, dense):
        scheme = schemes["experts" if ".mlp.experts." in name and "experts" in schemes else "rest"]
        args = scheme.weights
        group = args.group_size or w.shape[1]
        g = w.reshape(w.shape[0], -1, group)
        scale, zero_point = calculate_qparams(g.amin(-1), g.amax(-1), args)
        parts = {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}
        out = PackedQuantizationCompressor.compress(parts, scheme)
        base = name.removesuffix("weight")
        packed.update({base + k: v for k, v in out.items()})
        dense[name] = PackedQuantizationCompressor.decompress(out, scheme)["weight"].to(w.dtype)
    save_file(packed, str(ct_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(dense, str(float_dir / "model.safetensors"), metadata={"format": "pt"})
    q = QuantizationConfig(config_groups={f"group_{i}": s for i, s in enumerate(schemes.values())},
                           format="pack-quantized", ignore=["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"],
                           quantization_status="compressed")
    cfg = json.loads((ct_dir / "config.json").read_text())
    cfg["quantization_config"] = q.model_dump()
    (ct_dir / "config.json").write_text(json.dumps(cfg))
    return ct_dir, float_dir


@pytest.fixture(scope="module", params=["qwen3_5_moe_vl", "qwen3_next"])
def kimi_style(request, built, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ct-{request.param}")
    return (request.param, *write_compressed(built.checkpoint(request.param), root / "ct", root / "float", KIMI))


def test_int4_checkpoint_imports_losslessly_and_matches_transformers(kimi_style, tmp_path):
    arch, ct_dir, float_dir = kimi_style
    store = Store(convert(ct_dir, tmp_path / "store"))
    q = store.manifest["quantization"]
    assert (q["bits"], q["group_size"], q["scale_dtype"]) == (4, 32, "bfloat16")
    assert store.manifest["source"]["experts"] == "repacked"
    assert store.manifest["source"]["quantization"]["method"] == "compressed-tensors"
    # the 8-bit group's residents stay quantized; the routers were never quantized
    assert store.resident_quantized["model.layers.3.self_attn.o_proj.weight"] == {"bits": 8, "group_size": 64}
    assert "model.layers.0.mlp.gate.weight" not in store.resident_quantized
    with torch.no_grad():
        expected = load_reference(float_dir, arch)(torch.tensor([PROMPT])).logits[0]
    # the same weights, dequantized by flashmoe's kernels instead of compressed-tensors: only float rounding differs
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), expected) < 1e-2


def test_int4_expert_bytes_are_the_sources_codes(kimi_style, tmp_path):
    arch, ct_dir, float_dir = kimi_style
    store = Store(convert(ct_dir, tmp_path / "store"))
    source = load_file(ct_dir / "model.safetensors")
    layer, expert = 1, 11
    prefix = f"model.{'language_model.' if arch.endswith('_vl') else ''}layers.{layer}.mlp.experts.{expert}."
    tensors = blob_views(store, layer, expert)
    gate, up = (source[prefix + p + "_proj.weight_packed"].view(torch.uint8) for p in ("gate", "up"))
    assert torch.equal(tensors["gate_up.packed"].flatten(), torch.cat([gate, up]).flatten())
    scale = source[prefix + "down_proj.weight_scale"]
    assert torch.equal(tensors["down.scales"], scale)
    assert torch.equal(tensors["down.biases"], -8 * scale)  # bias = -8 * scale: exact in bf16
    # so the blob stands for exactly compressed-tensors' weights ((q - 8) * scale, which it rounds to bf16)
    ours = dequantize(QuantizedTensor(tensors["down.packed"], tensors["down.scales"], tensors["down.biases"], 4, 32))
    assert torch.equal(ours.to(torch.bfloat16), load_file(float_dir / "model.safetensors")[prefix + "down_proj.weight"])


def test_asymmetric_checkpoint_is_dequantized_then_quantized(built, tmp_path):
    asym = {"experts": QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32),
            "rest": QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="channel")}
    ct_dir, float_dir = write_compressed(built.checkpoint("qwen3_5_moe_vl"), tmp_path / "ct", tmp_path / "float", asym)
    store = Store(convert(ct_dir, tmp_path / "store"))
    assert store.manifest["source"]["experts"] == "requantized"
    assert not store.resident_quantized  # zero points cannot be held exactly: dequantized as read
    exact = flashmoe.load(convert(float_dir, tmp_path / "from-float")).logits(PROMPT)
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), exact) < 1e-2  # the same weights, the same requantization




@pytest.mark.parametrize("edit_config,edit_tensors,message", [
    (lambda q: q.update(format="marlin-24"), None, "format 'marlin-24' is not supported yet"),
    (lambda q: q.update(format="nvfp4-pack-quantized"), None, "nvfp4-pack-quantized checkpoint is not 4-bit float"),
    (lambda q: q.update(format="float-quantized"), None, "float-quantized checkpoint quantizes weights as 'int' 4-bit"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"), None, "reads integer weights"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"), None, "activation-ordered"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=64), None, "does not match the file"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"}), None,
     "also quantizes activations"),
    (lambda q: q["config_groups"]["group_1"].update(targets=["re:nothing"]), None, "no config_groups entry targets it"),
    (None, lambda t: t.pop(first_expert_tensor(t, "weight_scale")), "has no .*weight_scale beside it"),
    (None, lambda t: t.update({first_expert_tensor(t, "weight_packed"): t[first_expert_tensor(t, "weight_packed")][:, :4].contiguous()}),
     "does not match the file"),
])
def test_a_compressed_checkpoint_we_cannot_read_is_one_clear_line(kimi_style, tmp_path, edit_config, edit_tensors,
                                                                  message):
    _, ct_dir, _ = kimi_style
    with pytest.raises(FlashMoeError, match=message):
        convert(edited_copy(ct_dir, tmp_path, edit_config, edit_tensors), tmp_path / "store")


def test_bits_on_an_int4_source_needs_requantize(kimi_style, tmp_path):
    _, ct_dir, _ = kimi_style
    with pytest.raises(FlashMoeError, match="compressed-tensors checkpoint whose experts are 4-bit.*--requantize"):
        convert(ct_dir, tmp_path / "store", bits=8)
    store = Store(convert(ct_dir, tmp_path / "again", bits=8, requantize=True))
    assert (store.quantization["bits"], store.manifest["source"]["experts"]) == (8, "requantized")


def save_export(ct_dir, float_dir, out: dict, dense: dict, scheme: QuantizationScheme, fmt: str):
    """An export's tensors and its decompressed float twin written, config.json's quantization_config as
    compressed-tensors writes it for one scheme in format `fmt`."""
    save_file(out, str(ct_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(dense, str(float_dir / "model.safetensors"), metadata={"format": "pt"})
    q = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt,
                           ignore=["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"],
                           quantization_status="compressed")
    cfg = json.loads((ct_dir / "config.json").read_text())
    cfg["quantization_config"] = q.model_dump()
    (ct_dir / "config.json").write_text(json.dumps(cfg))
    return ct_dir, float_dir


def write_fp8(src, ct_dir, float_dir, args: QuantizationArgs):
    """The checkpoint as llm-compressor saves an FP8 W8A8 export (format float-quantized: every quantized Linear's
    e4m3 weight and weight_scale, compressed by compressed-tensors itself; activations dynamic per token), and the
    float checkpoint its decompressor gives back."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor

    tokens = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=tokens)
    out, dense = {}, {}
    for name, w in quantized_linears(src, ct_dir, float_dir, out, dense):
        if args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        elif args.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        else:
            br, bc = args.block_structure  # the last blocks of a small matrix are short: padded with zeros here
            rows, cols = -(-w.shape[0] // br) * br, -(-w.shape[1] // bc) * bc
            g = torch.nn.functional.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0])).reshape(
                rows // br, br, cols // bc, bc)
            lo, hi = g.amin((1, 3)), g.amax((1, 3))
        scale, zero_point = calculate_qparams(lo, hi, args)
        parts = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale,
                                                      "weight_zero_point": zero_point}, scheme)
        out.update({name.removesuffix("weight") + k: v for k, v in parts.items()})
        dense[name] = FloatQuantizationCompressor.decompress(parts, scheme)["weight"].to(w.dtype)
    return save_export(ct_dir, float_dir, out, dense, scheme, "float-quantized")


FP8_STRATEGIES = {"channel": QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True),
                  "tensor": QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True),
                  "block": QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[16, 32],
                                            symmetric=True)}


@pytest.mark.parametrize("strategy", FP8_STRATEGIES)
def test_fp8_float_quantized_checkpoint_dequantizes_as_read(built, tmp_path, strategy):
    """llm-compressor's FP8 exports (the `-FP8-dynamic` releases): each weight dequantized by its channel's, the
    tensor's or its block's scale as it is read; kept float it is compressed-tensors' own decompressed weight, the
    model then transformers' on it; at --bits 4 the experts quantize as from that float checkpoint. The activation
    quantization is not applied (float activations)."""
    arch = "qwen3_5_moe_vl"
    ct_dir, float_dir = write_fp8(built.checkpoint(arch), tmp_path / "ct", tmp_path / "float", FP8_STRATEGIES[strategy])
    store = Store(convert(ct_dir, tmp_path / "exact", bits=None))
    source = store.manifest["source"]
    assert source["quantization"]["format"] == "float-quantized" and source["quantization"]["strategy"] == strategy
    assert source["experts"] == "dequantized"
    with torch.no_grad():
        expected = load_reference(float_dir, arch)(torch.tensor([PROMPT])).logits[0]
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), expected) < 1e-3
    ours = flashmoe.load(convert(ct_dir, tmp_path / "fp8-to-4", bits=4)).logits(PROMPT)
    exact = flashmoe.load(convert(float_dir, tmp_path / "float-to-4", bits=4)).logits(PROMPT)
    assert rel_error(ours, exact) < 1e-2  # the same weights quantized the same way: only the reads differ


def test_an_fp8_scale_that_does_not_cover_its_weight_is_one_line(built, tmp_path):
    ct_dir, _ = write_fp8(built.checkpoint("qwen3_5_moe_vl"), tmp_path / "ct", tmp_path / "float",
                          FP8_STRATEGIES["channel"])
    copy = edited_copy(ct_dir, tmp_path, lambda q: q["config_groups"]["group_0"]["weights"].update(
        strategy="block", block_structure=[16, 16]), None)
    with pytest.raises(FlashMoeError, match=r"weight_scale is \[\d+, 1\], but .* in blocks of \[16, 16\]"):
        convert(copy, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def write_nvfp4(src, ct_dir, float_dir):
    """The checkpoint as llm-compressor saves an NVFP4 export (nvfp4-pack-quantized: every quantized Linear's e2m1
    codes, e4m3 scales per 16 and global scale, compressed by compressed-tensors itself), and the float checkpoint its
    decompressor gives back."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    out, dense = {}, {}
    for name, w in quantized_linears(src, ct_dir, float_dir, out, dense, fits=lambda w: w.shape[1] % 16 == 0):
        global_scale = generate_gparam(w.float().amin().reshape(1), w.float().amax().reshape(1))
        g = w.float().reshape(w.shape[0], -1, 16)
        scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=global_scale)
        parts = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": global_scale},
                                               scheme)
        out.update({name.removesuffix("weight") + k: v for k, v in parts.items()})
        dense[name] = NVFP4PackedCompressor.decompress(parts, scheme)["weight"].to(w.dtype)
    return save_export(ct_dir, float_dir, out, dense, scheme, "nvfp4-pack-quantized")


def test_nvfp4_checkpoint_dequantizes_as_read(built, tmp_path):
    """llm-compressor's NVFP4 exports: e2m1 codes x e4m3 scale / global scale, dequantized as read (kept float, the
    model is transformers' on compressed-tensors' own decompressed weights); at --bits 8 the experts quantize as from
    those float weights."""
    arch = "qwen3_5_moe_vl"
    ct_dir, float_dir = write_nvfp4(built.checkpoint(arch), tmp_path / "ct", tmp_path / "float")
    assert any(k.endswith("weight_global_scale") for k in load_file(ct_dir / "model.safetensors"))
    store = Store(convert(ct_dir, tmp_path / "exact", bits=None))
    source = store.manifest["source"]
    assert source["quantization"]["format"] == "nvfp4-pack-quantized" and source["experts"] == "requantized"
    assert not store.resident_quantized
    with torch.no_grad():
        expected = load_reference(float_dir, arch)(torch.tensor([PROMPT])).logits[0]
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), expected) < 1e-3
    ours = flashmoe.load(convert(ct_dir, tmp_path / "nvfp4-to-8", bits=8)).logits(PROMPT)
    exact = flashmoe.load(convert(float_dir, tmp_path / "float-to-8", bits=8)).logits(PROMPT)
    assert rel_error(ours, exact) < 1e-2
