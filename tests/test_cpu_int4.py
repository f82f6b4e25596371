"""The CPU expert path through torch's int4 kernel (where our own kernels are not built): our packing equals torch's
int4 packing op, the kernel form of an expert computes what the store's dequantized expert computes (within the
stated bf16 bounds), and the engine uses it on the CPU."""

from __future__ import annotations

import pytest
import torch

import flashmoe
from flashmoe.convert import expert_tensors
from flashmoe.kernels import cpu_int4, cpu_native
from flashmoe.kernels.moe import expert_weights, swiglu_mlp
from flashmoe.store import BlobLayout

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 23, 84]


@pytest.fixture(autouse=True)
def without_our_kernels(monkeypatch):
    """These tests are of torch's path: what a machine without a C compiler runs (tests/test_cpu_native.py: ours)."""
    monkeypatch.setattr(cpu_native, "library", lambda: None)


@pytest.mark.parametrize("n,k", [(16, 64), (48, 64), (80, 96), (96, 256), (1040, 64), (128, 512)])
def test_packing_matches_torchs_op_and_inverts(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k))
    packed = cpu_int4.int4pack(codes)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
    assert torch.equal(cpu_int4.int4unpack(packed), codes)


def _expert(hidden: int, inter: int, bits: int, group: int, seed: int):
    """A random expert: its float weights, its blob layout, and a slot holding its kernel form."""
    gen = torch.Generator().manual_seed(seed)
    gate_up, down = torch.randn(2 * inter, hidden, generator=gen) * 0.05, torch.randn(hidden, inter, generator=gen) * 0.05
    tensors = expert_tensors(gate_up, down, bits, group)
    layout = BlobLayout.for_tensors(tensors)
    form = cpu_int4.KernelForm.for_store(layout, hidden, inter, bits, group)
    slot = torch.zeros(form.slot_bytes, dtype=torch.uint8)
    slot[: layout.blob_bytes] = torch.frombuffer(bytearray(layout.pack(tensors)), dtype=torch.uint8)
    dequantized = expert_weights(layout.unpack(slot[: layout.blob_bytes].clone()), bits, group, torch.float32)
    form.prepare(slot)
    return (gate_up, down), dequantized, form, slot


# (bits, group, hidden, inter): every group the kernel takes, odd multiples of 16, one and many rows below and above
# the kernel's row limit
SHAPES = [(4, 64, 256, 128), (4, 32, 96, 96), (2, 32, 160, 32), (8, 32, 256, 128), (8, 128, 256, 128), (4, 256, 256, 256)]


@pytest.mark.parametrize("bits,group,hidden,inter", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, cpu_int4.KERNEL_MAX_ROWS + 3])
def test_kernel_form_error_is_small_next_to_the_stores_own(bits, group, hidden, inter, rows):
    exact, dequantized, form, slot = _expert(hidden, inter, bits, group, seed=bits * group + rows)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows))
    reference = swiglu_mlp(x, *dequantized)
    error = lambda y: ((y - reference).norm() / reference.norm()).item()  # noqa: E731
    kernel_error, store_error = error(form.forward(x, slot)), error(swiglu_mlp(x, *exact))
    # the module docstring's claim: under a tenth of the store's error at 2 and 4 bits, under the store's own at 8
    assert kernel_error < (1.0 if bits == 8 else 0.1) * store_error
    assert kernel_error < 0.02


def test_dequantized_kernel_form_is_what_the_kernel_multiplies():
    _, _, form, slot = _expert(256, 64, 8, 32, seed=1)
    views = form.views(slot)
    x = torch.randn(4, 256).bfloat16()
    by_kernel = cpu_int4.linear(x, views, "gate_up", 8, 32).float()
    exact = x.float() @ cpu_int4.dequantize(views, "gate_up", 8, 32).T
    # each half (high and low nibbles) is off by up to a bf16 ulp of its output (2^-8 relative: measured 2^-8.04),
    # then their sum is rounded
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, views["gate_up.int4"], 32, views["gate_up.scale_zero"]).float()
    high, low = y.chunk(2, dim=-1)
    bound = 2**-8 * (high.abs() + low.abs() + exact.abs()) + 1e-6
    assert torch.all((by_kernel - exact).abs() <= bound)
    assert (by_kernel - exact).abs().max() > 0  # bf16 really is in play: the bound is not vacuous


