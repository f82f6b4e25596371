"""Our CPU kernels (kernels/cpu_native.c): with float activations they compute exactly what the store's codes hold
(float32 products of the dequantized weights, to float rounding); with activations rounded to int8 (the default
where the CPU has VNNI) they add an error bounded against the store's own; on odd shapes and every code width and
scale type they take, the same on any number of threads. The engine uses them on the CPU and falls back to torch's
kernels, saying so once, where they cannot be built."""

from __future__ import annotations

import platform

import pytest
import torch

import flashmoe
from flashmoe.kernels import cpu_native
from flashmoe.kernels.moe import ExpertMath, routed_experts, swiglu_mlp
from flashmoe.quant import dequantize, quantize
from flashmoe.store import BlobLayout

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 23, 84]

pytestmark = pytest.mark.skipif(cpu_native.library() is None, reason="no C compiler to build the CPU kernels")


def _error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y - reference).norm() / reference.norm()).item()


def _close(y: torch.Tensor, reference: torch.Tensor, rel: float = 1e-5) -> None:
    assert _error(y, reference) < rel


# int8 activations: ~0.5% of the product, measured (the rounding of x per 32 inputs, 1/254 of the block's largest)
INT8_ERROR = 0.012


def _has_vnni() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = next((line.split() for line in f if line.startswith("flags")), [])
    return {"avx512_vnni", "avx512bw"} <= set(flags)


@pytest.fixture(params=["float", "int8"])
def activations(request, monkeypatch):
    """(conftest.py keeps the other tests on float activations.)"""
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", request.param == "int8")
    if request.param == "int8" and not cpu_native.int8_activations():
        pytest.skip("this CPU has no AVX-512 VNNI: the kernels keep float activations")
    return request.param


def test_a_cpu_with_vnni_gets_the_int8_kernels(monkeypatch):
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", True)  # the default outside the tests (conftest.py)
    assert cpu_native.int8_activations() == _has_vnni()


@pytest.fixture
def float_activations(monkeypatch):
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", False)


# (bits, group, rows, inputs): every code width, the smallest and larger groups each takes, row counts that leave
# a remainder after the kernel's blocks of 4 and 16 rows
MATRICES = [(4, 32, 13, 96), (4, 64, 48, 256), (4, 128, 61, 384), (8, 16, 7, 80), (8, 32, 33, 256), (8, 64, 16, 128),
            (2, 8, 19, 72), (2, 32, 40, 128)]


@pytest.mark.parametrize("bits,group,rows,inputs", MATRICES)
@pytest.mark.parametrize("scales", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, cpu_native.KERNEL_MAX_ROWS + 2, cpu_native.KERNEL_MAX_ROWS_INT8 + 1])
def test_matrix_product_is_the_dequantized_one(bits, group, rows, inputs, scales, tokens, activations, monkeypatch):
    monkeypatch.setattr(cpu_native, "matrix_units", lambda: False)  # our kernel (the matrix units: the test below)
    gen = torch.Generator().manual_seed(bits * 1000 + group + rows)
    w = torch.randn(rows, inputs, generator=gen)
    q = quantize(w, bits, group)
    q.scales, q.biases = q.scales.to(scales), q.biases.to(scales)  # an MLX import's residents carry bf16 ones
    matrix = cpu_native.NativeMatrix.from_quantized(q)
    x = torch.randn(tokens, inputs, generator=gen)
    y, reference = matrix(x), x @ dequantize(q).T
    if activations == "float":
        _close(y, reference)
    else:  # next to the store's own error: a tenth of it at 4 bits or fewer, about it at 8 (1.1-1.4x measured)
        assert _error(y, reference) < min(INT8_ERROR, (2.0 if bits == 8 else 0.15) * _error(x @ w.T, reference))


@pytest.mark.parametrize("bits,group,rows,inputs", [(4, 32, 13, 96), (4, 128, 21, 384), (8, 32, 33, 256),
                                                     (8, 64, 16, 128)])
