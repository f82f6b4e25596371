"""The integer dot-product matrix-vector kernel (kernels/dot4_gemv.py): activations rounded to int8 per 32 values,
codes read as 32-bit words. Checked in Triton's interpreter (its dp4a emulated) against a torch model of the same
rounding (tight) and against the float product (the rounding's own error), on every supported width and both scale
dtypes; compiled for Hopper with the real dp4a in tests/test_triton_compile.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_error
from flashmoe.kernels import dot4_gemv as d4
from flashmoe.kernels import moe_triton as mt
from flashmoe.kernels.affine import AffineMatrix
from flashmoe.quant import QuantizedTensor, quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not mt.triton_available(), reason="needs triton")


def matrix(n, k, bits, group, scale_dtype, seed):
    q = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), bits, group)
    q = QuantizedTensor(*(t.to(DEVICE) for t in (q.packed, q.scales.to(scale_dtype), q.biases.to(scale_dtype))),
                        bits, group)
    return AffineMatrix(q, torch.float32)


def rounded(x: torch.Tensor) -> torch.Tensor:
    """The activations as the kernel sees them: each 32 rounded to int8 steps of their max / 127."""
    blocks = x.float().view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.floor(blocks / torch.where(d == 0, 1, d) + 0.5) * d).view_as(x)


@pytest.mark.parametrize("n,k,bits,group", [(37, 512, 4, 32), (20, 1024, 4, 64), (45, 256, 8, 32), (9, 512, 8, 64)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 19])  # 19: two programs of up to MAX_ROWS rows, the second's masked
def test_the_dot_product_kernel_is_the_product_of_rounded_activations(n, k, bits, group, scale_dtype, rows):
    assert d4.supported(bits, group, k)
    m = matrix(n, k, bits, group, scale_dtype, seed=n + k + bits)
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3).to(DEVICE)
    x[0, :32] = 0  # a block of zeros: a zero scale
    y = d4.dot4_gemv(x, m.blob, m.shape, bits, group, m.offsets, scale_dtype == torch.bfloat16, block_n=16)
    w, xr = m.dequantize(torch.float32), rounded(x)
    # b_g and the codes' middle m = 2^(bits-1) meet the exact sum of the group's x; the centred codes the rounded x
    exact_part = (m.q.biases.float() + (1 << (bits - 1)) * m.q.scales.float()).repeat_interleave(group, dim=1)
    assert rel_error(y, F.linear(xr, w) + F.linear(x - xr, exact_part)) < 1e-5  # the scheme, exactly as modelled
    assert rel_error(y, F.linear(x, w)) < 0.01  # int8 activations against centred codes


@pytest.mark.parametrize("split", [2, 3, 64])  # 3: splits of unequal steps; 64: more splits than steps
def test_a_split_matrix_sums_to_the_unsplit_product(split):
    """K's steps divided among programs (more reads in flight for matrices of few rows): the float32 partials sum
    to the one-program product, for one row and a decode batch's."""
    m = matrix(40, 1024, 4, 32, torch.float16, seed=split)
    for rows in (1, 5):
        x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
        args = (m.blob, m.shape, 4, 32, m.offsets, False)
        whole = d4.dot4_gemv(x, *args, block_n=8, block_w=16)  # 8 steps of 16 words
        assert rel_error(d4.dot4_gemv(x, *args, block_n=8, block_w=16, split=split), whole) < 1e-5


@pytest.mark.parametrize("bits,group,block_w", [(4, 32, 16), (4, 64, 32), (8, 32, 8), (8, 64, 16)])
def test_activations_rounded_in_the_kernel_are_the_ones_quantize_rows_makes(bits, group, block_w):
    """fused: every program rounds the float activations of its steps itself (no quantize_rows launch) into the same
    int8 words, scales and sums, so the product is the unfused one (to float summation order), padding rows too."""
    m = matrix(24, 512, bits, group, torch.bfloat16, seed=bits + group)
    x = (torch.randn(3, 512, generator=torch.Generator().manual_seed(block_w)) * 2).to(DEVICE, torch.bfloat16)
    x[1, 32:96] = 0  # zero blocks: a zero scale
    args = (m.blob, m.shape, bits, group, m.offsets, True)
    for rows in (x[:1], x):  # one row; three, padded to a program of four
        want = d4.dot4_gemv(rows, *args, block_n=8, block_w=block_w)
        assert rel_error(d4.dot4_gemv(rows, *args, block_n=8, block_w=block_w, fused=True).float(), want.float()) < 1e-5


def test_unsupported_shapes_are_said_so():
    assert not d4.supported(4, 16, 512)  # groups smaller than an activation block
    assert not d4.supported(4, 32, 2880)  # GPT-OSS's rows: no whole steps of 64 words
    assert not d4.supported(2, 32, 512)
    assert d4.block_words(4, 32, 4096) == 256 and d4.block_words(4, 32, 1024) == 128  # a row is 512 / 128 words
    assert d4.block_words(4, 32, 2880) == 8  # 2880 = 45 steps of 64 codes
    assert d4.block_words(8, 64, 96) is None and d4.block_words(4, 32, 128) == 16