def test_unsupported_shapes_are_refused():
    assert cpu_int4.KernelForm.for_store(None, 96, 40, 4, 32) is None  # 2 * 40 rows: not a multiple of 16
    assert cpu_int4.KernelForm.for_store(None, 96, 48, 4, 16) is None  # group 16: the kernel's blocks start at 32
    assert cpu_int4.KernelForm.for_store(None, 96, 48, None, None) is None  # unquantized store


@pytest.mark.parametrize("arch,bits", [("qwen3_5_moe", 4), ("qwen3_5_moe", 8), ("gpt_oss", 4)])
def test_engine_runs_experts_through_the_kernel_form(built, monkeypatch, arch, bits):
    """(GPT-OSS's experts: their output biases beside the codes, the clamped SwiGLU after the kernel.)"""
    store = built.store(arch, bits)
    with flashmoe.load(store, cache_gb=1) as model:
        assert model.fetcher.kernel_form is not None  # the tiny model's shapes fit the kernel
        ours = model.logits(PROMPT)
        again = model.logits(PROMPT)  # now from the RAM cache, which holds the kernel form
    monkeypatch.setattr(cpu_int4.KernelForm, "for_store", classmethod(lambda *a, **k: None))
    with flashmoe.load(store, cache_gb=1) as dequantizing:
        assert dequantizing.fetcher.kernel_form is None
        reference = dequantizing.logits(PROMPT)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()
    assert torch.equal(ours[-1].argmax(), reference[-1].argmax())


@pytest.mark.parametrize("resident_format,bound", [("bf16", 0.01), ("int8", 0.02), ("int4", 0.3)])
def test_compressed_resident_matrices_stay_close_to_float(built, resident_format, bound):
    store = built.store("qwen3_5_moe", 8)
    with flashmoe.load(store, resident_format="float") as exact:
        reference = exact.logits(PROMPT)
        generated = list(exact.generate(PROMPT, 4))
    with flashmoe.load(store, resident_format=resident_format) as model:
        kinds = {type(w).__name__ for w in model.model.w.values()} | {type(model.model.lm_head).__name__}
        assert kinds >= ({"Bf16Matrix"} if resident_format == "bf16" else {"PackedMatrix"})
        ours = model.logits(PROMPT)  # a prompt: the many-row path
        assert (ours - reference).abs().max() < bound * reference.abs().max()
        if resident_format != "int4":
            assert list(model.generate(PROMPT, 4)) == generated  # one token at a time: the kernel path


def test_quantized_stores_get_the_default_resident_format_on_the_cpu(built):
    with flashmoe.load(built.store("qwen3_5_moe", 4)) as quantized, flashmoe.load(built.store("qwen3_5_moe", None)) as exact:
        assert quantized.resident_format == flashmoe.engine.DEFAULT_CPU_RESIDENT_FORMAT
        assert exact.resident_format == "float"  # an unquantized store stays exact
        assert all(isinstance(w, torch.Tensor) for w in exact.model.w.values())


def test_packed_matrix_keeps_float_where_the_kernel_cannot(built):
    assert cpu_int4.compress_matrix(torch.randn(24, 64), "int8").shape == (24, 64)  # 24 rows: stays a tensor
    assert isinstance(cpu_int4.compress_matrix(torch.randn(24, 64), "int8"), torch.Tensor)
    assert isinstance(cpu_int4.compress_matrix(torch.randn(32, 64), "int8"), cpu_int4.PackedMatrix)


def test_bad_resident_formats_get_one_clear_line(built, run_cli):
    store = built.store("qwen3_5_moe", 4)
    with pytest.raises(flashmoe.FlashMoeError, match="unknown resident format 'int3'; choose one of float, bf16"):
        flashmoe.load(store, resident_format="int3")
    code, out, err = run_cli("generate", str(store), "--prompt", "hi", "--resident-format", "fp8")
    assert code != 0 and "unknown resident format 'fp8'" in err