def test_a_prompt_gets_the_bits_its_tokens_get_one_at_a_time(bits, group, rows, inputs, activations):
    """A prompt's tokens in one call get the bits each gets alone: a prompt and its decode agree exactly, whatever
    blocking of rows or tokens the kernels use (remainders of their blocks included)."""
    gen = torch.Generator().manual_seed(rows)
    matrix = cpu_native.NativeMatrix.from_quantized(quantize(torch.randn(rows, inputs, generator=gen), bits, group))
    x = torch.randn(11, inputs, generator=gen)
    assert torch.equal(matrix(x), torch.cat([matrix(x[i : i + 1]) for i in range(len(x))]))


@pytest.mark.parametrize("bits,group,rows,inputs", MATRICES)
@pytest.mark.parametrize("scales", [torch.float16, torch.bfloat16])
def test_a_matrix_dequantized_to_bf16_is_torchs(bits, group, rows, inputs, scales):
    gen = torch.Generator().manual_seed(bits + group + rows)
    q = quantize(torch.randn(rows, inputs, generator=gen), bits, group)
    q.scales, q.biases = q.scales.to(scales), q.biases.to(scales)
    matrix = cpu_native.NativeMatrix.from_quantized(q)
    w = torch.empty(rows, inputs, dtype=torch.bfloat16)
    cpu_native.library().fm_dequant_bf16(matrix.matrix, None, w.data_ptr(), 2)
    assert torch.equal(w, dequantize(q).to(torch.bfloat16))


def test_a_prompt_goes_to_the_matrix_units_in_bf16(monkeypatch):
    """With AMX (or forced here), a resident product of many rows is a bf16 one: within bf16's rounding of the
    dequantized product; fewer rows, or exact activations asked for, keep our kernel."""
    monkeypatch.setattr(cpu_native, "matrix_units", lambda: True)
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", True)  # (conftest.py asks for exact ones: see the end)
    gen = torch.Generator().manual_seed(5)
    q = quantize(torch.randn(40, 256, generator=gen), 4, 32)
    matrix = cpu_native.NativeMatrix.from_quantized(q)
    calls = []
    real = cpu_native.F.linear
    monkeypatch.setattr(cpu_native.F, "linear", lambda x, w: calls.append(w.dtype) or real(x, w))
    x = torch.randn(cpu_native.MATRIX_UNIT_ROWS, 256, generator=gen)
    y, reference = matrix(x), x @ dequantize(q).T
    assert calls == [torch.bfloat16] and y.dtype == torch.float32
    assert _error(y, reference) < 0.01  # bf16 inputs: ~2^-9 each
    matrix(x[:-1])
    assert calls == [torch.bfloat16]  # one row fewer: our kernel
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", False)  # FLASHMOE_CPU_ACTIVATIONS=float: exact, no bf16
    cpu_native.NativeMatrix.from_quantized(q)(x)
    assert calls == [torch.bfloat16]


def test_the_matrix_units_are_used_where_torch_has_them_unless_turned_off(monkeypatch):
    monkeypatch.delenv("FLASHMOE_CPU_AMX", raising=False)
    amx = torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()
    fast_bf16 = amx or torch.cpu._is_avx512_bf16_supported()
    assert cpu_native.matrix_units.__wrapped__() == (fast_bf16 and cpu_native.library() is not None)
    monkeypatch.setenv("FLASHMOE_CPU_AMX", "0")
    assert cpu_native.matrix_units.__wrapped__() is False


def test_matrices_the_kernels_cannot_read_are_refused():
    assert cpu_native.NativeMatrix.from_float(torch.randn(16, 48), 4, 16) is None  # 4-bit groups step by 32 inputs
    assert cpu_native.NativeMatrix.from_float(torch.randn(16, 96), 8, 64) is None  # groups must divide the inputs
    q = quantize(torch.randn(16, 64), 4, 32)
    q.biases = None  # MXFP4: no biases
    assert cpu_native.NativeMatrix.from_quantized(q) is None


