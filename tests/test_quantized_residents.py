"""Resident projections quantized at load for the GPU (resident_format int8 / int4: kernels/affine.py's
AffineMatrix, read by the Triton GEMV, the grouped kernel for a batch's rows, dequantized slices for a prompt).
Every family's model takes them in place of its float matrices (checked on the CPU, where AffineMatrix dequantizes
into GEMMs), and on the GPU the graphs and batches give the eager path's answer."""

from __future__ import annotations

import pytest
import torch

import flashmoe
from conftest import ARCHS, rel_error
from flashmoe.kernels.affine import AffineMatrix
from flashmoe.kernels.linear import held_bytes
from flashmoe.store import Store
from test_reference import PROMPT

# logits of a tiny random model against its float residents, at most (4 bits: ~16x the error of 8)
BOUNDS = {8: 0.04, 4: 0.35}  # twice the worst family on the CPU (gpt_oss 0.020, glm4_moe 0.169)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [8, 4])
def test_every_family_runs_on_quantized_resident_matrices(built, arch, bits):
    store = built.store(arch, None)
    with flashmoe.load(store, device="cpu") as model:
        ref = model.logits(PROMPT[:12])
        model.model.compress_matrices(lambda w: AffineMatrix.quantized(w, bits, torch.float32))
        kinds = {type(w).__name__ for w in model.model.w.values()}
        assert "AffineMatrix" in kinds
        assert rel_error(model.logits(PROMPT[:12]), ref) < BOUNDS[bits]


def test_quantizing_a_matrix_a_slice_at_a_time_is_quantizing_it_whole(monkeypatch):
    from flashmoe.quant import quantize

    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr("flashmoe.kernels.affine.QUANTIZE_SLICE_ELEMENTS", 64 * 10)  # 10 rows a slice
    m, whole = AffineMatrix.quantized(w, 4, torch.float32), quantize(w, 4, 32)
    assert torch.equal(m.q.packed, whole.packed) and torch.equal(m.q.scales, whole.scales)
    assert torch.equal(m.q.biases, whole.biases) and m.blob.data_ptr() == m.q.packed.data_ptr()  # one buffer
    assert AffineMatrix.quantized(torch.randn(4, 48), 4, torch.float32).shape == (4, 48)  # 48 % 32: kept float
    assert isinstance(AffineMatrix.quantized(torch.randn(4, 48), 4, torch.float32), torch.Tensor)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_5_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_on_the_gpu_quantized_residents_decode_in_graphs_and_batches_as_eagerly(built, arch, fmt):
    """load(resident_format=...) on a GPU: logits near the float residents'; greedy tokens through the step graphs
    equal the eager path's; a batch of three (its rows through the grouped kernel) each sequence's own."""
    store = built.store(arch, 4)
    float_logits = flashmoe.load(store, device="cuda", dtype=torch.float32).logits(PROMPT[:12])
    model = flashmoe.load(store, device="cuda", dtype=torch.float32, resident_format=fmt)
    assert any(isinstance(w, AffineMatrix) for w in model.model.w.values())
    assert rel_error(model.logits(PROMPT[:12]).cpu(), float_logits.cpu()) < BOUNDS[int(fmt[3:])]
    eager = flashmoe.load(store, device="cuda", dtype=torch.float32, resident_format=fmt, cuda_graphs=False)
    model.warm_cache()
    prompts = [PROMPT[:6], PROMPT[2:9], PROMPT[1:4]]
    want = [list(eager.generate(p, 6, stop_token_ids=[])) for p in prompts]
    assert [list(model.generate(p, 6, stop_token_ids=[])) for p in prompts] == want
    seqs, made = [model.sequence(p, 6, stop_token_ids=[]) for p in prompts], [[] for _ in prompts]
    while not all(s.done for s in seqs):
        for s, out, row in zip(seqs, made, model.step(seqs)):
            out += [t for t in [s.advance(row)] if t is not None]
    for s in seqs:
        s.close()
    assert made == want


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_on_the_gpu_float_residents_wait_in_ram_and_arrive_quantized(built, arch, monkeypatch):
    """A 16 GB GPU cannot hold Qwen3.5-397B's 19.6 GB of bf16 residents even for a moment: with resident_format int4
    every float matrix but the embedding is handed to the quantizer from RAM, and after the load nothing of the model
    is left there (rows the group does not divide, DeepSeek-V3's absorbed kv_b_proj: settle())."""
    handed = []
    quantized = AffineMatrix.quantized.__func__

    def spy(cls, weight, *args, **kwargs):
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            handed.append((weight.device.type, weight.data_ptr()))
        return quantized(cls, weight, *args, **kwargs)

    monkeypatch.setattr(AffineMatrix, "quantized", classmethod(spy))
    model = flashmoe.load(built.store(arch, 4), device="cuda", resident_format="int4")
    embedding = model.model.embed_weight.data_ptr()  # a tied head is quantized from it, where it is
    assert handed and all(device == "cpu" or ptr == embedding for device, ptr in handed)
    forms = list(model.model.w.values()) + [model.model.lm_head, model.model.embed_weight]
    assert {w.device.type for w in forms if w is not None} == {"cuda"}
    assert model.model.embed_weight.dtype == torch.bfloat16  # a lookup table: kept in float
    assert torch.isfinite(model.logits(PROMPT[:8])).all()


def test_the_load_plan_counts_the_residents_as_they_are_held(built):
    """placement()'s resident bytes (printed at load) are what the model holds: float32 on the CPU is twice the bf16
    store, and quantizing at load shrinks them; a quantized matrix's codes, scales and biases (views of one buffer)
    count once."""
    store = built.store("qwen3_5_moe", 4)
    held = {}
    for fmt in ("float", "int8", "int4"):
        with flashmoe.load(store, device="cpu", resident_format=fmt) as model:
            held[fmt] = model.placement()["resident_bytes"]
    assert held["float"] > 1.8 * Store(store).resident_bytes and held["float"] > held["int8"] > held["int4"]
    m = AffineMatrix.quantized(torch.randn(64, 128), 4, torch.float32)
    assert held_bytes([m, m.q]) == m.blob.numel()
