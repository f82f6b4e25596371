"""The expert kernels (prompt and decode) compile for Hopper on any machine: triton.compile runs the whole pipeline to
a cubin without a GPU, so a kernel that Triton's interpreter runs but its compiler refuses (an early return in a
constexpr branch did: the interpreter ran it, the device did not) fails here rather than on the device, and each
launch's shared memory fits an H100/H200 SM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashmoe.kernels import moe_triton as mt

pytestmark = pytest.mark.skipif(not mt.triton_available() or os.uname().sysname != "Linux",
                                reason="needs triton's NVIDIA backend (Linux wheels)")
SHARED_MAX = 227 * 1024  # bytes a block may opt into on sm_90


COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

shared = []
for name, meta, pointers in json.loads(sys.stdin.read()):
    module, _, name = name.rpartition(":")  # "module:kernel" for a kernel outside moe_triton
    kernel = getattr(importlib.import_module("flashmoe.kernels." + (module or "moe_triton")), name)
    consts = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
    # a constexpr left out takes its default, as a launch does (compiled as a runtime value, both its branches would be)
    consts.update({p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default and p.name not in consts})
    signature = {}
    for arg in kernel.arg_names:
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = pointers[arg]
        elif arg.endswith("_ptr"):
            signature[arg] = "*i32"
        else:
            signature[arg] = "fp32" if arg in ("limit", "alpha", "scale", "eps") else "i32"
    options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    compiled = triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32), options=options)
    shared.append(compiled.metadata.shared)
print(json.dumps(shared))
"""