def _experts(n: int, hidden: int, inter: int, bits: int, group: int, math: ExpertMath, seed: int):
    """n random experts as store blobs (with GPT-OSS's output biases when `math` has them), and their dequantized
    weights."""
    gen = torch.Generator().manual_seed(seed)
    blobs, weights = [], []
    for _ in range(n):
        tensors = {}
        for name, shape in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
            q = quantize(torch.randn(*shape, generator=gen) * 0.1, bits, group)
            tensors.update({f"{name}.packed": q.packed, f"{name}.scales": q.scales, f"{name}.biases": q.biases})
            if math.bias:
                tensors[f"{name}.bias"] = torch.randn(shape[0], generator=gen)
            weights.append(dequantize(q))
        layout = BlobLayout.for_tensors(tensors)
        blobs.append(torch.frombuffer(bytearray(layout.pack(tensors)), dtype=torch.uint8))
        if math.bias:
            weights.append((tensors["gate_up.bias"], tensors["down.bias"]))
    per = 3 if math.bias else 2
    return layout, blobs, [tuple(weights[i : i + per]) for i in range(0, len(weights), per)]


def _reference_and_pairs(x, ids, routing, weights, math):
    """The dequantized experts' sum for tokens x routed to ids with routing weights, and the pairs grouped by
    expert as routed.py hands them to run(): (reference, chosen experts, first, token, weight)."""
    def mlp(e):
        gate_up, down, *biases = weights[e]
        return lambda rows: swiglu_mlp(rows, gate_up, down, math, tuple(biases[0]) if biases else (None, None))

    reference = routed_experts(x, ids, routing, ((e, mlp(e)) for e in range(len(weights))))
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    chosen = sorted(set(flat.tolist()))
    first = [0]
    for e in chosen:
        first.append(first[-1] + int((flat == e).sum()))
    return reference, chosen, first, order // ids.shape[1], routing.reshape(-1)[order]


@pytest.mark.parametrize("bits,group,hidden,inter", [(4, 32, 96, 64), (8, 16, 80, 48), (4, 64, 128, 192), (2, 8, 72, 40)])
@pytest.mark.parametrize("math", [ExpertMath(), ExpertMath(bias=True, limit=7.0, alpha=1.702)], ids=["swiglu", "gpt-oss"])
@pytest.mark.parametrize("tokens", [1, 5, 13])
def test_a_layers_experts_are_the_dequantized_ones(bits, group, hidden, inter, math, tokens, activations):
    n, k = 6, 3
    layout, blobs, weights = _experts(n, hidden, inter, bits, group, math, seed=bits + hidden + tokens)
    form = cpu_native.NativeExperts.for_store(layout, hidden, inter, bits, group, math)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(tokens)])
    routing = torch.rand(tokens, k, generator=gen)
    reference, chosen, first, token, weight = _reference_and_pairs(x, ids, routing, weights, math)
    y = form.run(x, [blobs[e] for e in chosen], first, token, weight)
    _close(y, reference, 1e-5 if activations == "float" else 2 * INT8_ERROR)  # two products, the second's input rounded too
    # token by token, each its own call: the same bits
    one_by_one = torch.empty_like(y)
    for i in range(tokens):
        mine = (token == i).nonzero().flatten().tolist()
        experts = [e for j, e in enumerate(chosen) if any(first[j] <= p < first[j + 1] for p in mine)]
        one_by_one[i : i + 1] = form.run(x[i : i + 1], [blobs[e] for e in experts], list(range(len(mine) + 1)),
                                         torch.zeros(len(mine), dtype=torch.long), weight[mine])
    assert torch.equal(one_by_one, y)
    # the same layer in two calls, the second adding into the first's output: the same bits
    half = len(chosen) // 2
    split = form.run(x, [blobs[e] for e in chosen[:half]], first[: half + 1], token, weight)
    rest = slice(first[half], first[-1])
    form.run(x, [blobs[e] for e in chosen[half:]], [f - first[half] for f in first[half:]], token[rest], weight[rest],
             out=split)
    assert torch.equal(split, y)


