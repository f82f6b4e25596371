"""A quantized resident matrix (an MLX import's: 4-bit, group 64, bf16 scales) times one token on the GPU, through
kernels/affine.py's Triton matrix-vector kernel, beside the same matrix in bf16 through cuBLAS. Timed in a Python
loop, as eager decode runs it (small matrices are then bound by launches, not bytes).

    python benchmarks/resident_gemv.py [--out benchmarks/RESULTS.md]
    python benchmarks/resident_gemv.py --sweep     # the kernel's tiles on resident_format int8/int4 matrices
    python benchmarks/resident_gemv.py --dot4      # the integer dot-product kernel (dot4_gemv.py) against it

--sweep: the matrices `load(resident_format=...)` makes at the Qwen3.5-397B geometry (group 32, fp16 scales: the
248k-row head, a fused DeltaNet input projection, an output projection), each tile (rows per program, bytes a row
per step, warps) timed with CUDA events over many launches, every tile's result checked against the default's.
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


SWEEP_SHAPES = [(248320, 4096), (20608, 4096), (4096, 8192)]  # 397B: the head, DeltaNet's fused in_proj, out_proj


DEVICE = "cuda"


def gpu_us(fn, reps: int = 50) -> float:
    """Mean GPU time of fn over reps launches, CUDA events (no host gaps between large kernels to count)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def _case(n: int, k: int, bits: int):
    """A random [n, k] matrix as resident_format makes it, a token, and the kernels' common arguments."""
    m = AffineMatrix.quantized(torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16), bits, torch.bfloat16)
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    return m, x, dict(shape=m.shape, bits=bits, group_size=32, offsets=m.offsets,
                      scale_bf16=m.q.scales.dtype == torch.bfloat16)


def sweep() -> list[str]:
    from flashmoe.kernels import moe_triton as mt

    rows = []
    for bits in (4, 8):
        for n, k in SWEEP_SHAPES:
            m, x, base = _case(n, k, bits)
            nbytes = m.blob.numel()
            chosen = mt.affine_gemv_tile(bits, 32, (n, k))  # what AffineMatrix uses on a GPU
            want = mt.affine_gemv(x, m.blob, block_b=chosen[1], block_n=chosen[0], num_warps=chosen[2], **base)
            results = []
            for block_b in (256, 512):
                if k % (block_b * 8 // bits):
                    continue
                for block_n in (8, 16, 32, 64):
                    for warps in (4, 8):
                        def run(block_b=block_b, block_n=block_n, warps=warps):
                            return mt.affine_gemv(x, m.blob, block_b=block_b, block_n=block_n, num_warps=warps, **base)
                        if not torch.allclose(run().float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                            raise SystemExit(f"tile {block_n}/{block_b}/{warps} disagrees with the default")
                        results.append((gpu_us(run), block_n, block_b, warps))
            default = next(r[0] for r in results if (r[1], r[2], r[3]) == chosen)
            best = min(results)
            rows.append(f"| {n}x{k} | {bits} | {default:.1f} ({nbytes / default / 1e3:.0f} GB/s) | {best[0]:.1f} "
                        f"({nbytes / best[0] / 1e3:.0f} GB/s) | {best[1]} / {best[2]} / {best[3]} |")
            print(rows[-1], flush=True)
            print("  all:", " ".join(f"{b}/{bb}/{w}:{t:.0f}" for t, b, bb, w in sorted(results)[:8]), flush=True)
    return rows


def dot4_sweep() -> list[str]:
    """The integer dot-product kernel (kernels/dot4_gemv.py) beside the float one's chosen tile, same matrices."""
    from flashmoe.kernels import dot4_gemv as d4
    from flashmoe.kernels import moe_triton as mt

    rows = []
    for bits in (4, 8):
        for n, k in SWEEP_SHAPES:
            m, x, base = _case(n, k, bits)
            block_n, block_b, warps = mt.affine_gemv_tile(bits, 32, (n, k))
            float_us = gpu_us(lambda: mt.affine_gemv(x, m.blob, block_b=block_b, block_n=block_n, num_warps=warps,
                                                     **base))
            want = F.linear(x.float(), m.dequantize(torch.float32))
            results = []
            for block_n in (8, 16, 32):
                for block_w in (32, 64, 128):
                    if k % (block_w * 32 // bits):
                        continue
                    for warps in (4, 8):
                        def run(block_n=block_n, block_w=block_w, warps=warps):
                            return d4.dot4_gemv(x, m.blob, block_n=block_n, block_w=block_w, num_warps=warps, **base)
                        err = float((run().float() - want).norm() / want.norm())
                        if err > 0.02:
                            raise SystemExit(f"dot4 tile {block_n}/{block_w}/{warps}: relative error {err:.4f}")
                        results.append((gpu_us(run), block_n, block_w, warps))
            best = min(results)
            rows.append(f"| {n}x{k} | {bits} | 1 | {float_us:.1f} ({m.blob.numel() / float_us / 1e3:.0f} GB/s) | "
                        f"{best[0]:.1f} ({m.blob.numel() / best[0] / 1e3:.0f} GB/s) | {best[1]} / {best[2]} / {best[3]} | "
                        f"{float_us / best[0]:.2f}x |")
            print(rows[-1], flush=True)
            # a decode batch's 8 rows: the grouped kernel AffineMatrix uses today against dot4 at the best tile
            x8 = torch.randn(8, k, device=DEVICE, dtype=torch.bfloat16)
            grouped_us = gpu_us(lambda: mt.affine_gemm(x8, m.blob, **base))
            dot_us = gpu_us(lambda: d4.dot4_gemv(x8, m.blob, block_n=best[1], block_w=best[2], num_warps=best[3],
                                                 **base))
            rows.append(f"| {n}x{k} | {bits} | 8 | {grouped_us:.1f} (grouped kernel) | {dot_us:.1f} | "
                        f"{best[1]} / {best[2]} / {best[3]} | {grouped_us / dot_us:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, default=None)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--dot4", action="store_true", help="the integer dot-product kernel against the float one")
    args = parser.parse_args()
    if args.dot4:
        publish(section("Resident matrices through integer dot products (kernels/dot4_gemv.py)",
                        torch.cuda.get_device_name(), "One token, CUDA events over 50 launches; the float kernel at "
                        "its chosen tile; dot4: activations rounded to int8 per 32, best of 18 tiles (rows / words a "
                        "step / warps), each within 2% of the float product.",
                        ["matrix", "bits", "rows", "float kernel, us", "dot4, us", "dot4 tile", "speed-up"],
                        dot4_sweep()),
                args.out)
        return
    if args.sweep:
        publish(section("The quantized resident matrix-vector kernel's tiles (resident_format int8/int4, group 32)",
                        torch.cuda.get_device_name(), "One token, CUDA events over 50 launches; bytes: codes, scales "
                        "and biases.", ["matrix", "bits", "chosen tile (affine_gemv_tile), us", "best tile, us",
                                        "best: rows / bytes a step / warps"], sweep()), args.out)
        return
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
