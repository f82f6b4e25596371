"""GGUF files (llama.cpp's format) convert: written here by llama.cpp's own convert_hf_to_gguf.py, re-typed with the
gguf package's quantizers, and checked against the checkpoint they came from and against transformers' own GGUF
loader on the same file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import re

import numpy as np
import pytest
import torch
from conftest import GGUF_LAYOUTS, assert_runs_on_the_gpu, blob_views, rel_error

import flashmoe
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.quant import QuantizedTensor, dequantize
from flashmoe.store import Store

gguf = pytest.importorskip("gguf")
PROMPT = [5, 17, 99, 3, 250, 41, 7, 300, 12, 88, 61, 400, 2, 9]
ARCH = "qwen3_5_moe"  # llama.cpp's qwen35moe
WIDE = {"hidden_size": 256, "moe_intermediate_size": 256}


def hf_logits(folder, gguf_file=None) -> torch.Tensor:
    """transformers' forward pass in float32: on the HF checkpoint, or through its own GGUF loader."""
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


def retype(src, dst, types: dict[str, "gguf.GGMLQuantizationType"]):
    """A copy of a GGUF with the tensors whose names match a pattern quantized by the gguf package (llama.cpp's
    Python quantizers), metadata copied as it is: the mixed types a Q4_K_M-style file has."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = np.array(t.data)
        qtype = next((q for pattern, q in types.items() if re.search(pattern, t.name)), None)
        if qtype is None or t.tensor_type != gguf.GGMLQuantizationType.F32 or data.ndim < 2:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
            continue
        k_quant = qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K)
        blocks = random_blocks(qtype)(data) if k_quant else gguf.quants.quantize(data, qtype)
        writer.add_tensor(t.name, blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_llama_cpp_gpt_oss_gguf_is_the_checkpoint_it_came_from(built, tmp_path):
    """GPT-OSS as llama.cpp writes it: the experts' alternating gate/up split into ffn_gate_exps and ffn_up_exps, their
    biases beside them, sinks, the router's bias. The file holds no clamp (llama.cpp fixes it at 7, as released), so
    the checkpoint here has the released clamp too."""
    store = convert(built.gguf("gpt_oss", "f32", swiglu_limit=7.0), tmp_path / "store", bits=None)
    assert Store(store).config.swiglu_limit == 7.0 and Store(store).config.layer_types[:2] == [
        "sliding_attention", "full_attention"]
    assert rel_error(flashmoe.load(store).logits(PROMPT), hf_logits(built.checkpoint("gpt_oss", swiglu_limit=7.0))) < 1e-4
    quantized = convert(built.gguf("gpt_oss", "f32", swiglu_limit=7.0), tmp_path / "q4", bits=4)
    assert rel_error(flashmoe.load(quantized).logits(PROMPT), hf_logits(built.checkpoint("gpt_oss", swiglu_limit=7.0))) < 0.1


def test_ggml_mxfp4_blocks_repack_to_what_gguf_py_reads():
    from gguf import GGMLQuantizationType, quants

    from flashmoe import mxfp4
    from flashmoe.sources.ggml_blocks import repack_mxfp4

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (18, 17), dtype=torch.uint8, generator=g)  # 6 rows of 96 weights
    raw[:, 0] = torch.randint(110, 140, (18,), dtype=torch.uint8, generator=g)
    q = repack_mxfp4(raw.reshape(-1), 6, 96)
    expected = torch.from_numpy(quants.dequantize(raw.numpy().reshape(6, -1), GGMLQuantizationType.MXFP4))
    assert torch.equal(mxfp4.dequantize(q.packed, q.scales), expected.float())


def test_llama_cpp_mxfp4_gpt_oss_gguf_keeps_its_codes(built, tmp_path):
    """The release's MXFP4 experts through llama.cpp's converter (its MXFP4 blocks) and back: the same codes and
    scales as the checkpoint's, gate rows first, and transformers' answer on the weights they stand for."""
    from test_mxfp4 import write_gpt_oss_mxfp4

    llama = os.environ.get("FLASHMOE_LLAMA_CPP")
    if not llama or not os.path.isfile(os.path.join(llama, "convert_hf_to_gguf.py")):
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not at $FLASHMOE_LLAMA_CPP")
    mx, _ = write_gpt_oss_mxfp4(built.checkpoint("gpt_oss", swiglu_limit=7.0), tmp_path / "mx", tmp_path / "float")
    gguf = tmp_path / "gguf" / "tiny-mxfp4.gguf"
    gguf.parent.mkdir()
    tool = os.path.join(os.path.dirname(__file__), "tools", "llama_convert.py")
    done = subprocess.run([sys.executable, tool, llama, str(tmp_path / "mx"), str(gguf), "f32"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    store = Store(convert(gguf, tmp_path / "store"))
    q = store.manifest["quantization"]
    source = store.manifest["source"]
    assert q["scheme"] == "mxfp4" and "requantized_from" not in source
    assert source["repacked_from"] == {"MXFP4": 3 * len(store.config.moe_layers)}  # gate, up, down of each layer
    views = blob_views(store, 2, 3)
    codes = mx["model.layers.2.mlp.experts.gate_up_proj_blocks"][3]
    codes = codes.reshape(codes.shape[0], -1)
    scales = mx["model.layers.2.mlp.experts.gate_up_proj_scales"][3]
    assert torch.equal(views["gate_up.packed"], torch.cat([codes[0::2], codes[1::2]]))
    assert torch.equal(views["gate_up.scales"], torch.cat([scales[0::2], scales[1::2]]))
    expected = hf_logits(tmp_path / "float")
    assert rel_error(flashmoe.load(store.path, resident_format="float").logits(PROMPT), expected) < 1e-2


@pytest.mark.parametrize("arch", GGUF_LAYOUTS)
def test_llama_cpp_f32_gguf_is_the_checkpoint_it_came_from(built, tmp_path, arch):
    """Every name and every change llama.cpp's converter makes (norms + 1, -exp(A_log), conv1d squeezed, Qwen3.5's
    value heads tiled, Qwen3-Next's qkvz split and ba kept, Mixtral's q and k rows permuted as a Llama's) undone:
    unquantized, the store runs the original."""
    store = convert(built.gguf(arch, "f32"), tmp_path / "store", bits=None)
    assert rel_error(flashmoe.load(store).logits(PROMPT), hf_logits(built.checkpoint(arch))) < 1e-4
    source = Store(store).manifest["source"]
    experts = 3 * len(Store(store).config.moe_layers)  # gate, up and down of each MoE layer
    assert (source["format"], source["experts"], source["requantized_from"]) == ("gguf", "dequantized", {"F32": experts})


def expert_weights(store: Store, layer: int, expert: int) -> torch.Tensor:
    """An expert blob's down projection as the store's kernels read it, dequantized."""
    views = blob_views(store, layer, expert)
    q = store.quantization
    return dequantize(QuantizedTensor(views["down.packed"], views["down.scales"], views["down.biases"], q["bits"],
                                      q["group_size"]))


def gguf_expert(path, name: str, expert: int) -> torch.Tensor:
    """One expert of a GGUF tensor, dequantized by transformers' GGUF integration."""
    from transformers.integrations.gguf.dequant import dequantize as ggml_dequantize

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    rows = torch.from_numpy(np.array(t.data[expert]))
    return ggml_dequantize(rows.reshape(-1), int(t.tensor_type)).reshape(int(t.shape[1]), int(t.shape[0]))