@pytest.mark.parametrize("math", [ExpertMath(), ExpertMath(bias=True, limit=7.0, alpha=1.702)], ids=["swiglu", "gpt-oss"])
def test_a_long_prompts_busy_experts_go_to_the_matrix_units(math, monkeypatch):
    """Experts with MATRIX_UNIT_ROWS pairs or more run in bf16 on the matrix units (AMX, or forced here), the others
    through our kernel, in one run(): the sum within bf16's rounding of the dequantized experts'."""
    monkeypatch.setattr(cpu_native, "matrix_units", lambda: True)
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", True)
    n, hidden, inter, tokens = 6, 128, 64, 80
    layout, blobs, weights = _experts(n, hidden, inter, 4, 32, math, seed=11)
    form = cpu_native.NativeExperts.for_store(layout, hidden, inter, 4, 32, math)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(tokens, hidden, generator=gen)
    # experts 0 and 1 for the first 70 tokens (70 pairs each: the matrix units), 2..5 for the rest (a few each)
    ids = torch.tensor([[0, 1] if i < 70 else sorted(torch.randperm(4, generator=gen)[:2].add(2).tolist())
                        for i in range(tokens)])
    routing = torch.rand(tokens, 2, generator=gen)
    reference, chosen, first, token, weight = _reference_and_pairs(x, ids, routing, weights, math)
    units = []
    real = cpu_native.F.linear
    monkeypatch.setattr(cpu_native.F, "linear", lambda a, w: units.append(a.shape[0]) or real(a, w))
    y = form.run(x, [blobs[e] for e in chosen], first, token, weight)
    assert units == [70, 70, 70, 70]  # experts 0 and 1, two products each
    assert _error(y, reference) < 0.01


def test_results_do_not_depend_on_the_thread_count(activations):
    layout, blobs, _ = _experts(4, 128, 64, 4, 32, ExpertMath(), seed=7)
    form = cpu_native.NativeExperts.for_store(layout, 128, 64, 4, 32)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    run = lambda: form.run(x, blobs, [0, 2, 3, 5, 6], torch.tensor([0, 1, 2, 0, 1, 2]), torch.rand(6))  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        one = run()
        torch.set_num_threads(max(2, threads))
        torch.manual_seed(0)
        many = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("math", [ExpertMath(), ExpertMath(bias=True, limit=7.0, alpha=1.702)], ids=["swiglu", "gpt-oss"])
def test_a_posted_token_is_computed_on_the_librarys_thread_as_run_would(math, activations):
    """NativeExperts.post (cpu_share.py's CPU part): returns at once; the worker overwrites out with the same bits
    run() gives, then writes its time and the job number, jobs one after another."""
    import time

    layout, blobs, _ = _experts(5, 96, 64, 4, 32, math, seed=3)
    form = cpu_native.NativeExperts.for_store(layout, 96, 64, 4, 32, math)
    gen = torch.Generator().manual_seed(2)
    done = torch.zeros(2, dtype=torch.int64)
    out = torch.full((1, 96), float("nan"))
    for job, chosen in enumerate(([4, 0, 2], [1], [3, 0, 1, 2, 4]), start=1):
        x, weight = torch.randn(1, 96, generator=gen), torch.rand(len(chosen), generator=gen)
        first = list(range(len(chosen) + 1))
        form.post(x, [blobs[e] for e in chosen], first, weight, out, done, job, threads=2)
        deadline = time.monotonic() + 30
        while int(done[0]) != job and time.monotonic() < deadline:
            time.sleep(1e-4)
        assert int(done[0]) == job and int(done[1]) > 0
        expected = form.run(x, [blobs[e] for e in chosen], first, torch.zeros(len(chosen), dtype=torch.int32), weight)
        assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="more than 64 pairs"):
        form.post(x, [blobs[0]] * 65, list(range(66)), torch.rand(65), out, done, 9, threads=2)


