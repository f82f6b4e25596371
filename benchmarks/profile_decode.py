"""Where a decode step's GPU time goes: the kernels of each layer kind, from torch.profiler, on a real model's geometry.

    python benchmarks/profile_decode.py --root /data/bench [--geometry 397b] [--layers 4] [--steps 8] [--eager]
        [--bits 4] [--group-size 64] [--vocab N] [--k K] [--host] [--per-layer] [--resident-format int8|int4]

Writes (once) a random store with the geometry (default Qwen3.5-397B-A17B: the first three layers DeltaNet, the
fourth full attention, as in the real model) and --layers layers, loads it with every expert in VRAM, and
profiles --steps decode steps: the kernels sorted by GPU time per step, the head (final norm, lm_head,
argmax) alone, and bf16 matrix-vector products of the layer's shapes against the HBM read bandwidth.
With --eager the layers run without CUDA graphs (the same kernels, launched one by one). --vocab replaces the
real vocabulary (peers.py's 512 leaves a step's layers and host time, the head nearly free); --host adds a cProfile
of the same steps: where the host's time between the GPU's kernels goes. --per-layer: a graph per layer instead of
the whole step's one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import flashmoe
from flashmoe.synthetic import write_random_store
from common import GEOMETRIES, hbm_read_gbps


def gemv_us(rows: int, cols: int) -> float:
    w = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, cols, dtype=torch.bfloat16, device="cuda")
    import triton.testing

    return triton.testing.do_bench(lambda: F.linear(x, w), warmup=20, rep=200) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--geometry", choices=list(GEOMETRIES), default="397b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--host", action="store_true")
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--k", type=int, default=None, help="experts per token (default: the geometry's)")
    ap.add_argument("--resident-format", default=None, help="load's resident_format: int8 / int4 quantize them")
    args = ap.parse_args()
    geometry, k, _, _ = GEOMETRIES[args.geometry]
    k = args.k or k
    vocab = args.vocab or geometry["vocab_size"]
    path = args.root / f"store-{args.geometry}-{args.layers}l-{args.bits}b-g{args.group_size}-v{vocab}"
    if not (path / "manifest.json").exists():
        write_random_store(path, dict(geometry, num_hidden_layers=args.layers, num_experts_per_tok=k,
                                      vocab_size=vocab), bits=args.bits, group_size=args.group_size, device="cuda")
    model = flashmoe.load(path, device="cuda", experts_per_token=k, cuda_graphs=not args.eager,
                          vram_cache_gb=model_bytes_gb(path) * 1.01, resident_format=args.resident_format)
    model.warm_cache()
    model.whole_step_graphs = not args.per_layer
    state = model.new_state()
    logits = model.forward(list(range(100, 116)), state, all_logits=False)
    for _ in range(3):
        logits = model.forward([int(logits[-1].argmax())], state, all_logits=False)
    torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(args.steps):
        logits = model.forward([int(logits[-1].argmax())], state, all_logits=False)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            logits = model.forward([int(logits[-1].argmax())], state, all_logits=False)
        torch.cuda.synchronize()
    if args.host:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            logits = model.forward([int(logits[-1].argmax())], state, all_logits=False)
        torch.cuda.synchronize()
        profiler.disable()
        print(f"\nhost, {args.steps} steps (cProfile slows Python ~2x; the split is what counts):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total_us = sum(e.self_device_time_total for e in events) / args.steps
    kind = "eager" if args.eager else "a graph per layer" if args.per_layer else "one graph a step"
    print(f"\n{kind}: {args.layers} layers, wall {wall_ms:.3f} ms/step, "
          f"GPU kernels {total_us:.1f} us/step, {sum(e.count for e in events) / args.steps:.0f} kernels/step")
    print(f"{'us/step':>9} {'calls/step':>10}  kernel")
    for e in events[: args.top]:
        print(f"{e.self_device_time_total / args.steps:9.1f} {e.count / args.steps:10.1f}  {e.key[:110]}")

    x = torch.randn(1, model.config.hidden_size, dtype=torch.bfloat16, device="cuda")
    import triton.testing

    head_us = triton.testing.do_bench(lambda: model.model.logits(x).argmax(), warmup=10, rep=100) * 1e3
    read = hbm_read_gbps()
    print(f"\nhead (norm, lm_head, argmax): {head_us:.1f} us; HBM read {read:.0f} GB/s")
    # every matrix of the store's layers (its resident names), one of each shape
    shapes = {}
    for name, t in model.model.w.items():
        if name.startswith("model.layers.") and len(t.shape) == 2 and tuple(t.shape) not in shapes.values():
            shapes[name.split(".", 3)[3]] = tuple(t.shape)
    for name, (r, c) in shapes.items():
        us = gemv_us(r, c)
        print(f"bf16 gemv {name:30s} [{r}x{c}]: {us:7.1f} us, {r * c * 2 / us / 1e3:6.0f} GB/s "
              f"(bound {r * c * 2 / read / 1e3:6.1f} us)")
    model.close()


def model_bytes_gb(path: Path) -> float:
    from flashmoe.store import Store

    return Store(path).expert_bytes / 1e9


if __name__ == "__main__":
    main()
