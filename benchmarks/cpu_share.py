"""Decode with experts in pinned RAM: the GPU reading them all over PCIe vs the CPU computing a share meanwhile.

    python benchmarks/cpu_share.py --root /data/bench [--geometry 35b] [--layers 4] [--bits 8] [--rounds 3]

Writes a random-weight store (flashmoe.synthetic: the geometry's shapes, vocabulary --vocab so the head does not
hide the layers), loads it once with a small VRAM cache (--vram-cache-gb) and every expert in pinned RAM, and
decodes --tokens greedy tokens per setting, the settings taking turns round by round in this one process:

  gpu        cpu_share=0: the GPU reads every RAM-held expert over PCIe inside its kernels (one graph per layer)
  auto       the CPU's share follows measured times (the default; cpu_share.py)
  0.25 ...   fixed shares (--shares)

plus `vram`, a second model with every expert in VRAM (what the RAM regime's decode would be without PCIe). Prints
a markdown table: tok/s (median over the rounds), each setting's ratio to `gpu`, and where auto's share settled.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from common import publish, timed_decode


def build_store(args) -> Path:
    from flashmoe.synthetic import QWEN3_5_35B, QWEN3_5_397B, write_random_store

    geometry = {"35b": QWEN3_5_35B, "397b": QWEN3_5_397B}[args.geometry]
    hf = dict(geometry, num_hidden_layers=args.layers, vocab_size=args.vocab)
    if args.k:
        hf["num_experts_per_tok"] = args.k
    store = args.root / f"share-{args.geometry}-L{args.layers}-K{hf['num_experts_per_tok']}-{args.bits}bit-v{args.vocab}"
    if not (store / "manifest.json").exists():
        write_random_store(store, hf, bits=args.bits, group_size=args.group_size)
    return store


def configure(model, setting: str) -> None:
    """One model, several ways to decode: the stage's share of the CPU on or off, adaptive or fixed."""
    for stage in model.stages:
        graphs = stage.graphs
        share = graphs.cpu_share or getattr(graphs, "_kept_share", None)
        graphs._kept_share = share
        graphs.cpu_share = None if setting == "gpu" else share
        if share is not None:
            share.adaptive = setting == "auto"
            share.fraction = 0.5 if setting in ("gpu", "auto") else float(setting)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--geometry", choices=["35b", "397b"], default="35b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--bits", type=int, choices=[4, 8], default=8)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--vram-cache-gb", type=float, default=0.3)
    ap.add_argument("--shares", default="0.25,0.5,0.75,1")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import flashmoe
    from flashmoe.store import Store

    if args.threads:
        torch.set_num_threads(args.threads)
    args.root.mkdir(parents=True, exist_ok=True)
    store = build_store(args)
    every_gb = Store(store).expert_bytes / 1e9 * 1.02 + 0.05
    ram = flashmoe.load(store, device="cuda", vram_cache_gb=args.vram_cache_gb, cache_gb=every_gb, io_threads=16)
    ram.warm_cache()
    if ram.stages[0].graphs.cpu_share is None:
        sys.exit("no CPU share: the CPU kernels are unavailable here (no C compiler?)")
    vram = flashmoe.load(store, device="cuda", vram_cache_gb=every_gb, cache_gb=0)
    vram.warm_cache()
    prompt = list(range(1, 17))
    settings = ["gpu", "auto", *args.shares.split(",")]
    rates = {s: [] for s in settings + ["vram"]}
    settled, cpu_part = [], {s: [] for s in settings}
    for r in range(args.rounds):
        for setting in settings:
            configure(ram, setting)
            ms = timed_decode(ram, prompt, args.tokens)
            rates[setting].append(args.tokens / (ms / 1e3))
            st = ram.stats
            in_ram = st.get("experts_on_cpu", 0) + st.get("experts_over_pcie", 0)
            cpu_part[setting].append(st.get("experts_on_cpu", 0) / in_ram if in_ram else 0.0)
            if setting == "auto":
                settled.append(st["cpu_share"])
            print(f"round {r + 1} {setting}: {rates[setting][-1]:.1f} tok/s", flush=True)
        rates["vram"].append(args.tokens / (timed_decode(vram, prompt, args.tokens) / 1e3))
    med = {s: statistics.median(v) for s, v in rates.items()}
    cfg = ram.config
    text = (f"\n### Experts in pinned RAM, the CPU's share (`benchmarks/cpu_share.py`, {datetime.date.today()})\n\n"
            f"`python {' '.join(sys.argv)}` on {torch.cuda.get_device_name()}, {torch.get_num_threads()} CPU threads. "
            f"{args.geometry} geometry, {args.layers} layers, {cfg.num_experts} experts of {cfg.moe_intermediate_size}, "
            f"K={ram.experts_per_token}, {args.bits}-bit group {args.group_size}, vocabulary {args.vocab}; VRAM cache "
            f"{args.vram_cache_gb} GB, every expert in pinned RAM. tg{args.tokens} tok/s, the median of {args.rounds} "
            f"rounds in which the settings take turns (one process, one model; `vram` is a second model with every "
            f"expert in VRAM).\n\n| setting | tok/s | vs gpu | share of RAM-held experts on the CPU |\n|---|---|---|---|\n")
    for s in settings + ["vram"]:
        part = f"{statistics.median(cpu_part[s]):.0%}" if s in cpu_part else "n/a"
        text += f"| {s} | {med[s]:.1f} | {med[s] / med['gpu']:.2f}x | {part} |\n"
    text += f"\nAuto's share at the end of each round: {settled}; rounds: {json.dumps(rates)}\n"
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "settled": settled, "cpu_part": cpu_part}, indent=1))
    publish(text, args.out)


if __name__ == "__main__":
    main()
