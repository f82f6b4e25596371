"""GPTQ checkpoints (AutoGPTQ / GPTQModel exports: the `-GPTQ-Int4` / `-Int8` releases), packed here by AutoGPTQ's own
packing code (qweight_writers.py) and checked against transformers on the float weights they stand for."""

from __future__ import annotations


import pytest
import torch
from conftest import blob_views, edited_copy, first_expert_tensor, load_reference, rel_error, runs_on_the_gpu_as
from qweight_writers import gptq_checkpoint
from safetensors.torch import load_file

import flashmoe
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.quant import QuantizedTensor, dequantize
from flashmoe.store import Store

PROMPT = [7, 300, 12, 45, 99, 3, 250, 18, 77, 401, 5, 66, 129, 88, 42]
REPACKED = {"int4": dict(bits=4, group_size=32), "int8 per channel": dict(bits=8, group_size=-1),
            "int4 in quantize_config.json": dict(bits=4, group_size=32, quantize_config_json=True),
            "int4 gptq_v2": dict(bits=4, group_size=64, checkpoint_format="gptq_v2"),
            "int4 asymmetric": dict(bits=4, group_size=32, sym=False)}


@pytest.fixture(scope="module")
def exports(built, tmp_path_factory):
    """(arch, kind) -> (GPTQ folder, its float reference), made once."""
    root, done = tmp_path_factory.mktemp("gptq"), {}

    def make(arch: str, kind: str, **args):
        if (arch, kind) not in done:
            tag = f"{arch}-{kind.replace(' ', '-')}"
            done[arch, kind] = (gptq_checkpoint(built.checkpoint(arch), root / tag, root / f"{tag}-float", **args),
                                root / f"{tag}-float")
        return done[arch, kind]
    return make


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe_vl"])
@pytest.mark.parametrize("kind", REPACKED)
def test_gptq_in_input_order_is_repacked_and_matches_transformers(exports, arch, kind, tmp_path, run_cli):
    args = REPACKED[kind]
    folder, reference = exports(arch, kind, **args)
    store = Store(convert(folder, tmp_path / "store"))
    code, out, _ = run_cli("info", store.path)
    assert code == 0 and "(GPTQ checkpoint, experts repacked)" in out
    q, source = store.manifest["quantization"], store.manifest["source"]
    float_weights = load_file(reference / "model.safetensors")
    layers = "model.language_model.layers" if arch.endswith("_vl") else "model.layers"
    attention = next(n for n in store.resident_quantized if n.endswith("self_attn.o_proj.weight"))
    # per channel (-1): one group over each matrix's inputs (the tiny experts' 64; attention's output projection 128)
    inputs = float_weights[attention.replace("model.layers", layers)].shape[1]
    group, attention_group = (64, inputs) if args["group_size"] == -1 else (args["group_size"],) * 2
    assert (q["bits"], q["group_size"], q["scale_dtype"]) == (args["bits"], group, "float16")
    assert source["experts"] == "repacked" and source["quantization"]["method"] == "gptq"
    # the attention and shared-expert matrices stay quantized; the routers were never quantized
    assert store.resident_quantized[attention] == {"bits": args["bits"], "group_size": attention_group}
    assert not any(n.endswith("mlp.gate.weight") for n in store.resident_quantized)

    # an expert's blob is the weights the export stands for: codes transposed into rows, bias -zero x scale; exactly
    # for symmetric zeros (2^(bits-1): a power of two), else within the bias's fp16 rounding (2^-11 of it)
    views = blob_views(store, 1, 5)
    down = QuantizedTensor(views["down.packed"], views["down.scales"], views["down.biases"], args["bits"], group)
    error = (dequantize(down) - float_weights[f"{layers}.1.mlp.experts.5.down_proj.weight"]).abs()
    if args.get("sym", True):
        assert error.max() == 0
    else:
        bound = views["down.biases"].float().abs().repeat_interleave(group, dim=1) * 2 ** -11
        assert (error <= bound).all() and error.max() > 0

    with torch.no_grad():
        expected = load_reference(reference, arch)(torch.tensor([PROMPT])).logits[0]
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), expected) < 1e-2  # the CPU kernels' bf16 activations


@pytest.mark.parametrize("kind,args", [("activation order", dict(bits=4, group_size=32, desc_act=True)),
                                       ("2-bit", dict(bits=2, group_size=32))])
def test_what_cannot_be_kept_is_dequantized_then_quantized(exports, kind, args, tmp_path):
    """Inputs in activation order (g_idx) and 2-bit codes: read as the float weights they stand for, the experts
    quantized to --bits as a float source's would be."""
    folder, reference = exports("qwen3_moe", kind, **args)
    store = Store(convert(folder, tmp_path / "store"))
    assert store.manifest["source"]["experts"] == "requantized" and not store.resident_quantized
    from_float = flashmoe.load(convert(reference, tmp_path / "from-float")).logits(PROMPT)
    # the same weights (dequantized to the scales' fp16 here, float32 there), the same requantization
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), from_float) < 1e-2