@pytest.mark.parametrize("math", [ExpertMath(), ExpertMath(bias=True, limit=7.0, alpha=1.702)], ids=["swiglu", "gpt-oss"])
def test_a_token_by_its_blobs_addresses_is_what_run_gives(math, activations):
    """run_token (a decoded token whose experts are all in RAM: addresses and floats, no torch ops) is run()."""
    layout, blobs, _ = _experts(5, 96, 64, 4, 32, math, seed=4)
    form = cpu_native.NativeExperts.for_store(layout, 96, 64, 4, 32, math)
    gen = torch.Generator().manual_seed(5)
    for chosen in ([0, 2, 4], [3], [0, 1, 2, 3, 4]):
        x, weight = torch.randn(1, 96, generator=gen), torch.rand(len(chosen), generator=gen)
        expected = form.run(x, [blobs[e] for e in chosen], list(range(len(chosen) + 1)),
                            torch.zeros(len(chosen), dtype=torch.int32), weight)
        got = form.run_token(x, [blobs[e].data_ptr() for e in chosen], weight.tolist())
        assert torch.equal(got, expected)


def test_a_decoded_tokens_experts_give_the_same_bits_cached_or_read(built, monkeypatch, activations):
    """Every expert cached takes the one-call path (run_token); a cache too small for a layer's experts reads and
    sums them batch by batch: the same sums in the same order, so the same logits, bit for bit."""
    store = built.store("qwen3_5_moe", 4)
    calls, run_token = [], cpu_native.NativeExperts.run_token
    monkeypatch.setattr(cpu_native.NativeExperts, "run_token", lambda *a: calls.append(1) or run_token(*a))
    logits, one_call = [], []
    for cache_gb in (1, 0.0002):
        calls.clear()
        with flashmoe.load(store, cache_gb=cache_gb) as model:
            if cache_gb == 1:
                model.warm_cache()
            state = model.new_state()
            model.forward(PROMPT[:4], state)
            logits.append(torch.cat([model.forward([t], state) for t in PROMPT[4:]]))
        one_call.append(len(calls))
    assert one_call[0] == len(PROMPT[4:]) * len(model.config.moe_layers) and one_call[1] == 0
    assert torch.equal(logits[0], logits[1])


def test_forms_the_kernels_do_not_read_are_left_to_torch():
    layout, *_ = _experts(1, 96, 64, 4, 32, ExpertMath(), seed=1)
    assert cpu_native.NativeExperts.for_store(layout, 96, 64, None, None) is None  # unquantized
    assert cpu_native.NativeExperts.for_store(layout, 96, 64, 4, 16) is None  # a group they do not step by


@pytest.mark.parametrize("arch,bits", [("qwen3_5_moe", 4), ("qwen3_5_moe", 8), ("gpt_oss", 4), ("qwen3_moe", 2)])
def test_engine_runs_the_layers_experts_through_our_kernels(built, monkeypatch, float_activations, arch, bits):
    """With float residents both paths are float32 products of the same dequantized experts: equal to rounding."""
    store = built.store(arch, bits)
    with flashmoe.load(store, cache_gb=1, resident_format="float") as model:
        assert isinstance(model.fetcher.kernel_form, cpu_native.NativeExperts)
        ours = model.logits(PROMPT)  # reads land one by one: a call per expert
        again = model.logits(PROMPT)  # all in the RAM cache: one call per layer
        tokens = list(model.generate(PROMPT, 4))  # one token at a time
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    from flashmoe.kernels import cpu_int4
    monkeypatch.setattr(cpu_int4.KernelForm, "for_store", classmethod(lambda *a, **k: None))
    with flashmoe.load(store, cache_gb=1, resident_format="float") as dequantizing:
        assert dequantizing.fetcher.kernel_form is None
        reference = dequantizing.logits(PROMPT)
        assert list(dequantizing.generate(PROMPT, 4)) == tokens
    _close(ours, reference, 1e-4)
    _close(again, ours, 1e-5)


