"""AWQ checkpoints (AutoAWQ's GEMM exports, the `-AWQ` releases), packed here by AutoAWQ's own packing code
(qweight_writers.py) and checked against transformers on the float weights they stand for."""

from __future__ import annotations


import pytest
import torch
from conftest import blob_views, edited_copy, first_expert_tensor, load_reference, rel_error, runs_on_the_gpu_as
from qweight_writers import awq_checkpoint
from safetensors.torch import load_file

import flashmoe
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.quant import QuantizedTensor, dequantize
from flashmoe.store import Store

PROMPT = [7, 300, 12, 45, 99, 3, 250, 18, 77, 401, 5, 66, 129, 88, 42]


@pytest.fixture(scope="module")
def exports(built, tmp_path_factory):
    root, done = tmp_path_factory.mktemp("awq"), {}

    def make(arch: str):
        if arch not in done:
            done[arch] = (awq_checkpoint(built.checkpoint(arch), root / arch, root / f"{arch}-float"),
                          root / f"{arch}-float")
        return done[arch]
    return make


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe_vl"])
def test_awq_is_repacked_and_matches_transformers(exports, arch, tmp_path, run_cli):
    folder, reference = exports(arch)
    store = Store(convert(folder, tmp_path / "store"))
    code, out, _ = run_cli("info", store.path)
    assert code == 0 and "4-bit affine, group 32 (AWQ checkpoint, experts repacked)" in out
    q, source = store.manifest["quantization"], store.manifest["source"]
    assert (q["bits"], q["group_size"], q["scale_dtype"]) == (4, 32, "float16")
    assert source["experts"] == "repacked" and source["quantization"]["method"] == "awq"
    attention = next(n for n in store.resident_quantized if n.endswith("self_attn.o_proj.weight"))
    assert store.resident_quantized[attention] == {"bits": 4, "group_size": 32}
    assert not any(n.endswith("mlp.gate.weight") for n in store.resident_quantized)

    # an expert's blob is the weights the export stands for, within the bias's fp16 rounding (2^-11 of it)
    layers = "model.language_model.layers" if arch.endswith("_vl") else "model.layers"
    views = blob_views(store, 2, 7)
    down = QuantizedTensor(views["down.packed"], views["down.scales"], views["down.biases"], 4, 32)
    error = (dequantize(down) - load_file(reference / "model.safetensors")[f"{layers}.2.mlp.experts.7.down_proj.weight"]).abs()
    assert (error <= views["down.biases"].float().abs().repeat_interleave(32, dim=1) * 2 ** -11).all()

    with torch.no_grad():
        expected = load_reference(reference, arch)(torch.tensor([PROMPT])).logits[0]
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), expected) < 1e-2  # the CPU kernels' bf16 activations




@pytest.mark.parametrize("edit_config,edit_tensors,message", [
    (lambda q: q.update(version="gemv"), None, "AWQ version 'gemv' is not read"),
    (lambda q: q.update(bits=8), None, "AWQ at 8 bits is not read"),
    (lambda q: q.update(zero_point=False), None, "without zero points is not read"),
    (lambda q: q.update(group_size=64), None, "does not match the file"),
    (None, lambda t: t.pop(first_expert_tensor(t, ".qzeros")), "has no .*qzeros beside it"),
    (None, lambda t: t.update({first_expert_tensor(t, "qweight"): t[first_expert_tensor(t, "qweight")][:, :2].contiguous()}),
     "does not match the file"),
])
def test_an_awq_checkpoint_we_cannot_read_is_one_clear_line(exports, tmp_path, edit_config, edit_tensors, message):
    copy = edited_copy(exports("qwen3_moe")[0], tmp_path, edit_config, edit_tensors)
    with pytest.raises(FlashMoeError, match=message):
        convert(copy, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.gpu
def test_awq_store_on_the_gpu_matches_transformers(exports, tmp_path):
    """The repacked codes through the GPU's kernels (resident products and the experts', prompt and decode)."""
    folder, reference = exports("qwen3_moe")
    store = convert(folder, tmp_path / "store")
    with torch.no_grad():
        expected = load_reference(reference, "qwen3_moe")(torch.tensor([PROMPT])).logits[0]
    runs_on_the_gpu_as(store, expected, PROMPT)