# GPTQModel's per-module settings: attention at 8 bits in groups of 64 but layer 0's output projection left float
# (the "-:" rule comes first, so it wins); with the down projections at 8 bits too, the experts mix two schemes
DYNAMIC = {r"-:.*layers\.0\.self_attn\.o_proj": {}, r"+:.*self_attn\..*": {"bits": 8, "group_size": 64}}
DOWN_AT_8 = {**DYNAMIC, r".*down_proj": {"bits": 8, "group_size": 64, "damp_percent": 0.05}}


def test_gptqmodel_dynamic_rules_give_modules_their_own_scheme(exports, tmp_path):
    folder, reference = exports("qwen3_moe", "dynamic", bits=4, group_size=32, dynamic=DYNAMIC)
    store = Store(convert(folder, tmp_path / "store"))
    assert store.manifest["source"]["experts"] == "repacked"  # the experts' 4 bits in 32s, as the defaults say
    kept = store.resident_quantized
    assert kept["model.layers.1.self_attn.o_proj.weight"] == {"bits": 8, "group_size": 64}
    assert "model.layers.0.self_attn.o_proj.weight" not in kept  # float in the file, float in the store
    assert any(n.startswith("model.layers.0.self_attn.") and kept[n] == {"bits": 8, "group_size": 64} for n in kept)
    with torch.no_grad():
        expected = load_reference(reference, "qwen3_moe")(torch.tensor([PROMPT])).logits[0]
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), expected) < 1e-2

    # gate/up at 4 bits and down at 8: one blob cannot keep both; refused in one line naming --requantize, and with
    # it the experts are the float weights they stand for, quantized as a float source's
    folder, reference = exports("qwen3_moe", "dynamic, down at 8 bits", bits=4, group_size=32, dynamic=DOWN_AT_8)
    with pytest.raises(FlashMoeError, match="experts differ in quantization.*--requantize"):
        convert(folder, tmp_path / "mixed")
    store = Store(convert(folder, tmp_path / "mixed", bits=4, requantize=True))
    assert store.manifest["source"]["experts"] == "requantized"
    assert store.resident_quantized["model.layers.1.self_attn.o_proj.weight"] == {"bits": 8, "group_size": 64}
    from_float = flashmoe.load(convert(reference, tmp_path / "from-float", bits=4)).logits(PROMPT)
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), from_float) < 1e-2


@pytest.mark.parametrize("source,edit_config,edit_tensors,message", [
    ("int4", lambda q: q.update(checkpoint_format="marlin"), None, "checkpoint_format 'marlin' is not read"),
    ("int4", lambda q: q.update(bits=3), None, "GPTQ at 3 bits is not read"),
    ("int4", lambda q: q.update(group_size=64), None, "does not match the file"),
    ("int4", None, lambda t: t.pop(first_expert_tensor(t, ".scales")), "has no .*scales beside it"),
    ("int4", None, lambda t: t.update({first_expert_tensor(t, "qweight"): t[first_expert_tensor(t, "qweight")][:4].contiguous()}),
     "does not match the file"),
    ("int4 asymmetric", lambda q: q.update(sym=True), None, "its zeros are not 8, though config.json says sym true"),
    ("activation order", lambda q: q.update(desc_act=False), None, "its g_idx is not the input order"),
    ("int4", lambda q: q.update(dynamic={r"-:.*experts\.3\.up_proj": {}}), None,
     "dynamic rules leave model.layers.0.mlp.experts.3.up_proj unquantized, but the file holds its qweight"),
    ("int4", lambda q: q.update(dynamic={r".*down_proj": {"bits": 3}}), None, r"dynamic rule '.\*down_proj'.*3 bits"),
    ("int4", lambda q: q.update(dynamic={"(unclosed": {}}), None, "dynamic rule '\\(unclosed' is not a regular"),
])
def test_a_gptq_checkpoint_we_cannot_read_is_one_clear_line(exports, tmp_path, source, edit_config, edit_tensors,
                                                            message):
    args = {"int4": REPACKED["int4"], "int4 asymmetric": REPACKED["int4 asymmetric"],
            "activation order": dict(bits=4, group_size=32, desc_act=True)}[source]
    copy = edited_copy(exports("qwen3_moe", source, **args)[0], tmp_path, edit_config, edit_tensors)
    with pytest.raises(FlashMoeError, match=message):
        convert(copy, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.gpu
def test_gptq_store_on_the_gpu_matches_transformers(exports, tmp_path):
    """The repacked codes through the GPU's kernels (resident products and the experts', prompt and decode)."""
    folder, reference = exports("qwen3_moe", "int4", **REPACKED["int4"])
    store = convert(folder, tmp_path / "store")
    with torch.no_grad():
        expected = load_reference(reference, "qwen3_moe")(torch.tensor([PROMPT])).logits[0]
    runs_on_the_gpu_as(store, expected, PROMPT)