def test_q8_0_gguf_experts_are_repacked_not_requantized(built, tmp_path):
    path = built.gguf(ARCH, "q8_0")
    store = Store(convert(path, tmp_path / "store"))
    assert (store.quantization["bits"], store.quantization["group_size"]) == (8, 32)
    source = store.manifest["source"]
    assert (source["experts"], source["repacked_from"], "requantized_from" in source) == ("repacked", {"Q8_0": 12}, False)
    # Q8_0 is 8-bit affine in groups of 32 already: the blob holds exactly the file's weights
    assert torch.equal(expert_weights(store, 2, 5), gguf_expert(path, "blk.2.ffn_down_exps.weight", 5))
    # so are its Q8_0 residents, which stay quantized, rows moved as llama.cpp moved them (value heads); not
    # out_proj, whose columns it moved, nor the F32 norms and routers
    kept = store.resident_quantized
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.linear_attn.in_proj_qkv.weight",
                 "model.layers.0.linear_attn.in_proj_z.weight", "model.layers.3.self_attn.q_proj.weight"):
        assert kept[name] == {"bits": 8, "group_size": 32}, name
    assert "model.layers.0.linear_attn.out_proj.weight" not in kept and "model.layers.0.mlp.gate.weight" not in kept
    assert rel_error(flashmoe.load(store.path).logits(PROMPT), hf_logits(path.parent, path.name)) < 1e-2
    with pytest.raises(FlashMoeError, match="GGUF checkpoint whose experts are 8-bit.*--requantize"):
        convert(path, tmp_path / "again", bits=4)


