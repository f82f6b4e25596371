"""Prompt processing (512 tokens) with every expert in VRAM, and where its time goes.

    python benchmarks/prefill.py --root /root [--geometry 35b|397b] [--layers 8] [--bits 8] [--group-size 32] [--profile]
        [--tokens 512] [--grouped]

A random-weight store with the Qwen3.5-35B-A3B geometry (the issue-17 model: hidden 2048, 256 experts of 512,
K=8) or Qwen3.5-397B-A17B's (hidden 4096, 512 experts of 1024, K=10), small vocabulary, is written on the GPU once
under --root; the prompt is timed four times (the first
compiles Triton kernels) and, with --profile, once under the torch profiler.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import flashmoe
from flashmoe.synthetic import QWEN3_5_35B, QWEN3_5_397B, write_random_store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--geometry", choices=("35b", "397b"), default="35b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--grouped", action="store_true",
                    help="the grouped (prompt) expert kernels even for a short prompt (routed.DECODE_KERNEL_PAIRS 0)")
    args = ap.parse_args()
    store = args.root / f"prefill-{args.geometry}-{args.layers}l-{args.bits}bit-g{args.group_size}"
    if not (store / "manifest.json").exists():
        geometry = QWEN3_5_35B if args.geometry == "35b" else QWEN3_5_397B
        cfg = dict(geometry, num_hidden_layers=args.layers, vocab_size=512)
        write_random_store(store, cfg, bits=args.bits, group_size=args.group_size, device="cuda")
    if args.grouped:
        from flashmoe import routed

        routed.DECODE_KERNEL_PAIRS = 0
    model = flashmoe.load(store, device="cuda")
    model.warm_cache()
    ids = [10 + i % 490 for i in range(args.tokens)]
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.forward(ids, model.new_state(), all_logits=False)
        torch.cuda.synchronize()
        print(f"pp{args.tokens}: {args.tokens / (time.perf_counter() - t0):.1f} tok/s", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.forward(ids, model.new_state(), all_logits=False)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))  # where the host's time goes


if __name__ == "__main__":
    main()
