"""Resident matrices kept quantized (kernels/affine.py): the Triton matrix-vector kernel against dequantization, on
odd shapes, every width and both scale dtypes; stacking and row lookups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_error
from flashmoe.kernels import moe_triton as mt
from flashmoe.kernels import resident_mm
from flashmoe.kernels.affine import AffineMatrix, RowStack
from flashmoe.kernels.linear import cat_rows, embedding, linear
from flashmoe.quant import QuantizedTensor, quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def matrix(n: int, k: int, bits: int, group: int, scale_dtype=torch.bfloat16, seed: int = 0,
           dtype=torch.float32) -> AffineMatrix:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q = quantize(w, bits, group)
    q = QuantizedTensor(q.packed, q.scales.to(scale_dtype), q.biases.to(scale_dtype), bits, group)
    return AffineMatrix(QuantizedTensor(*(t.to(DEVICE) for t in (q.packed, q.scales, q.biases)), bits, group), dtype)


@pytest.mark.skipif(not mt.triton_available(), reason="needs triton")
@pytest.mark.parametrize("n,k,bits,group", [(37, 96, 4, 32), (16, 64, 8, 64), (50, 128, 2, 32), (9, 256, 4, 64)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2])
def test_gemv_kernel_matches_dequantized_product(n, k, bits, group, scale_dtype, rows):
    m = matrix(n, k, bits, group, scale_dtype, seed=n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    block_b = mt.affine_gemv_block_bytes(bits, group, k)
    y = mt.affine_gemv(x, m.blob, m.shape, bits, group, m.offsets, scale_dtype == torch.bfloat16, block_b)
    assert rel_error(y, F.linear(x, m.dequantize(torch.float32))) < 1e-5


@pytest.mark.skipif(not mt.triton_available(), reason="needs triton")
def test_the_wide_tile_of_8bit_matrices_of_many_rows_gives_the_same_product():
    """8-bit matrices of 16384 rows or more take 32 rows a program and 256 bytes a step (measured faster on the H200);
    the kernel with that tile on an odd shape (rows past the last 32 masked, a row of two steps) is the product."""
    assert mt.affine_gemv_tile(8, 32, (248320, 4096)) == (32, 256, 4)
    assert mt.affine_gemv_tile(8, 32, (4096, 8192)) == (mt.DECODE_TILE["block_n"], 512, mt.DECODE_TILE["num_warps"])
    assert mt.affine_gemv_tile(4, 32, (248320, 4096)) == (mt.DECODE_TILE["block_n"], 512, mt.DECODE_TILE["num_warps"])
    assert mt.affine_gemv_tile(8, 32, (20000, 96)) == (32, 32, 4)  # 96 columns: one group a step
    m = matrix(45, 512, 8, 32, torch.float16, seed=5)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = mt.affine_gemv(x, m.blob, m.shape, 8, 32, m.offsets, False, 256, block_n=32, num_warps=4)
    assert rel_error(y, F.linear(x, m.dequantize(torch.float32))) < 1e-5


@pytest.mark.skipif(not mt.triton_available(), reason="needs triton")
@pytest.mark.parametrize("n,k,bits,group", [(37, 96, 4, 32), (70, 64, 8, 64), (33, 128, 2, 32), (40, 256, 4, 16)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [3, 17])
def test_a_few_rows_read_the_matrix_once_through_the_grouped_kernel(n, k, bits, group, scale_dtype, rows):
    """A decode batch's rows (3..GEMM_MAX_ROWS): one grouped kernel over the codes, as the dequantized product; the
    rows past a tile of 16 and the output rows past a block of 32 masked. AffineMatrix takes it for the codes
    resident_mm does not (2 bits); the rest go to resident_mm (test_resident_mm.py)."""
    m = matrix(n, k, bits, group, scale_dtype, seed=n + k + rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    y = mt.affine_gemm(x, m.blob, m.shape, bits, group, m.offsets, scale_dtype == torch.bfloat16)
    assert rel_error(y, F.linear(x, m.dequantize(torch.float32))) < 1e-5
    # on a GPU AffineMatrix takes this kernel for what resident_mm does not take (2 bits, groups of 16)
    assert m.gemm == (DEVICE == "cuda" and not resident_mm.supported(bits, group))
    assert rel_error(m(x), F.linear(x, m.dequantize(torch.float32))) < 1e-5


def test_product_rows_and_stacks_agree_with_the_dense_matrix():
    a, b = matrix(24, 64, 4, 32, seed=1), matrix(8, 64, 4, 32, seed=2)
    router = matrix(6, 64, 8, 64, seed=3)
    dense = torch.cat([a.dequantize(), b.dequantize(), router.dequantize()])
    x = torch.randn(5, 64, device=DEVICE)
    stacked = cat_rows([a, b, router])
    assert isinstance(stacked, RowStack) and [type(p) for p in stacked.parts] == [AffineMatrix, AffineMatrix]
    assert stacked.shape == (38, 64) and stacked.parts[0].shape == (32, 64)  # a and b share a scheme: one matrix
    assert rel_error(linear(x, stacked), F.linear(x, dense)) < 1e-6
    ids = torch.tensor([[3, 0], [23, 7]], device=DEVICE)
    assert torch.equal(embedding(ids, a), F.embedding(ids, a.dequantize()))


def test_big_products_dequantize_a_slice_at_a_time(monkeypatch):
    monkeypatch.setattr("flashmoe.kernels.affine.DEQUANT_CHUNK_ELEMENTS", 64 * 10)  # 10 rows a slice
    m = matrix(37, 64, 4, 32)
    x = torch.randn(3, 64, device=DEVICE)
    assert rel_error(m(x), F.linear(x, m.dequantize())) < 1e-6