def test_engine_keeps_residents_quantized_in_our_form(built, monkeypatch, activations):
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", False)
    with flashmoe.load(built.store("qwen3_5_moe", 8), resident_format="float") as exact:
        reference = exact.logits(PROMPT)
        reference_tokens = list(exact.generate(PROMPT, 4))
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", activations == "int8")
    with flashmoe.load(built.store("qwen3_5_moe", 8)) as model:  # the CPU default: int8 residents
        assert any(isinstance(w, cpu_native.NativeMatrix) for w in model.model.w.values())
        assert isinstance(model.model.lm_head, cpu_native.NativeMatrix)
        ours = model.logits(PROMPT)
        tokens = list(model.generate(PROMPT, 4))
    assert (ours - reference).abs().max() < 0.03 * reference.abs().max()
    assert torch.equal(ours.argmax(-1), reference.argmax(-1)) and tokens == reference_tokens


def test_without_a_compiler_the_cpu_path_says_so_once_and_uses_torch(built, monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path / "cache"))
    cpu_native.library.cache_clear()
    try:
        assert cpu_native.library() is None
        assert cpu_native.library() is None
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and "no C compiler" in err and "torch's kernels" in err
        with flashmoe.load(built.store("qwen3_5_moe", 4)) as model:
            assert type(model.fetcher.kernel_form).__name__ == "KernelForm"
    finally:
        cpu_native.library.cache_clear()


def test_a_compiler_that_fails_is_reported_and_nothing_half_built_is_kept(monkeypatch, tmp_path, capfd):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                  "echo 'fatal: broken' >&2; touch \"$(eval echo \\${$(($#-1))})\"; exit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path / "cache"))
    cpu_native.library.cache_clear()
    try:
        assert cpu_native.library() is None
        assert "could not build the CPU kernels (fatal: broken)" in capfd.readouterr().err
        assert not list((tmp_path / "cache").rglob("*.so"))
    finally:
        cpu_native.library.cache_clear()


def test_flashmoe_native_0_turns_them_off(monkeypatch):
    monkeypatch.setenv("FLASHMOE_NATIVE", "0")
    cpu_native.library.cache_clear()
    try:
        assert cpu_native.library() is None
    finally:
        cpu_native.library.cache_clear()


@pytest.mark.parametrize("hk,hv,dk,dv", [(2, 4, 16, 24), (3, 3, 8, 5), (1, 6, 12, 7)])
@pytest.mark.parametrize("start", ["zeros", "float32", "bfloat16"])
def test_a_gated_delta_step_is_the_references(hk, hv, dk, dv, start):
    from flashmoe.kernels.gated_delta import recurrent_gated_delta_rule

    gen = torch.Generator().manual_seed(hk * 100 + dk)
    q, k = torch.randn(1, 1, hk, dk, generator=gen), torch.randn(1, 1, hk, dk, generator=gen)
    v = torch.randn(1, 1, hv, dv, generator=gen)
    g, beta = -torch.rand(1, 1, hv, generator=gen), torch.rand(1, 1, hv, generator=gen)
    state = None if start == "zeros" else torch.randn(1, hv, dk, dv, generator=gen).to(getattr(torch, start))
    reference, reference_state = recurrent_gated_delta_rule(q, k, v, g, beta, None if state is None else state.clone())
    out, final = cpu_native.gated_delta_step(q, k, v, g, beta, state)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final, reference_state, rtol=1e-5, atol=1e-6)
    assert (final is state) == (start == "float32")  # updated in place where it can be


@pytest.mark.parametrize("rows,d", [(1, 64), (3, 40), (17, 24)])
@pytest.mark.parametrize("residual,gate,zero_centred", [(False, False, True), (True, False, True), (False, True, False),
                                                        (True, True, False)])
