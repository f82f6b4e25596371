"""Expert kernels alone: time per layer of K experts at a model's geometry, achieved HBM bandwidth.

    python benchmarks/kernels.py [--hidden 4096] [--inter 1024] [--k 4] [--bits 4] [--tokens 1] [--no-sweep]

Times gate_up_swiglu + down (decode: the fused weighted sum; several tokens: the grouped kernels) with
triton.testing.do_bench (CUDA events, median), over several block sizes, on experts spread across a slab
larger than L2 so each run reads from HBM. Launched one by one from Python a small kernel's time is mostly the
launch (~25 us); decode replays them in CUDA graphs, so the first lines time 16 layers' calls captured in one graph.
"""

from __future__ import annotations

import argparse

import torch
import triton

from flashmoe.kernels import moe_triton as mt
from flashmoe.synthetic import _random_blobs, expert_layout
from flashmoe.config import ModelConfig
from flashmoe.synthetic import QWEN3_5_397B


def graph_ms(calls) -> float:
    """Milliseconds per call of `calls` (each on other experts) captured in one CUDA graph, replayed."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median") / len(calls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--no-sweep", action="store_true", help="only the default tile: down split vs not, grouped")
    args = ap.parse_args()
    cfg = ModelConfig.from_hf({**QWEN3_5_397B, "hidden_size": args.hidden, "moe_intermediate_size": args.inter,
                               "num_hidden_layers": 1})
    layout = expert_layout(cfg, args.bits, 64)
    qb = mt.QuantBlob.from_layout(layout, args.bits, 64)
    n_slots = max(64, 2 * args.k)  # ~430 MB at the 397B geometry: far beyond L2
    slab = _random_blobs(layout, n_slots, args.bits, torch.Generator("cuda").manual_seed(0), "cuda")
    x = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16)
    rotations = [torch.randperm(n_slots, device="cuda")[: args.k].sort().values.int() for _ in range(16)]
    weights = torch.rand(args.k, device="cuda")
    token_of = torch.zeros(args.k, dtype=torch.int32, device="cuda")
    expert_start = torch.arange(args.k + 1, dtype=torch.int32, device="cuda")
    starts = list(range(args.k + 1))
    moved = args.k * layout.blob_bytes
    print(f"{args.k} experts x {layout.blob_bytes / 1e6:.2f} MB = {moved / 1e6:.1f} MB per layer")
    act = mt.decode_gate_up_swiglu(x[:1], slab, rotations[0], qb)
    up_bytes = args.k * (layout.segments[3].offset)  # gate_up packed + scales + biases precede down
    down_bytes = moved - up_bytes
    t = graph_ms([lambda r=r: mt.decode_gate_up_swiglu(x[:1], slab, r, qb) for r in rotations])
    print(f"gate_up, default tile, in a graph: {t * 1e3:6.1f} us {up_bytes / t / 1e6:5.0f} GB/s")
    # the default tile: down in one launch over all experts, or split (down_split) aiming at several program counts
    default_programs = mt.DOWN_PROGRAMS
    for split, programs in ((False, 0), (True, 2048), (True, 4096), (True, 8192)):
        mt.DOWN_PROGRAMS = programs or default_programs
        t = graph_ms([lambda r=r: mt.down_weighted_sum(act, slab, r, weights, qb, split=split) for r in rotations])
        tile = mt.DECODE_TILE
        chunks = mt.down_split(qb, args.k, tile["block_n"], mt.gemv_block_bytes(qb, args.inter, tile["block_b"]))[1]
        how = f"split into {args.k * chunks} (expert, chunk) rows (DOWN_PROGRAMS {programs})" if split else "one launch"
        print(f"down, default tile, in a graph, {how}: {t * 1e3:6.1f} us {down_bytes / t / 1e6:5.0f} GB/s")
    mt.DOWN_PROGRAMS = default_programs
    sweep = [] if args.no_sweep else [(n, b, w) for n in (2, 4, 8, 16) for b in (128, 256, 512) for w in (2, 4, 8)]
    for block_n, block_b, warps in sweep:  # in graphs, as decode runs them
        t_up = graph_ms([lambda r=r: mt.decode_gate_up_swiglu(x[:1], slab, r, qb, block_n, block_b, warps)
                         for r in rotations])
        t_down = graph_ms([lambda r=r: mt.down_weighted_sum(act, slab, r, weights, qb, block_n, block_b, warps)
                           for r in rotations])
        print(f"decode block_n {block_n:2d} block_b {block_b:3d} warps {warps}: gate_up {t_up * 1e3:6.1f} us "
              f"{up_bytes / t_up / 1e6:5.0f} GB/s | down {t_down * 1e3:6.1f} us {down_bytes / t_down / 1e6:5.0f} GB/s")
    i = [0]

    def grouped():
        slots = rotations[i[0] % len(rotations)]
        i[0] += 1
        act = mt.gate_up_swiglu(x[:1], slab, slots, token_of, expert_start, qb, expert_start_list=starts)
        return mt.down_grouped(act, slab, slots, expert_start, weights, qb, expert_start_list=starts)

    ms = triton.testing.do_bench(grouped, warmup=50, rep=300, return_mode="median")
    print(f"grouped (tl.dot) kernels on one token: {ms * 1e3:7.1f} us  {moved / ms / 1e6:7.0f} GB/s")


if __name__ == "__main__":
    main()