def test_the_resident_tiles_are_the_sweeps(monkeypatch):
    """resident_tile gives each resident shape of a 397B step the tile its docstring says the H200 sweep chose: 8 rows,
    the widest step, 8 warps on matrices of at most 8192 rows, no K split, activations rounded in the kernel unless
    FLASHMOE_GPU_DOT4=rows."""
    monkeypatch.delenv(d4.ENV, raising=False)
    tile = lambda n, k: tuple(d4.resident_tile(4, 32, (n, k)).values())  # noqa: E731
    assert tile(248320, 4096) == tile(20608, 4096) == tile(17408, 4096) == (8, 256, 4, 1, True)
    assert tile(4096, 8192) == tile(2561, 4096) == (8, 256, 8, 1, True)
    assert tile(4096, 1024) == (8, 128, 4, 1, True)
    assert d4.resident_tile(4, 32, (4096, 2880)) == dict(block_n=8, block_w=8, num_warps=4, split=1, fused=True)
    assert d4.resident_tile(8, 64, (64, 96)) is None
    monkeypatch.setenv(d4.ENV, "rows")
    assert tile(4096, 8192) == (8, 256, 8, 1, False)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_on_the_gpu_the_dp4a_is_its_emulation_and_resident_matrices_take_it_by_default(bits, monkeypatch):
    """The PTX dp4a gives the emulation's integers (bit for bit: the same int32 sums, the same float epilogue), and
    a resident matrix's one or two rows go through the kernel unless FLASHMOE_GPU_DOT4=0."""
    m = matrix(300, 1024, bits, 32, torch.float16, seed=bits)
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    words, odd, d, sums = d4.quantize_rows(x, bits, 32)
    outs = []
    for asm in (True, False):
        out = torch.empty(2, 300, device="cuda", dtype=torch.float32)
        d4._dot4_gemv_kernel[(300 // 16 + 1, 1)](x, words, odd, d, sums, m.blob, out, 2, 300,
                                                 1024, 1024 * bits // 32, 1024 // 32, 1024 * bits // 32, *m.offsets,
                                                 BITS=bits, GROUP=32,
                                                 BLOCK_N=16, BLOCK_W=64, ROWS=2, SCALE_KIND=0, ASM=asm,
                                                 ROUND=False)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    q = m.q
    monkeypatch.setenv(d4.ENV, "0")
    assert AffineMatrix(QuantizedTensor(q.packed, q.scales, q.biases, bits, 32), torch.bfloat16).dot4 is None
    monkeypatch.delenv(d4.ENV)
    default = AffineMatrix(QuantizedTensor(q.packed, q.scales, q.biases, bits, 32), torch.bfloat16)
    assert default.dot4
    assert rel_error(default(x).float(), F.linear(x.float(), m.dequantize(torch.float32))) < 0.02


@pytest.mark.parametrize("bits,hidden,inter,bias", [(4, 512, 512, False), (8, 256, 256, True), (4, 512, 160, False)])
def test_the_decode_expert_kernels_take_the_dot_products_by_default(bits, hidden, inter, bias, monkeypatch):
    """Unless FLASHMOE_GPU_DOT4=0, the decode gate_up and down kernels read the codes through integer dot products over the
    rounded activations (x per token, act per pair), with several tokens' pairs, a skipped slot, GPT-OSS's biases;
    within the activations' rounding of the float kernels. A width the integer kernel does not take (inter 320) stays
    on the float path for that projection; float32 activations keep the exact products. (The rounding costs up to
    1% here: SwiGLU outputs of random weights are heavy-tailed, a block's largest value 10x its typical one.)"""
    from flashmoe.kernels.moe import ExpertMath
    from test_moe_kernels import i32, make_slab

    math = ExpertMath(bias=True, limit=7.0, alpha=1.702) if bias else None
    slab, layout, qb = make_slab(5, hidden, inter, bits, 32, seed=bits, math=math)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, hidden, generator=gen).to(DEVICE, torch.bfloat16)  # float32 keeps the exact products
    slots = i32([3, mt.SKIP, 4, 1])
    weights = torch.rand(4, generator=gen).to(DEVICE)
    step = 128  # bytes a row per step (the decode tile's 512 needs rows of 1024 4-bit codes: slow in the interpreter)
    monkeypatch.setenv(d4.ENV, "0")
    want_act = mt.decode_gate_up_swiglu(x, slab, slots, qb, per_row=2, block_b=step)
    want = mt.down_partials(want_act, slab, slots, weights, qb, block_b=step)
    exact32 = mt.decode_gate_up_swiglu(x.float(), slab, slots, qb, per_row=2, block_b=step)
    monkeypatch.delenv(d4.ENV)
    assert d4.supported(bits, 32, hidden, step // 4)
    act = mt.decode_gate_up_swiglu(x, slab, slots, qb, per_row=2, block_b=step)
    assert torch.equal(act[1], torch.zeros_like(act[1]))  # the skipped pair
    assert 0 < rel_error(act, want_act) < 0.015
    assert torch.equal(mt.decode_gate_up_swiglu(x.float(), slab, slots, qb, per_row=2, block_b=step), exact32)
    got = mt.down_partials(want_act, slab, slots, weights, qb, block_b=step)
    if d4.supported(bits, 32, inter, step // 4):
        assert 0 < rel_error(got, want) < 0.015
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("bits,inter,bias", [(4, 256, False), (8, 128, True)])
def test_decode_expert_kernels_round_in_the_kernel_as_quantize_rows_does(bits, inter, bias, monkeypatch):
    """By default (FLASHMOE_GPU_DOT4=fused) gate_up rounds x and down rounds act inside their programs (no quantize_rows launch,
    x rounded once a step for both gate and up): the products of FLASHMOE_GPU_DOT4=rows, to float summation order."""
    from flashmoe.kernels.moe import ExpertMath
    from test_moe_kernels import i32, make_slab

    math = ExpertMath(bias=True, limit=7.0, alpha=1.702) if bias else None
    slab, layout, qb = make_slab(5, 256, inter, bits, 32, seed=bits, math=math)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 256, generator=gen).to(DEVICE, torch.bfloat16)
    slots, weights = i32([3, mt.SKIP, 4, 1]), torch.rand(4, generator=gen).to(DEVICE)
    runs = {}
    for mode in ("rows", "fused"):
        monkeypatch.setenv(d4.ENV, mode)
        act = mt.decode_gate_up_swiglu(x, slab, slots, qb, per_row=2, block_b=128)
        runs[mode] = act, mt.down_partials(act, slab, slots, weights, qb, block_b=128)
    assert d4.mode() == "fused" and torch.equal(runs["fused"][0][1], torch.zeros_like(runs["fused"][0][1]))
    assert rel_error(runs["fused"][0], runs["rows"][0]) < 1e-2 * 2**-7  # within bf16 rounding of act
    monkeypatch.setenv(d4.ENV, "rows")  # down alone, over the same act both ways
    assert rel_error(mt.down_partials(runs["fused"][0], slab, slots, weights, qb, block_b=128), runs["fused"][1]) < 1e-5


def decode_logits(store, **load_kwargs) -> torch.Tensor:
    """A fresh GPU model's logits for PROMPT[6:14] decoded a token at a step (in its graphs) after PROMPT[:6]."""
    import flashmoe
    from test_reference import PROMPT

    model = flashmoe.load(store, device="cuda", **load_kwargs)
    model.warm_cache()
    state = model.new_state()
    model.forward(PROMPT[:6], state)
    return torch.cat([model.forward([t], state).float().cpu() for t in PROMPT[6:14]])


@pytest.mark.gpu
def test_on_the_gpu_a_model_decodes_through_the_dot_products_in_its_graphs(built, monkeypatch):
    """By default a 4-bit store's decode steps (experts and int4 residents, whole-step graphs) stay within the
    activations' rounding of the float kernels' logits (FLASHMOE_GPU_DOT4=0), token by token; rounded by
    quantize_rows launches (FLASHMOE_GPU_DOT4=rows) they are the default's to bf16 noise."""
    store = built.store("qwen3_5_moe", 4)
    monkeypatch.setenv(d4.ENV, "0")
    float_logits = decode_logits(store, resident_format="int4")
    monkeypatch.delenv(d4.ENV)
    dot4_logits = decode_logits(store, resident_format="int4")
    assert 0 < rel_error(dot4_logits, float_logits) < 0.05  # > 0: they did run
    monkeypatch.setenv(d4.ENV, "rows")
    assert rel_error(decode_logits(store, resident_format="int4"), dot4_logits) < 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_5_moe", "gpt_oss", "deepseek_v3", "mixtral"])
def test_on_the_gpu_every_layout_decodes_through_the_dot_products_near_the_float_kernels(built, arch, monkeypatch):
    """What the dot products (the default) change, family by family: a bf16 model's decode steps (4-bit experts
    through the decode kernels, in graphs) against the same model's float kernels (FLASHMOE_GPU_DOT4=0), token by
    token, within the bf16 tolerance the GPU tests hold models to against transformers."""
    store = built.store(arch, 4)
    monkeypatch.setenv(d4.ENV, "0")
    float_logits = decode_logits(store)
    monkeypatch.delenv(d4.ENV)
    assert 0 < rel_error(decode_logits(store), float_logits) < 3e-2  # > 0: the dot products did run