def test_the_small_ops_are_the_references(rows, d, residual, gate, zero_centred):
    from flashmoe.kernels import fused

    gen = torch.Generator().manual_seed(rows * d)
    x, w = torch.randn(rows, d, generator=gen), torch.randn(d, generator=gen) * 0.1
    extra = {"residual": torch.randn(rows, d, generator=gen) if residual else None,
             "gate": torch.randn(rows, d, generator=gen) if gate else None}
    ours = cpu_native.rms_norm(x, w, 1e-6, zero_centred, **extra)
    reference = fused.reference_rms_norm(x, w, 1e-6, zero_centred, **extra)
    for a, b in zip(ours if residual else [ours], reference if residual else [reference]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    channels, kernel = rows * 8 + 1, 4
    mixed, state, conv = (torch.randn(channels, generator=gen), torch.randn(channels, kernel - 1, generator=gen),
                          torch.randn(channels, 1, kernel, generator=gen))
    state_ref = state.clone()
    torch.testing.assert_close(cpu_native.conv_step(mixed, state, conv),
                               fused.reference_conv_step(mixed, state_ref, conv), rtol=1e-5, atol=1e-6)
    assert torch.equal(state, state_ref)  # shifted in place alike
    a, b = torch.randn(rows, d, generator=gen) * 15, torch.randn(rows, d, generator=gen)  # softplus's threshold too
    a_log, dt_bias = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    for ours, reference in zip(cpu_native.delta_gates(a, b, a_log, dt_bias), fused.reference_delta_gates(a, b, a_log, dt_bias)):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert cpu_native.rms_norm(x.bfloat16(), w, 1e-6) is None  # other dtypes: the torch reference


@pytest.mark.parametrize("t,heads,kv_heads,head_dim,n_freq", [(1, 4, 2, 64, 32), (3, 3, 1, 48, 12), (5, 2, 2, 40, 20)])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("qk_norm", ["zero_centred", "plain", "none"])
def test_queries_and_keys_normed_and_rotated_are_the_references(t, heads, kv_heads, head_dim, n_freq, gated, qk_norm):
    """fm_qk_norm_rope: per-head RMSNorm and RoPE (full or partial rotary) out of a fused projection, gated or not."""
    from flashmoe.kernels import fused

    gen = torch.Generator().manual_seed(t * head_dim + n_freq)
    width = heads * (2 if gated else 1) * head_dim + 2 * kv_heads * head_dim
    proj = torch.randn(t, width + 3, generator=gen)[:, :width]  # rows with a stride of their own
    positions = torch.arange(1000, 1000 + t)
    q_norm, k_norm = torch.randn(head_dim, generator=gen) * 0.1, torch.randn(head_dim, generator=gen) * 0.1
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 2 * n_freq, 2).float() / (2 * n_freq)))
    args = (proj, positions, q_norm, k_norm, inv_freq, heads, kv_heads, head_dim, 1e-6, gated, qk_norm)
    for ours, reference in zip(cpu_native.qk_norm_rope(*args), fused.reference_qk_norm_rope(*args)):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=2e-5)
    assert cpu_native.qk_norm_rope(proj.bfloat16(), *args[1:]) is None  # other dtypes: the torch reference


@pytest.mark.parametrize("arch,bits", [("qwen3_5_moe", 4), ("qwen3_5_moe", 8), ("gpt_oss", 4), ("mixtral", 8),
                                       ("deepseek_v3", 4)])
def test_int8_activations_keep_a_models_answers(built, monkeypatch, arch, bits):
    """The users' default where the CPU has VNNI, against the same kernels on float activations: the logits move
    by a bounded amount and greedy decoding picks the same tokens."""
    store = built.store(arch, bits)
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", False)
    with flashmoe.load(store) as exact:
        reference, reference_tokens = exact.logits(PROMPT), list(exact.generate(PROMPT, 6))
    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", True)
    if not cpu_native.int8_activations():
        pytest.skip("this CPU has no AVX-512 VNNI")
    with flashmoe.load(store) as model:
        ours, tokens = model.logits(PROMPT), list(model.generate(PROMPT, 6))
    assert _error(ours, reference) < 0.03  # 0.7-1.0% measured on these tiny models
    assert tokens == reference_tokens


