"""A decode batch's rows times a quantized resident matrix on the tensor cores (kernels/resident_mm.py): against
the dequantized product on odd shapes (output rows past a program's block, rows past a program's 64, a row of
groups the step does not divide evenly into its widest), both widths, both scale dtypes, float32 and bf16 inputs;
AffineMatrix routes a batch's rows to it on a GPU. On a CPU machine in Triton's interpreter; compiled for Hopper in
test_triton_compile.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_error
from flashmoe.kernels import affine
from flashmoe.kernels import moe_triton as mt
from flashmoe.kernels import resident_mm as rm
from flashmoe.kernels.affine import AffineMatrix
from flashmoe.quant import QuantizedTensor, quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not mt.triton_available(), reason="needs triton")


def matrix(n, k, bits, group, scale_dtype, dtype, seed):
    q = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), bits, group)
    q = QuantizedTensor(*(t.to(DEVICE) for t in (q.packed, q.scales.to(scale_dtype), q.biases.to(scale_dtype))),
                        bits, group)
    return AffineMatrix(q, dtype)


@pytest.mark.parametrize("n,k,bits,group,rows", [(37, 96, 4, 32, 3), (70, 320, 4, 32, 17), (33, 256, 8, 64, 5),
                                                 (40, 256, 4, 32, 70), (64, 512, 8, 128, 9), (19, 224, 4, 32, 64)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_batch_kernel_is_the_dequantized_product(n, k, bits, group, rows, scale_dtype, dtype):
    m = matrix(n, k, bits, group, scale_dtype, dtype, seed=n + k + rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(DEVICE, dtype)
    want = F.linear(x.float(), m.dequantize(torch.float32))
    for tile in (rm.MMTile(block_n=16, block_k=128), rm.MMTile(block_n=32, block_k=256, num_warps=8),
                 rm.MMTile(block_n=16, block_k=64, split=3), rm.MMTile(block_n=32, block_k=32, split=4),
                 rm.tile_for(m.shape)):
        y = rm.resident_mm(x, m.blob, m.shape, bits, group, m.offsets, scale_dtype == torch.bfloat16, tile)
        assert y.dtype == dtype and y.shape == (rows, n)
        # float32: the order of a sum; bf16: each dequantized weight rounded to bf16 (2^-9) and the output's rounding
        assert rel_error(y, want) < (1e-5 if dtype == torch.float32 else 1.2e-2)


def test_a_step_takes_the_widest_whole_groups_that_divide_the_row():
    assert rm.step_columns(4096, 32, 256) == 256
    assert rm.step_columns(2880, 32, 256) == 64  # GPT-OSS's 90 groups a row
    assert rm.step_columns(224, 32, 128) == 32  # 7 groups
    assert rm.step_columns(4096, 128, 64) == 128  # a group at least
    assert rm.supported(4, 32) and rm.supported(8, 128) and not rm.supported(2, 32) and not rm.supported(4, 48)
    assert not rm.supported(4, 16)  # wrong in bf16 on the H200: the grouped kernel takes them
    assert rm.tile_for((248320, 4096)) == rm.MMTile(64, 128) and rm.tile_for((4096, 8192)) == rm.MMTile(32, 256)


@pytest.mark.skipif(DEVICE != "cuda", reason="AffineMatrix takes its kernels on a GPU only")
@pytest.mark.parametrize("n,rows", [(300, 1), (300, 4), (300, 5), (9000, 4), (9000, 8), (300, 33), (300, mt.GEMM_MAX_ROWS)])
def test_affine_matrix_sends_a_batch_past_dot4_to_the_batch_kernel(n, rows):
    """dot4 takes up to 4 rows, resident_mm the rest."""
    m = matrix(n, 512, 4, 32, torch.float16, torch.bfloat16, seed=rows)
    assert m.mm and not m.gemm
    x = torch.randn(rows, 512, device=DEVICE, dtype=torch.bfloat16)
    want = F.linear(x.float(), m.dequantize(torch.float32))
    assert rel_error(m(x), want) < 3e-2  # dot4's rounded activations at few rows, within bf16's rounding past them
    assert m.dot4_rows == affine.DOT4_MAX_ROWS == 4
    if rows > affine.DOT4_MAX_ROWS:
        tile = rm.tile_for(m.shape)
        assert torch.equal(m(x), rm.resident_mm(x, m.blob, m.shape, 4, 32, m.offsets, False, tile))
