"""A quantized resident matrix (an MLX import's: 4-bit, group 64, bf16 scales) times one token on the GPU, through
kernels/affine.py's Triton matrix-vector kernel, beside the same matrix in bf16 through cuBLAS. Timed in a Python
loop, as eager decode runs it (small matrices are then bound by launches, not bytes).

    python benchmarks/resident_gemv.py [--out benchmarks/RESULTS.md]
    python benchmarks/resident_gemv.py --sweep     # the kernel's tiles on resident_format int8/int4 matrices
    python benchmarks/resident_gemv.py --dot4 [--bits 4]  # the integer dot-product kernel (dot4_gemv.py): tiles,
                                                         # K splits, every resident shape of a 397B step, in graphs

--sweep: the matrices `load(resident_format=...)` makes at the Qwen3.5-397B geometry (group 32, fp16 scales: the
248k-row head, a fused DeltaNet input projection, an output projection), each tile (rows per program, bytes a row
per step, warps) timed in a CUDA graph of many launches over copies of the matrix (so each reads HBM, not L2),
every tile's result checked against the default's.
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
# every resident matrix of a 397B decode step (int4/int8 residents): the head, DeltaNet's fused in_proj, attention's
# fused qkv, both output projections, the MoE input (router + shared gate/up + its gate), the shared expert's down
DOT4_SHAPES = [(248320, 4096), (20608, 4096), (17408, 4096), (4096, 8192), (2561, 4096), (4096, 1024)]
L2_BYTES = 256 << 20  # copies of a matrix cycled until this many bytes: none still in the H200's L2 (~50 MB)


DEVICE = "cuda"


def gpu_us(fn, reps: int = 50, copies: int = 1) -> float:
    """Mean GPU time of fn(i) over reps launches captured in one CUDA graph (as decode runs them: no host time
    between kernels), i cycling over `copies` matrices so that each launch reads its own from HBM."""
    for i in range(min(copies, 3)):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % copies)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def _case(n: int, k: int, bits: int):
    """Random [n, k] matrices as resident_format makes them (copies of one, L2_BYTES in all), a token, and the
    kernels' common arguments."""
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    m = AffineMatrix.quantized(w, bits, torch.bfloat16)
    ms = [m] + [AffineMatrix.quantized(w, bits, torch.bfloat16) for _ in range(L2_BYTES // m.blob.numel())]
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    return ms, x, dict(shape=m.shape, bits=bits, group_size=32, offsets=m.offsets,
                       scale_bf16=m.q.scales.dtype == torch.bfloat16), w


def sweep() -> list[str]:
    from flashmoe.kernels import moe_triton as mt

    rows = []
    for bits in (4, 8):
        for n, k in SWEEP_SHAPES:
            ms, x, base, _ = _case(n, k, bits)
            nbytes = ms[0].blob.numel()
            chosen = mt.affine_gemv_tile(bits, 32, (n, k))  # what AffineMatrix uses on a GPU
            want = mt.affine_gemv(x, ms[0].blob, block_b=chosen[1], block_n=chosen[0], num_warps=chosen[2], **base)
            results = []
            for block_b in (256, 512):
                if k % (block_b * 8 // bits):
                    continue
                for block_n in (8, 16, 32, 64):
                    for warps in (4, 8):
                        def run(i=0, block_b=block_b, block_n=block_n, warps=warps):
                            return mt.affine_gemv(x, ms[i].blob, block_b=block_b, block_n=block_n, num_warps=warps,
                                                  **base)
                        if not torch.allclose(run().float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                            raise SystemExit(f"tile {block_n}/{block_b}/{warps} disagrees with the default")
                        results.append((gpu_us(run, copies=len(ms)), block_n, block_b, warps))
            default = next(r[0] for r in results if (r[1], r[2], r[3]) == chosen)
            best = min(results)
            rows.append(f"| {n}x{k} | {bits} | {default:.1f} ({nbytes / default / 1e3:.0f} GB/s) | {best[0]:.1f} "
                        f"({nbytes / best[0] / 1e3:.0f} GB/s) | {best[1]} / {best[2]} / {best[3]} |")
            print(rows[-1], flush=True)
            print("  all:", " ".join(f"{b}/{bb}/{w}:{t:.0f}" for t, b, bb, w in sorted(results)[:8]), flush=True)
    return rows


def dot4_sweep(bits_list=(4, 8)) -> list[str]:
    """The integer dot-product kernel (kernels/dot4_gemv.py) at its tiles and K splits beside the float kernel's
    chosen tile and bf16 through cuBLAS, every resident matrix shape of a 397B decode step, one token and a decode
    batch's 8, in CUDA graphs."""
    from flashmoe.kernels import dot4_gemv as d4
    from flashmoe.kernels import moe_triton as mt

    rows = []
    for bits in bits_list:
        for n, k in DOT4_SHAPES:
            ms, x, base, w = _case(n, k, bits)
            copies, nbytes = len(ms), ms[0].blob.numel()
            dense = [w] + [w.clone() for _ in range(L2_BYTES // w.numel() // 2)]
            bf16_us = gpu_us(lambda i: F.linear(x, dense[i]), copies=len(dense))
            block_n, block_b, warps = mt.affine_gemv_tile(bits, 32, (n, k))
            float_us = gpu_us(lambda i: mt.affine_gemv(x, ms[i].blob, block_b=block_b, block_n=block_n,
                                                       num_warps=warps, **base), copies=copies)
            chosen = ms[0].dot4  # AffineMatrix's tile (dot4_gemv.resident_tile)
            chosen_us = gpu_us(lambda i: ms[i](x), copies=copies)
            tile = " / ".join(str(chosen[key]) for key in ("block_n", "block_w", "num_warps", "split", "fused"))
            want = F.linear(x.float(), ms[0].dequantize(torch.float32))
            results = []
            steps_max = k * bits // 32
            for block_n in (4, 8, 16, 32):
                for block_w in (32, 64, 128, 256):
                    if not d4.supported(bits, 32, k, block_w):
                        continue
                    for split in (1, 2, 4):
                        if split > steps_max // block_w or (split > 1 and n > 32768):
                            continue
                        for warps in (4, 8) if block_n * block_w >= 2048 else (4,):
                            for fused in (False, True):
                                def run(i=0, block_n=block_n, block_w=block_w, warps=warps, split=split, fused=fused):
                                    return d4.dot4_gemv(x, ms[i].blob, block_n=block_n, block_w=block_w,
                                                        num_warps=warps, split=split, fused=fused, **base)
                                err = float((run().float() - want).norm() / want.norm())
                                if err > 0.02:
                                    raise SystemExit(f"dot4 tile {block_n}/{block_w}/{warps}/{split}/{fused}: "
                                                     f"error {err:.4f}")
                                results.append((gpu_us(run, copies=copies), block_n, block_w, warps, split, fused))
            best = min(results)
            gbps = lambda us: f"{nbytes / us / 1e3:.0f} GB/s"  # noqa: E731
            rows.append(f"| {n}x{k} | {bits} | 1 | {bf16_us:.1f} | {float_us:.1f} ({gbps(float_us)}) | "
                        f"{chosen_us:.1f} ({gbps(chosen_us)}; {tile}) | {best[0]:.1f} ({gbps(best[0])}) "
                        f"| {' / '.join(map(str, best[1:]))} | {float_us / best[0]:.2f}x |")
            print(rows[-1], flush=True)
            print("  all:", " ".join(f"{'/'.join(map(str, r[1:]))}:{r[0]:.1f}" for r in sorted(results)[:10]),
                  flush=True)
            # a decode batch's rows: through AffineMatrix (dot4, its tile), at the best one-row tile, and through
            # the grouped tensor-core kernel that reads the matrix once (what rows past dot4's reach take)
            for batch in (4, 8, 16):
                xb = torch.randn(batch, k, device=DEVICE, dtype=torch.bfloat16)
                bf16_b = gpu_us(lambda i: F.linear(xb, dense[i]), copies=len(dense))
                grouped_b = gpu_us(lambda i: mt.affine_gemm(xb, ms[i].blob, **base), copies=copies)
                chosen_b = gpu_us(lambda i: ms[i](xb), copies=copies)
                best_b = gpu_us(lambda i: d4.dot4_gemv(xb, ms[i].blob, block_n=best[1], block_w=best[2],
                                                       num_warps=best[3], split=best[4], fused=best[5], **base),
                                copies=copies)
                rows.append(f"| {n}x{k} | {bits} | {batch} | {bf16_b:.1f} | {grouped_b:.1f} (grouped) | "
                            f"{chosen_b:.1f} | {best_b:.1f} | {' / '.join(map(str, best[1:]))} | |")
                print(rows[-1], flush=True)
            ms.clear(), dense.clear()  # the copies, before the next shape
            torch.cuda.empty_cache()
    return rows


def rows_sweep(bits_list=(4,), counts=(8, 16, 32, 64)) -> list[str]:
    """A decode batch's rows through every resident shape of a 397B step: bf16 through cuBLAS, dot4 (AffineMatrix's
    one-row tile) and resident_mm at its tiles, in CUDA graphs."""
    from flashmoe.kernels import affine
    from flashmoe.kernels import dot4_gemv as d4
    from flashmoe.kernels import resident_mm as rm

    tiles = [rm.MMTile(block_n, block_k, warps) for block_n in (32, 64, 128) for block_k in (128, 256) for warps in (4, 8)]
    tiles += [rm.MMTile(block_n, block_k, 4, split=split) for block_n in (32, 64) for block_k in (128, 256)
              for split in (2, 4)]  # K splits: more programs for the matrices of few rows
    rows = []
    for bits in bits_list:
        for n, k in DOT4_SHAPES:
            ms, _, base, w = _case(n, k, bits)
            copies, nbytes = len(ms), ms[0].blob.numel()
            dense = [w] + [w.clone() for _ in range(L2_BYTES // w.numel() // 2)]
            for count in counts:
                xb = torch.randn(count, k, device=DEVICE, dtype=torch.bfloat16)
                want = F.linear(xb.float(), ms[0].dequantize(torch.float32))
                bf16_us = gpu_us(lambda i: F.linear(xb, dense[i]), copies=len(dense))
                dot4_us = (gpu_us(lambda i: d4.dot4_gemv(xb, ms[i].blob, **base, **ms[i].dot4), copies=copies)
                           if count <= d4.MAX_ROWS and ms[0].dot4 else float("nan"))
                timed = []
                for tile in tiles:
                    if tile.split > 1 and n > 32768:  # the head: programs enough, and partials of 248k rows
                        continue

                    def run(i=0, tile=tile):
                        return rm.resident_mm(xb, ms[i].blob, tile=tile, **base)
                    err = float((run().float() - want).norm() / want.norm())
                    if err > 0.02:
                        raise SystemExit(f"resident_mm {tile}: error {err:.4f}")
                    timed.append((gpu_us(run, copies=copies), tile))
                best_us, best = min(timed, key=lambda t: t[0])
                chosen_us = next(us for us, tile in timed if tile == rm.tile_for((n, k)))
                path_us = gpu_us(lambda i: ms[i](xb), copies=copies)
                rows.append(f"| {n}x{k} | {bits} | {count} | {bf16_us:.1f} | {dot4_us:.1f} | {best_us:.1f} "
                            f"({nbytes / best_us / 1e3:.0f} GB/s) | {best.block_n} / {best.block_k} / {best.num_warps} / {best.split} | "
                            f"{chosen_us:.1f} | {path_us:.1f} | {bf16_us / path_us:.2f}x |")
                print(rows[-1], flush=True)
                print("  all:", " ".join(f"{t.block_n}/{t.block_k}/{t.num_warps}/{t.split}:{us:.1f}"
                                         for us, t in sorted(timed, key=lambda t: t[0])[:6]), flush=True)
            ms.clear(), dense.clear()
            torch.cuda.empty_cache()
    print(f"AffineMatrix: dot4 up to {affine.DOT4_MAX_ROWS} rows, resident_mm past them", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, default=None)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--dot4", action="store_true", help="the integer dot-product kernel against the float one")
    parser.add_argument("--bits", type=lambda v: tuple(int(b) for b in v.split(",")), default=(4, 8))
    parser.add_argument("--rows", action="store_true", help="a decode batch's rows: resident_mm's tiles against the rest")
    parser.add_argument("--counts", type=lambda v: tuple(int(c) for c in v.split(",")), default=(8, 16, 32, 64),
                        help="--rows: the batch sizes")
    args = parser.parse_args()
    if args.rows:
        publish(section("A decode batch's rows times quantized resident matrices (kernels/resident_mm.py), in CUDA graphs",
                        torch.cuda.get_device_name(), "us per product: 50 launches in one CUDA graph over copies of the "
                        "matrix (each read from HBM). bf16: cuBLAS; dot4: dot4_gemv at AffineMatrix's tile; resident_mm: "
                        "the sweep's best (output rows a program / columns a step / warps / K splits; GB/s: the quantized matrix's "
                        "bytes) and tile_for's; AffineMatrix: what decode runs.",
                        ["matrix", "bits", "rows", "bf16", "dot4", "resident_mm best", "best tile", "tile_for",
                         "AffineMatrix", "bf16 / AffineMatrix"],
                        rows_sweep(args.bits if args.bits != (4, 8) else (4,), args.counts)),
                args.out)
        return
    if args.dot4:
        publish(section("Resident matrices through integer dot products (kernels/dot4_gemv.py), in CUDA graphs",
                        torch.cuda.get_device_name(), "us per product: 50 launches captured in one CUDA graph, "
                        "cycling over copies of the matrix (256 MB in all: each read from HBM). bf16: cuBLAS on the "
                        "float matrix; float kernel: affine_gemv at its chosen tile (past one row: the grouped tensor-core kernel, "
                        "affine_gemm, reading the matrix once); AffineMatrix: what decode runs "
                        "(dot4 at its tile: rows / words a step / warps / K splits / rounded in the kernel); best: the sweep's fastest "
                        "within 2% of the float product. GB/s: the quantized matrix's bytes (codes, scales, biases).",
                        ["matrix", "bits", "rows", "bf16, us", "float kernel, us", "AffineMatrix, us", "best dot4, us",
                         "best tile", "best vs float kernel"], dot4_sweep(args.bits)),
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