@pytest.mark.parametrize("tokens,experts,top_k,default_k,normalize", [(1, 512, 4, 10, False), (3, 64, 8, 8, True),
                                                                       (2, 17, 3, 2, False), (5, 256, 10, 8, True)])
def test_the_softmax_router_is_the_reference(tokens, experts, top_k, default_k, normalize):
    from flashmoe.kernels import fused

    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(experts)) * 3
    ids, weights, slots = cpu_native.route(logits, top_k, default_k, normalize)
    ref_ids, ref_weights, _ = fused.reference_route(logits, top_k, default_k, normalize)
    assert torch.equal(ids, ref_ids) and slots is None
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 levels")
@pytest.mark.parametrize("level", ["x86-64-v2", "x86-64-v3"])
def test_builds_for_older_cpus_compute_the_same(monkeypatch, tmp_path, level):
    """What a CPU without AVX-512 runs (SSE4.2, AVX2): the portable vector code and scalar half conversions."""
    monkeypatch.setattr(cpu_native, "FLAGS", tuple("-march=" + level if f == "-march=native" else f
                                                   for f in cpu_native.FLAGS))
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path))
    cpu_native.library.cache_clear()
    try:
        assert cpu_native.library() is not None and not cpu_native.library().fm_has_q8()
        gen = torch.Generator().manual_seed(5)
        for bits, group in ((4, 32), (8, 16), (2, 32)):
            q = quantize(torch.randn(21, 128, generator=gen), bits, group)
            x = torch.randn(3, 128, generator=gen)
            _close(cpu_native.NativeMatrix.from_quantized(q)(x), x @ dequantize(q).T)
        layout, blobs, weights = _experts(2, 64, 32, 4, 32, ExpertMath(bias=True, limit=7.0, alpha=1.702), seed=3)
        form = cpu_native.NativeExperts.for_store(layout, 64, 32, 4, 32, ExpertMath(bias=True, limit=7.0, alpha=1.702))
        x = torch.randn(1, 64, generator=gen)
        y = form.run(x, blobs, [0, 1, 2], torch.zeros(2, dtype=torch.long), torch.tensor([0.25, 0.75]))
        math = ExpertMath(bias=True, limit=7.0, alpha=1.702)
        reference = sum(w * swiglu_mlp(x, g, d, math, tuple(b)) for w, (g, d, b) in zip((0.25, 0.75), weights))
        _close(y, reference)
    finally:
        cpu_native.library.cache_clear()


def test_a_deltanet_decode_step_in_one_call_is_the_separate_calls(built, monkeypatch, activations):
    """fm_delta_decode runs conv, gates, the delta rule and the gated norm as the separate calls did: a decode with
    it gives the same logits, bit for bit, and the same states."""
    store = built.store("qwen3_next", 4)
    runs, calls, delta_decode = [], [], cpu_native.delta_decode
    monkeypatch.setattr(cpu_native, "delta_decode", lambda *a: calls.append(1) or delta_decode(*a))
    for fused_step in (True, False):
        if not fused_step:
            monkeypatch.setattr(cpu_native, "delta_decode", lambda *a, **k: None)
        with flashmoe.load(store) as model:
            state = model.new_state()
            model.forward(PROMPT[:4], state)
            logits = torch.cat([model.forward([t], state) for t in PROMPT[4:]])
            deltas = [s for s in state.layers if getattr(s, "recurrent", None) is not None]
            runs.append((logits, [torch.cat([s.recurrent.flatten(), s.conv.flatten()]) for s in deltas]))
    assert calls and runs[0][1] and torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
