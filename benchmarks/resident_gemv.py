"""A quantized resident matrix (an MLX import's: 4-bit, group 64, bf16 scales) times one token on the GPU, through
kernels/affine.py's Triton matrix-vector kernel, beside the same matrix in bf16 through cuBLAS. Timed in a Python
loop, as eager decode runs it (small matrices are then bound by launches, not bytes).

    python benchmarks/resident_gemv.py [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import publish, section
from flashmoe.kernels.affine import AffineMatrix
from flashmoe.quant import QuantizedTensor, quantize

SHAPES = [(8192, 2048), (2048, 4096), (248320, 2048)]  # 35B-A3B: a fused projection, o_proj-like, the head


def time_us(fn, reps: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args()
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k)
        q = quantize(w, 4, 64)
        q = QuantizedTensor(q.packed.cuda(), q.scales.to(torch.bfloat16).cuda(), q.biases.to(torch.bfloat16).cuda(), 4, 64)
        matrix, dense = AffineMatrix(q, torch.bfloat16), w.to(torch.bfloat16).cuda()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        quantized_us, bf16_us = time_us(lambda: matrix(x)), time_us(lambda: F.linear(x, dense))
        packed_bytes = n * k * (0.5 + 2 * 2 / 64)
        rows.append(f"| {n}x{k} | {quantized_us:.1f} us ({packed_bytes / quantized_us / 1e3:.0f} GB/s) | "
                    f"{bf16_us:.1f} us ({n * k * 2 / bf16_us / 1e3:.0f} GB/s) | {bf16_us / quantized_us:.2f}x |")
    publish(section("Quantized resident matrices, one token", torch.cuda.get_device_name(),
                    "4-bit group 64 with bf16 scales (an MLX import's residents) through the Triton matrix-vector "
                    "kernel, against bf16 through cuBLAS; Python loop, no CUDA graph.",
                    ["matrix", "4-bit (kernels/affine.py)", "bf16 (F.linear)", "speed-up"], rows), args.out)


if __name__ == "__main__":
    main()