def test_requantizing_a_gguf_costs_what_quantizing_the_original_costs(built, tmp_path):
    path = built.gguf(ARCH, "q8_0")
    store = Store(convert(path, tmp_path / "store", bits=4, requantize=True))
    assert (store.quantization["bits"], store.manifest["source"]["requantized_from"]) == (4, {"Q8_0": 12})
    ours = flashmoe.load(store.path).logits(PROMPT)
    four_bit = rel_error(flashmoe.load(built.store(ARCH, 4)).logits(PROMPT), hf_logits(built.checkpoint(ARCH)))
    assert rel_error(ours, hf_logits(path.parent, path.name)) < 1.5 * four_bit


def random_blocks(qtype):
    """A quantizer for retype() writing random but valid blocks of a type gguf-py cannot quantize to (the K-quants):
    random codes and 6-bit scales, small fp16 super-block scales."""
    g = np.random.default_rng(0)
    size = gguf.GGML_QUANT_SIZES[qtype]
    half = {gguf.GGMLQuantizationType.Q4_K: (0, 2), gguf.GGMLQuantizationType.Q6_K: (208,)}[qtype]

    def write(data: np.ndarray) -> np.ndarray:
        blocks = g.integers(0, 256, (data.size // size[0], size[1]), dtype=np.uint8)
        for at in half:
            blocks[:, at:at + 2] = (g.random((len(blocks), 1)) * 1e-4 + 1e-4).astype(np.float16).view(np.uint8)
        return blocks.reshape(*data.shape[:-1], data.shape[-1] // size[0] * size[1])
    return write


@pytest.mark.parametrize("types,repacked,requantized", [
    ({r"ffn_(gate|up)_exps": gguf.GGMLQuantizationType.Q4_0, r"ffn_down_exps": gguf.GGMLQuantizationType.Q4_1,
      r"token_embd|attn_qkv": gguf.GGMLQuantizationType.Q8_0}, {"Q4_0": 8, "Q4_1": 4}, None),
    ({r"_exps": gguf.GGMLQuantizationType.Q4_K}, {"Q4_K": 12}, None),
    # Q4_K_M's mixture: Q4_K experts repacked, the Q6_K down projections quantized into the same scheme
    ({r"ffn_(gate|up)_exps": gguf.GGMLQuantizationType.Q4_K, r"blk\.[02]\.ffn_down_exps": gguf.GGMLQuantizationType.Q6_K,
      r"ffn_down_exps": gguf.GGMLQuantizationType.Q4_K}, {"Q4_K": 10}, {"Q6_K": 2}),
])
def test_4_bit_block_types_are_repacked_and_match_transformers_gguf_loader(built, tmp_path, types, repacked,
                                                                          requantized):
    # rows of 256: a K-quant block is 256 weights
    path = retype(built.gguf(ARCH, "f32", **WIDE), tmp_path / "mixed.gguf", types)
    store = Store(convert(path, tmp_path / "store"))
    source = store.manifest["source"]
    assert (store.quantization["bits"], store.quantization["group_size"]) == (4, 32)
    assert (source["repacked_from"], source.get("requantized_from")) == (repacked, requantized)
    name = "blk.1.ffn_down_exps.weight"
    expected = gguf_expert(path, name, 3)
    ours = expert_weights(store, 1, 3)
    # Q4_0/Q4_1 exactly; Q4_K's sub-block scales (fp16 x 6-bit) rounded to fp16: a relative 2^-11 of a step
    assert (ours - expected).abs().max() <= 2 ** -10 * expected.abs().max()
    if requantized:  # a Q6_K projection, quantized into the store's scheme: within half a step of its grid
        name = "blk.0.ffn_down_exps.weight"
        expected = gguf_expert(path, name, 3).reshape(-1, 32)
        step = (expected.amax(1, keepdim=True) - expected.amin(1, keepdim=True)) / 15
        ours = expert_weights(store, 0, 3).reshape(-1, 32)
        # half a step, plus the bf16 the file's weights are read into and the fp16 of the new scale and bias
        bound = 0.5 * step + 2 ** -8 * expected.abs() + 16 * 2 ** -11 * step + 2 ** -11 * expected.abs().amax(1, True)
        assert torch.all((ours - expected).abs() <= bound)
        return
    # residents in float (the CPU default quantizes a quantized store's to int8): the rest is bf16 activations
    reference = hf_logits(tmp_path, path.name)
    assert rel_error(flashmoe.load(store.path, resident_format="float").logits(PROMPT), reference) < 1.5e-2


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_the_store_carries_the_gguf_tokenizer_and_config(built, tmp_path, arch):
    from transformers import AutoTokenizer

    store = convert(built.gguf(arch, "q8_0"), tmp_path / "store")
    text = "hello world, <|im_start|>user\nhi<|im_end|>"
    ours, original = AutoTokenizer.from_pretrained(str(store)), AutoTokenizer.from_pretrained(str(built.checkpoint(arch)))
    assert ours(text)["input_ids"] == original(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert flashmoe.load(store).encode_chat(messages) == original.apply_chat_template(messages, add_generation_prompt=True,
                                                                                        tokenize=True)["input_ids"]
    config = json.loads((store / "config.json").read_text())
    assert config["architectures"] == json.loads((built.checkpoint(arch) / "config.json").read_text())["architectures"]
    assert config["num_experts"] == 16


def test_a_gguf_we_cannot_read_is_one_clear_line(built, tmp_path, run_cli):
    path = built.gguf(ARCH, "q8_0")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FlashMoeError, match="truncated.*download it again"):
        convert(truncated, tmp_path / "a")
    with pytest.raises(FlashMoeError, match="--requantize is for quantized sources"):  # F32 experts
        convert(built.gguf(ARCH, "f32"), tmp_path / "b", requantize=True)
    other = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(other), arch="falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, out, err = run_cli("convert", other, tmp_path / "c")
    assert code != 0 and "'falcon', which flashmoe does not read; it reads qwen35moe" in err
    q5 = retype(built.gguf(ARCH, "f32"), tmp_path / "q5.gguf", {r"_exps": gguf.GGMLQuantizationType.Q5_1})
    with pytest.raises(FlashMoeError, match="ggml type 7, which is not supported yet"):  # transformers reads no Q5_x
        convert(q5, tmp_path / "e")
    split = tmp_path / "split"
    split.mkdir()
    (split / "model-00001-of-00002.gguf").write_bytes(path.read_bytes())
    with pytest.raises(FlashMoeError, match="lacks model-00002-of-00002.gguf"):
        convert(split, tmp_path / "d")


def test_large_tensors_dequantize_a_slice_of_rows_at_a_time(built, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from flashmoe.sources import gguf as gguf_source

    path = built.gguf(ARCH, "q8_0")
    whole = convert(path, tmp_path / "whole")
    monkeypatch.setattr(gguf_source, "CHUNK_BYTES", 100)  # 1 row of 68 bytes at a time (64 Q8_0 weights)
    sliced = convert(path, tmp_path / "sliced")
    for f in Store(whole).manifest["resident"]["files"]:
        a, b = load_file(whole / f), load_file(sliced / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_gguf_store_on_the_gpu(built, tmp_path):
    """Q8_0 experts and residents repacked (fp16 scales, 8 bits): the expert kernels and the resident matrix-vector
    kernel on the GPU against transformers' GGUF loader."""
    path = built.gguf(ARCH, "q8_0")
    store = convert(path, tmp_path / "store")
    assert Store(store).resident_quantized
    assert_runs_on_the_gpu(store, PROMPT, hf_logits(path.parent, path.name))


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3", "minimax_m2"])
def test_q8_0_gguf_of_the_plain_families_keeps_its_codes(built, tmp_path, arch, monkeypatch):
    """Qwen3-MoE (`qwen3moe`), Mixtral (a `llama` with experts), GLM-4.5 (`glm4moe`) and DeepSeek-V3 (`deepseek2`):
    Q8_0 experts repacked, Q8_0 residents kept quantized (Mixtral's permuted q/k rows moved back as they are;
    DeepSeek's split kv_b_proj put back together, in float)."""
    path = built.gguf(arch, "q8_0")
    store = Store(convert(path, tmp_path / "store"))
    assert store.manifest["source"]["repacked_from"] == {"Q8_0": 3 * len(store.config.moe_layers)}
    kept = store.resident_quantized
    matrix = "kv_a_proj_with_mqa" if arch == "deepseek_v3" else "k_proj"
    assert kept["model.layers.1.self_attn.o_proj.weight"] == kept[f"model.layers.1.self_attn.{matrix}.weight"] == {
        "bits": 8, "group_size": 32}
    # against transformers running the file's own weights, dequantized by the gguf package (Q8_0 of every matrix
    # moves these random models' logits by ~2% from the bf16 checkpoint's; that is the file's, not ours). In float
    # here, residents and experts dequantized once (the CPU's int4 kernel computes in bf16: tests/test_cpu_int4.py)
    from flashmoe.kernels import cpu_int4, cpu_native

    monkeypatch.setattr(cpu_int4.PackedMatrix, "from_quantized", staticmethod(lambda q: None))
    monkeypatch.setattr(cpu_int4.KernelForm, "for_store", classmethod(lambda *a, **k: None))
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    ours = flashmoe.load(store.path, resident_format="float").logits(PROMPT)
    assert rel_error(ours, logits_of_gguf_weights(built.checkpoint(arch), path, store.config)) < 1e-4


def logits_of_gguf_weights(checkpoint, path, cfg) -> torch.Tensor:
    """transformers' model of `checkpoint` in float32 with every weight replaced by the GGUF's, dequantized by the
    gguf package (llama.cpp's Python dequantizers) and named back with the family's map."""
    from transformers import AutoModelForCausalLM

    from flashmoe.models import family_of_gguf

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    family = family_of_gguf(gguf.GGUFReader(str(path)).fields["general.architecture"].contents())
    state, experts, kv_b = model.state_dict(), {}, {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type).copy()).float()
        layer, _, short = t.name.partition(".")[2].partition(".") if t.name.startswith("blk.") else (None, None, None)
        if layer is None:
            name = family.GGUF_NAMES[t.name]
        elif short.startswith("ffn_") and "_exps" in short:
            experts.setdefault(int(layer), {})[short.split("_")[1]] = w
            continue
        elif short in ("attn_k_b.weight", "attn_v_b.weight"):  # DeepSeek's kv_b_proj, split per head
            kv_b.setdefault(int(layer), {})[short] = w
            continue
        else:
            name = f"model.layers.{layer}." + family.GGUF_LAYER_NAMES[short]
        state[name.replace("block_sparse_moe.", "mlp.")].copy_(family.from_gguf(cfg, name, w).reshape(
            state[name.replace("block_sparse_moe.", "mlp.")].shape))
    for layer, parts in kv_b.items():  # [H, rank, nope] transposed and [H, v, rank] -> [H * (nope + v), rank]
        k_b, v_b = parts["attn_k_b.weight"], parts["attn_v_b.weight"]
        # the store holds this merge in bf16, as every block-typed GGUF tensor that cannot stay quantized
        state[f"model.layers.{layer}.self_attn.kv_b_proj.weight"].copy_(
            torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1]).bfloat16())
    for layer, parts in experts.items():
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"].copy_(torch.cat([parts["gate"], parts["up"]], dim=1))
        state[f"model.layers.{layer}.mlp.experts.down_proj"].copy_(parts["down"])
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


def test_a_dense_llama_gguf_is_refused_in_one_line(built, tmp_path):
    reader = gguf.GGUFReader(str(built.gguf("mixtral", "f32")))
    dense = tmp_path / "dense.gguf"
    writer = gguf.GGUFWriter(str(dense), arch="llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or "expert" in name:
            continue
        vtype = field.types[0]
        writer.add_key_value(name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if "exps" not in t.name and "gate_inp" not in t.name:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FlashMoeError, match="^this GGUF is a dense llama model; flashmoe runs Mixture-of-Experts"):
        convert(dense, tmp_path / "store")
