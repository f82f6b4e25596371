"""The grouped (prompt) expert kernels alone, over their tiles: a layer's experts for a prompt, all in VRAM.

    python benchmarks/prompt_kernels.py --geometry 397b [--tokens 512] [--bits 4] [--group-size 32] [--out f.md]

A slab of a whole layer's experts (random codes) and a prompt's routing (each token K distinct experts, uniform:
what random-weight models do) go through gate_up_swiglu and down_grouped (moe_triton.PromptTile) at each tile of a
three-stage search: operand order x K step x output rows x a product per bit position first, then warps x
pipeline stages around the best two, then pairs per tile around the best one. Each tile's output is checked
against the default tile's, and the default's against the torch reference on a few experts. Times are
triton.testing.do_bench medians; GB/s counts each chosen expert's weights once (the floor: every byte read once
from HBM).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import torch
import triton

from flashmoe.config import ModelConfig
from flashmoe.kernels import moe_triton as mt
from flashmoe.routed import ExpertPairs
from flashmoe.synthetic import QWEN3_5_35B, QWEN3_5_397B, QWEN3_235B, _random_blobs, expert_layout

GEOMETRIES = {"397b": QWEN3_5_397B, "35b": QWEN3_5_35B, "qwen3-235b": QWEN3_235B,
              "tiny": dict(QWEN3_5_35B, hidden_size=256, moe_intermediate_size=128, num_experts=16)}  # a smoke test


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def bench(f, rep_ms: int) -> float:
    """Milliseconds per call: do_bench's median on a GPU; on a CPU (Triton's interpreter, smoke tests) one call."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        f()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(f, warmup=5, rep=rep_ms, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", choices=GEOMETRIES, default="397b")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="the default tiles only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = ModelConfig.from_hf({**GEOMETRIES[args.geometry], "num_hidden_layers": 1})
    layout = expert_layout(cfg, args.bits, args.group_size)
    qb = mt.QuantBlob.from_layout(layout, args.bits, args.group_size)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    e, k, t = cfg.num_experts, cfg.num_experts_per_tok, args.tokens
    slab = _random_blobs(layout, e, args.bits, torch.Generator(dev).manual_seed(0), dev)
    gen = torch.Generator(dev).manual_seed(1)
    # bfloat16 as the engine runs; float32 in the interpreter (its bfloat16 tl.dot is wrong)
    x = torch.randn(t, cfg.hidden_size, device=dev, generator=gen).to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
    ids = torch.rand(t, e, device=dev, generator=gen).topk(k, dim=1).indices
    pairs = ExpertPairs.of(ids)
    pair_row, starts = pairs.batch(pairs.experts)
    token_of = (pair_row // k).to(torch.int32)
    expert_start = mt.to_device_int32(starts, dev)
    slots = mt.to_device_int32(pairs.experts, dev)
    pair_weight = torch.rand(t * k, device=dev, generator=gen)[pair_row]
    counts = [b - a for a, b in zip(starts, starts[1:])]
    up_bytes = layout.segments[3].offset  # gate_up's codes, scales and biases precede down's
    per_expert = {"gate_up": up_bytes, "down": layout.blob_bytes - up_bytes}
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (Triton's interpreter)"
    lines = [f"{args.geometry}: hidden {cfg.hidden_size}, {e} experts of {cfg.moe_intermediate_size}, K={k}, {t} "
             f"tokens, {args.bits}-bit group {args.group_size}; {len(pairs.experts)} experts chosen, pairs per expert "
             f"mean {sum(counts) / len(counts):.1f}, max {max(counts)}; {where}", ""]
    print(lines[0], flush=True)

    act0 = mt.gate_up_swiglu(x, slab, slots, token_of, expert_start, qb, expert_start_list=starts)
    y0 = mt.down_grouped(act0, slab, slots, expert_start, pair_weight, qb, expert_start_list=starts)
    few = 4  # the torch reference on the first few experts (it loops in Python)
    n_few = starts[few]
    act_ref = mt.reference_gate_up_swiglu(x, slab, slots[:few], token_of[:n_few], expert_start[: few + 1], layout, qb)
    y_ref = mt.reference_down_grouped(act0[:n_few], slab, slots[:few], expert_start[: few + 1], pair_weight[:n_few],
                                      layout, qb)
    lines.append(f"default tiles vs the torch reference ({few} experts): gate_up {rel_error(act0[:n_few], act_ref):.1e}, "
                 f"down {rel_error(y0[:n_few], y_ref):.1e}")

    def run(kind: str, tile: mt.PromptTile):
        if kind == "gate_up":
            return lambda: mt.gate_up_swiglu(x, slab, slots, token_of, expert_start, qb, starts, tile)
        return lambda: mt.down_grouped(act0, slab, slots, expert_start, pair_weight, qb, starts, tile)

    def measure(kind: str, tile: mt.PromptTile) -> tuple[float, float]:
        f = run(kind, tile)
        err = rel_error(f(), act0 if kind == "gate_up" else y0)
        return bench(f, 40), err

    best = {}
    for kind, default in (("gate_up", mt.GATE_UP_TILE), ("down", mt.DOWN_TILE)):
        moved = len(pairs.experts) * per_expert[kind]
        results = {}

        def tried(tile):
            if tile in results:
                return
            t0 = time.perf_counter()
            try:
                results[tile] = measure(kind, tile)
            except Exception as exc:  # a tile that does not compile (shared memory, registers): named and skipped
                print(f"{kind} {tile}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
                return
            ms, err = results[tile]
            print(f"{kind} {tile}: {ms * 1e3:8.1f} us {moved / ms / 1e6:6.0f} GB/s err {err:.1e} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)

        tried(default)
        if not args.quick:
            splits = (False, True) if args.bits < 8 else (False,)
            for swap, block_k, block_n, split in itertools.product((False, True), (32, 64, 128), (64, 128), splits):
                tried(dataclasses.replace(default, swap=swap, block_k=block_k, block_n=block_n, split=split))
            top = sorted(results, key=lambda tile: results[tile][0])[:2]
            for tile, warps, stages in itertools.product(top, (4, 8), (2, 4)):
                tried(dataclasses.replace(tile, num_warps=warps, num_stages=stages))
            first = min(results, key=lambda tile: results[tile][0])
            for block_t in (16, 32, 64):
                tried(dataclasses.replace(first, block_t=block_t))
        ranked = sorted(results, key=lambda tile: results[tile][0])
        best[kind] = ranked[0]
        lines += ["", f"### {kind}: {moved / 1e9:.2f} GB of weights", "",
                  "| tile | us | GB/s | vs default | rel. error vs default |", "|---|---|---|---|---|"]
        for tile in ranked[:12] + ([default] if default not in ranked[:12] else []):
            ms, err = results[tile]
            lines.append(f"| {tile} | {ms * 1e3:.1f} | {moved / ms / 1e6:.0f} | "
                         f"{results[default][0] / ms:.2f}x | {err:.1e} |")

    def layer(tiles):  # the whole routed-experts step as routed.RoutedExperts._run_gpu runs it
        act = mt.gate_up_swiglu(x, slab, slots, token_of, expert_start, qb, starts, tiles[0])
        y = mt.down_grouped(act, slab, slots, expert_start, pair_weight, qb, starts, tiles[1])
        out = torch.zeros(t * k, cfg.hidden_size, dtype=torch.float32, device=dev)
        out.index_copy_(0, pair_row, y.float())
        return out.view(t, k, -1).sum(1).to(x.dtype)

    for name, tiles in (("default", (mt.GATE_UP_TILE, mt.DOWN_TILE)), ("best", (best["gate_up"], best["down"]))):
        ms = bench(lambda: layer(tiles), 100)
        lines.append(f"\nwhole routed step, {name} tiles: {ms:.2f} ms a layer ({t / ms * 1e3:.0f} tokens/s a layer; "
                     f"{len(pairs.experts) * layout.blob_bytes / ms / 1e6:.0f} GB/s)")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
