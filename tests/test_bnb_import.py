"""bitsandbytes 4-bit checkpoints (the `-bnb-4bit` releases), quantized here by bitsandbytes itself and saved with
the tensor names transformers gives them; checked against transformers on the weights bitsandbytes' own
dequantize_4bit gives back."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import edited_copy, load_reference, rel_error, weights_elsewhere
from safetensors.torch import load_file, save_file

import flashmoe
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.store import Store

bnb_functional = pytest.importorskip("bitsandbytes.functional")

PROMPT = [7, 300, 12, 45, 99, 3, 250, 18, 77, 401, 5, 66, 129, 88, 42]
LINEAR = re.compile(r".*_proj\.weight$")


def bnb_checkpoint(src, dst, reference, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64):
    """quant_type "int8": LLM.int8's (int8_vectorwise_quant: X.weight int8, X.SCB, X.weight_format 0)."""
    """Every Linear of the decoder layers (not the routers, embedding or head) as bitsandbytes' quantize_4bit leaves
    it, under transformers' names (X.weight, X.weight.absmax, ..., X.weight.quant_state.bitsandbytes__nf4); at
    `reference`, the float weights its dequantize_4bit gives back."""
    tensors = weights_elsewhere(src, dst, reference)
    out, ref = {}, {}
    for name, w in tensors.items():
        if not LINEAR.match(name) or w.ndim != 2:
            out[name], ref[name] = w, w
            continue
        if quant_type == "int8":
            codes, scb, _ = bnb_functional.int8_vectorwise_quant(w.to(torch.float16))
            out.update({name: codes, name.removesuffix("weight") + "SCB": scb,
                        name + "_format": torch.tensor(0, dtype=torch.uint8)})
            ref[name] = bnb_functional.int8_vectorwise_dequant(codes, scb).to(torch.bfloat16)
            continue
        q, state = bnb_functional.quantize_4bit(w.to(torch.bfloat16), blocksize=blocksize, quant_type=quant_type,
                                                compress_statistics=double_quant, quant_storage=torch.uint8)
        out[name] = q
        out.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
        ref[name] = bnb_functional.dequantize_4bit(q, state).to(torch.bfloat16)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, str(reference / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": quant_type != "int8",
                                  "load_in_8bit": quant_type == "int8",
                                  "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
                                  "bnb_4bit_compute_dtype": "bfloat16", "llm_int8_skip_modules": None}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("arch,quant_type,double_quant", [("qwen3_moe", "nf4", True), ("qwen3_5_moe_vl", "nf4", False),
                                                          ("qwen3_moe", "fp4", True), ("qwen3_moe", "int8", False)])
def test_bnb_4bit_dequantizes_as_bitsandbytes_does(built, tmp_path, arch, quant_type, double_quant, run_cli):
    folder = bnb_checkpoint(built.checkpoint(arch), tmp_path / "bnb", tmp_path / "float", quant_type, double_quant)
    store = Store(convert(folder, tmp_path / "exact", bits=None))  # float: the weights as dequantized
    code, out, _ = run_cli("info", store.path)
    assert code == 0 and "(bitsandbytes checkpoint, experts dequantized)" in out
    source = store.manifest["source"]
    assert source["quantization"] == {"method": "bitsandbytes", "quant_type": quant_type, "double_quant": double_quant}
    assert source["experts"] == "dequantized"
    # a resident matrix is bit for bit what bitsandbytes' dequantize_4bit gives back (in the checkpoint's bf16)
    resident = store.load_resident(torch.bfloat16)
    reference = load_file(tmp_path / "float" / "model.safetensors")
    o_proj = next(n for n in resident if n.endswith("self_attn.o_proj.weight"))
    assert torch.equal(resident[o_proj], reference[next(k for k in reference if k.endswith(o_proj.removeprefix("model.")))])
    with torch.no_grad():
        expected = load_reference(tmp_path / "float", arch)(torch.tensor([PROMPT])).logits[0]
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), expected) < 1e-3
    # at --bits 4 the experts quantize as from the float weights bitsandbytes gives back
    ours = flashmoe.load(convert(folder, tmp_path / "to-4", bits=4)).logits(PROMPT)
    exact = flashmoe.load(convert(tmp_path / "float", tmp_path / "float-to-4", bits=4)).logits(PROMPT)
    assert rel_error(ours, exact) < 1e-2


@pytest.mark.parametrize("edit_config,edit_tensors,message", [
    (lambda q: q.update(load_in_4bit=False, load_in_8bit=True), None, "is nf4, but config.json says int8"),
    (lambda q: q.update(load_in_4bit=False), None, "loads neither 4 nor 8 bits"),
    (lambda q: q.update(bnb_4bit_quant_type="fp4"), None, "is nf4, but config.json says fp4"),
    (None, lambda t: t.pop(next(k for k in t if k.endswith(".weight.absmax"))), "has no .*absmax beside it"),
])
def test_a_bnb_checkpoint_we_cannot_read_is_one_clear_line(built, tmp_path, edit_config, edit_tensors, message):
    folder = bnb_checkpoint(built.checkpoint("qwen3_moe"), tmp_path / "bnb", tmp_path / "float")
    copy = edited_copy(folder, tmp_path, edit_config, edit_tensors)
    with pytest.raises(FlashMoeError, match=message):
        convert(copy, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_llm_int8_weight_in_a_gpu_tile_layout_is_one_line(built, tmp_path):
    folder = bnb_checkpoint(built.checkpoint("qwen3_moe"), tmp_path / "bnb", tmp_path / "float", "int8", False)

    def tiled(t):
        name = next(k for k in t if k.endswith("weight_format"))
        t[name] = torch.tensor(1, dtype=torch.uint8)
    copy = edited_copy(folder, tmp_path, None, tiled)
    with pytest.raises(FlashMoeError, match="GPU tile layout \\(weight_format 1\\)"):
        convert(copy, tmp_path / "out")