def _compile(cases: list) -> list[int]:
    """Compile each (kernel name, launch constexprs, pointer types other than int32) for sm_90 in a process of its
    own: the tests' conftest puts Triton in interpreter mode, whose kernels do not compile. Their shared bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(cases), env=env, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _quant_blob(bits: int, kind: int, gpt_oss: bool = False) -> mt.QuantBlob:
    return mt.QuantBlob(4096, 1024, bits, 32, 8 << 20, 0, 1 << 20, 2 << 20, 3 << 20, 4 << 20, 5 << 20, scale_kind=kind,
                        bias=gpt_oss, limit=7.0 if gpt_oss else 0.0, alpha=1.702)


KINDS = {"4-bit": (4, mt.SCALE_FP16), "2-bit": (2, mt.SCALE_FP16), "8-bit": (8, mt.SCALE_FP16),
         "MLX bf16 scales": (4, mt.SCALE_BF16), "MXFP4": (4, mt.SCALE_E8M0), "FP8": (8, mt.SCALE_FP32)}
TILES = {"swapped": mt.PromptTile(block_n=64, swap=True), "whole groups a step": mt.PromptTile(block_k=128),
         "a product per bit position": mt.PromptTile(block_k=64, split=True)}


def _cases(qb: mt.QuantBlob, gate_up_tile: mt.PromptTile, down_tile: mt.PromptTile, act_dtype: str = "*bf16"):
    starts = [0, 10, 25, 25, 40]  # ~10 pairs an expert, as a 397B prompt
    cases = []
    for name, tile, k in (("_gate_up_swiglu_kernel", gate_up_tile, qb.hidden),
                          ("_down_grouped_kernel", down_tile, qb.intermediate)):
        meta = mt._grouped_launch(tile, qb, k, starts, torch.device("cpu"))[2]
        meta["IEEE"] = act_dtype == "*fp32"
        if name == "_gate_up_swiglu_kernel":
            meta["ACT"] = qb.act
        cases.append((name, meta, {"x_ptr": act_dtype, "act_ptr": act_dtype, "y_ptr": act_dtype, "slab_ptr": "*u8",
                                   "pair_weight_ptr": "*fp32"}))
    return cases


def _fit(cases: list) -> None:
    assert all(shared <= SHARED_MAX for shared in _compile(cases))


@pytest.mark.parametrize("kind", KINDS)
def test_default_prompt_tiles_compile_for_every_scale_kind(kind):
    _fit(_cases(_quant_blob(*KINDS[kind]), mt.GATE_UP_TILE, mt.DOWN_TILE))


def test_gpt_oss_and_float32_prompts_compile():
    _fit(_cases(_quant_blob(4, mt.SCALE_E8M0, gpt_oss=True), mt.GATE_UP_TILE, mt.DOWN_TILE)
         + _cases(_quant_blob(4, mt.SCALE_FP16), mt.GATE_UP_TILE, mt.DOWN_TILE, act_dtype="*fp32"))


@pytest.mark.parametrize("tile", TILES)
def test_other_prompt_tiles_compile(tile):
    _fit(_cases(_quant_blob(4, mt.SCALE_FP16), TILES[tile], TILES[tile]))


def _decode_cases(qb: mt.QuantBlob) -> list:
    """The decode kernels as decode_gate_up_swiglu, down_partials, sum_partials and down_weighted_sum launch them."""
    tile = mt.DECODE_TILE
    up_step = mt.gemv_block_bytes(qb, qb.hidden, tile["block_b"])
    down_step = mt.gemv_block_bytes(qb, qb.intermediate, tile["block_b"])
    common = dict(BITS=qb.bits, GROUP=qb.group_size, BLOCK_N=tile["block_n"], SCALE_KIND=qb.scale_kind, BIAS=qb.bias,
                  num_warps=tile["num_warps"])
    blobs = {"slab_ptr": "*u8", "host_ptr": "*u8"}
    bf16 = {name: "*bf16" for name in ("x_ptr", "act_ptr", "out_ptr", "base_ptr", "shared_ptr", "shared_gate_ptr")}
    floats = {"weight_ptr": "*fp32", "partial_ptr": "*fp32", "extra_ptr": "*fp32"}
    return [
        ("_decode_gate_up_kernel", dict(common, BLOCK_B=up_step, ACT=qb.act, EVEN_K=mt.gemv_even(qb, qb.hidden, up_step)),
         {**blobs, **bf16}),
        ("_down_partial_kernel", dict(common, BLOCK_B=down_step, EVEN_K=mt.gemv_even(qb, qb.intermediate, down_step)),
         {**blobs, **bf16, **floats}),
        ("_down_weighted_sum_kernel", dict(common, BLOCK_B=down_step, EPILOGUE=True, SHARED=2,
                                           EVEN_K=mt.gemv_even(qb, qb.intermediate, down_step)),
         {**blobs, **bf16, **floats}),
        ("_sum_partials_kernel", dict(BLOCK_N=256, EPILOGUE=True, SHARED=2, EXTRA=True), {**bf16, **floats}),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_decode_kernels_compile_for_every_scale_kind(kind):
    _fit(_decode_cases(_quant_blob(*KINDS[kind])))


def test_resident_gemm_compiles():
    """The grouped down kernel as affine_gemm launches it for a resident matrix: a tile of 16 rows, 32 outputs."""
    qb = mt.QuantBlob(12288, 4096, 4, 32, 0, 0, 0, 0, 0, 1 << 20, 2 << 20)
    meta = mt._grouped_launch(mt.RESIDENT_TILE, qb, qb.intermediate, [0, 8], torch.device("cpu"))[2]
    _fit([("_down_grouped_kernel", dict(meta, IEEE=False), {"act_ptr": "*bf16", "y_ptr": "*bf16", "slab_ptr": "*u8",
                                                            "pair_weight_ptr": "*fp32"})])


def test_the_resident_batch_kernel_compiles():
    """resident_mm's kernel at tiles its sweep tries: 4- and 8-bit codes, both scale dtypes, 16 to 64 rows a program,
    bf16 and float32 (IEEE) activations."""
    cases = []
    for bits, kind, block_t, block_n, block_k, warps, x, out in (
            (4, 0, 16, 64, 128, 4, "*bf16", "*bf16"), (4, 1, 32, 128, 128, 8, "*bf16", "*bf16"),
            (8, 0, 64, 32, 256, 4, "*bf16", "*bf16"), (4, 0, 16, 32, 256, 4, "*fp32", "*fp32"),
            (4, 0, 16, 32, 256, 4, "*bf16", "*fp32")):  # the last: K split, float32 partials
        meta = dict(BITS=bits, GROUP=32, BLOCK_K=block_k, BLOCK_T=block_t, BLOCK_N=block_n, SCALE_KIND=kind,
                    IEEE=x == "*fp32", num_warps=warps, num_stages=3)
        cases.append(("resident_mm:_resident_mm_kernel", meta, {"x_ptr": x, "blob_ptr": "*u8", "out_ptr": out}))
    _fit(cases)


def test_gpt_oss_decode_and_resident_gemv_compile():
    """GPT-OSS's experts (biases, the clamped SwiGLU) at its 2880-wide rows, whose last K step is masked; and the
    GEMV of a resident matrix kept quantized."""
    qb = mt.QuantBlob(2880, 2880, 4, 32, 8 << 20, 0, 1 << 20, 2 << 20, 3 << 20, 4 << 20, 5 << 20,
                      scale_kind=mt.SCALE_E8M0, bias=True, limit=7.0, alpha=1.702)
    gemv = ("_affine_gemv_kernel", dict(BITS=4, GROUP=64, BLOCK_N=mt.DECODE_TILE["block_n"], BLOCK_B=512,
                                        SCALE_KIND=mt.SCALE_FP16, num_warps=mt.DECODE_TILE["num_warps"]),
            {"x_ptr": "*bf16", "blob_ptr": "*u8", "out_ptr": "*bf16"})
    block_n, block_b, warps = mt.affine_gemv_tile(8, 32, (248320, 4096))  # an 8-bit head's wide tile
    wide = ("_affine_gemv_kernel", dict(BITS=8, GROUP=32, BLOCK_N=block_n, BLOCK_B=block_b, SCALE_KIND=mt.SCALE_FP16,
                                        num_warps=warps), {"x_ptr": "*bf16", "blob_ptr": "*u8", "out_ptr": "*bf16"})
    _fit(_decode_cases(qb) + [gemv, wide])


def test_the_dot_product_gemv_compiles_with_its_dp4a():
    """kernels/dot4_gemv.py with the real PTX dp4a (the interpreter runs an emulation): 4- and 8-bit codes, both
    scale dtypes, and the activations' rounding kernel."""
    pointers = {"x_ptr": "*bf16", "blob_ptr": "*u8", "out_ptr": "*bf16", "d_ptr": "*fp32", "sums_ptr": "*fp32"}
    cases = [("dot4_gemv:_dot4_gemv_kernel", dict(BITS=bits, GROUP=group, BLOCK_N=16, BLOCK_W=64, ROWS=rows,
                                                  SCALE_KIND=kind, ASM=asm, ROUND=False, num_warps=4), pointers)
             for bits, group, kind, asm, rows in ((4, 32, 0, True, 1), (4, 64, 1, True, 16), (8, 32, 0, True, 8),
                                                  (4, 32, 0, False, 2), (8, 32, 0, False, 2))]
    # split K: float32 partials; the activations rounded in the kernel (ROUND), both widths
    cases.append(("dot4_gemv:_dot4_gemv_kernel", dict(BITS=4, GROUP=32, BLOCK_N=4, BLOCK_W=128, ROWS=1, SCALE_KIND=0,
                                                      ASM=True, ROUND=False, num_warps=4),
                  dict(pointers, out_ptr="*fp32")))
    cases += [("dot4_gemv:_dot4_gemv_kernel", dict(BITS=bits, GROUP=32, BLOCK_N=16, BLOCK_W=64, ROWS=rows,
                                                   SCALE_KIND=0, ASM=True, ROUND=True, num_warps=4), pointers)
              for bits, rows in ((4, 1), (8, 1), (4, 8))]
    # resident_tile's tiles (8 rows, 256 words a step, 4 or 8 warps, rounded inside) for one row and a batch's 16
    cases += [("dot4_gemv:_dot4_gemv_kernel", dict(BITS=bits, GROUP=32, BLOCK_N=8, BLOCK_W=256, ROWS=rows,
                                                   SCALE_KIND=0, ASM=True, ROUND=True, num_warps=warps), pointers)
              for bits, rows, warps in ((4, 1, 4), (4, 16, 8), (8, 16, 4))]
    # ASM False: the emulation the GPU test compares; ROWS: activation rows applied to each step's codes
    cases += [("dot4_gemv:_quantize_rows_kernel", dict(BITS=bits, GROUP=32, num_warps=1),
               {"x_ptr": "*bf16", "d_ptr": "*fp32", "sums_ptr": "*fp32"}) for bits in (4, 8)]
    _compile(cases)


@pytest.mark.parametrize("bits,kind", [(4, mt.SCALE_FP16), (8, mt.SCALE_FP16), (4, mt.SCALE_BF16)])
def test_decode_kernels_compile_with_integer_dot_products(bits, kind):
    """The decode gate_up and down kernels' DOT4 branch (the default; FLASHMOE_GPU_DOT4=0 leaves it) with the real
    dp4a, the 397B geometry's shapes, GPT-OSS's biases too."""
    pointers = {"xd_ptr": "*fp32", "xs_ptr": "*fp32", "ad_ptr": "*fp32", "as_ptr": "*fp32"}
    cases = []
    for gpt_oss in (False, True):
        for name, meta, types in _decode_cases(_quant_blob(bits, kind, gpt_oss))[:2]:
            for round_x in (False, True):  # FLASHMOE_GPU_DOT4=rows, and the default: activations rounded inside
                cases.append((name, dict(meta, DOT4=True, ASM=True, ROUND=round_x), {**types, **pointers}))
    _fit(cases)


def test_the_routers_compile_with_their_packed_top_k():
    """fused.py's softmax and sigmoid routers (their top-k packs a float's bits and an id into one int64 key a
    reduction) at the 397B and DeepSeek-V3 shapes, counting tiers."""
    common = dict(HAS_SLOTS=True, COUNT=True, num_warps=4)
    pointers = {"logits_ptr": "*bf16", "ids_ptr": "*i64", "weights_ptr": "*fp32", "counts_ptr": "*i64"}
    _compile([("fused:_route_kernel", dict(common, TOP_K=10, DEFAULT_K=10, K_MAX=10, KPAD=16, NORMALIZE=True,
                                           BLOCK_E=512), pointers),
              ("fused:_route_sigmoid_kernel", dict(common, TOP_K=8, KPAD=8, N_GROUP=8, GPAD=8, TOPK_GROUP=4,
                                                   NORMALIZE=True, BLOCK_E=256),
               {**pointers, "logits_ptr": "*fp32", "bias_ptr": "*fp32"})])
