"""Decode with experts in pinned RAM: the GPU reading them all over PCIe vs the CPU computing a share meanwhile.

    python benchmarks/cpu_share.py --root /data/bench [--geometry 35b] [--layers 4] [--bits 8] [--rounds 3]

Writes a random-weight store (flashmoe.synthetic: the geometry's shapes, vocabulary --vocab so the head does not
hide the layers), loads it once with a small VRAM cache (--vram-cache-gb) and every expert in pinned RAM, and
decodes --tokens greedy tokens per setting, the settings taking turns round by round in this one process:

  gpu        cpu_share=0 (the default): the GPU reads every RAM-held expert over PCIe inside its kernels (one graph
             per layer)
  auto       cpu_share="auto": the CPU's share follows measured times, and sharing is kept only while faster
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


def host_bandwidths(gb: float = 2.0, reps: int = 8) -> dict:
    """GB/s of host memory read by the CPU's threads (a float32 sum), by the GPU over PCIe (pinned -> VRAM copies),
    and by both at once (each one's rate while the other runs): whether the two paths to the experts share a limit."""
    import threading
    import time

    n = int(gb * 1e9) // 4
    host_a, host_b = torch.ones(n).pin_memory(), torch.ones(n).pin_memory()
    dev = torch.empty(n, device="cuda")

    def cpu_reads(out: dict) -> None:
        t0 = time.perf_counter()
        for _ in range(reps):
            host_a.sum()
        out["cpu"] = reps * 4 * n / (time.perf_counter() - t0) / 1e9

    def gpu_reads(out: dict) -> None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            dev.copy_(host_b, non_blocking=True)
        torch.cuda.synchronize()
        out["pcie"] = reps * 4 * n / (time.perf_counter() - t0) / 1e9

    alone, both = {}, {}
    cpu_reads(alone), gpu_reads(alone)
    thread = threading.Thread(target=gpu_reads, args=(both,))
    thread.start()
    cpu_reads(both)
    thread.join()
    return {"cpu_read_gbps": alone["cpu"], "pcie_read_gbps": alone["pcie"], "cpu_read_gbps_both": both["cpu"],
            "pcie_read_gbps_both": both["pcie"]}


def configure(model, setting: str) -> None:
    """One model, several ways to decode: the stage's share of the CPU on or off, adaptive or fixed."""
    for stage in model.stages:
        graphs = stage.graphs
        share = graphs.cpu_share or getattr(graphs, "_kept_share", None)
        graphs._kept_share = share
        graphs.cpu_share = None if setting == "gpu" else share
        if share is not None:  # each setting starts afresh
            share.adaptive = setting == "auto"
            share.fraction = 0.5 if setting in ("gpu", "auto") else float(setting)
            share.token_ms = {True: None, False: None}
            share._timing.clear()


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
    bw = host_bandwidths()
    print(json.dumps(bw), flush=True)
    store = build_store(args)
    every_gb = Store(store).expert_bytes / 1e9 * 1.02 + 0.05
    ram = flashmoe.load(store, device="cuda", vram_cache_gb=args.vram_cache_gb, cache_gb=every_gb, io_threads=16,
                        cpu_share="auto")
    ram.warm_cache()
    vram = flashmoe.load(store, device="cuda", vram_cache_gb=every_gb, cache_gb=0)
    vram.warm_cache()
    prompt = list(range(1, 17))
    settings = ["gpu", "auto", *args.shares.split(",")]
    rates = {s: [] for s in settings + ["vram"]}
    settled, cpu_part, split = [], {s: [] for s in settings}, {s: [] for s in settings}
    for r in range(args.rounds):
        for setting in settings:
            configure(ram, setting)
            ms = timed_decode(ram, prompt, args.tokens)
            rates[setting].append(args.tokens / (ms / 1e3))
            st = ram.stats
            in_ram = st.get("experts_on_cpu", 0) + st.get("experts_over_pcie", 0)
            cpu_part[setting].append(st.get("experts_on_cpu", 0) / in_ram if in_ram else 0.0)
            if setting == "auto":
                settled.append((st["cpu_share"], st["tokens_shared_with_cpu"]))
            if "cpu_share_cpu_ms" in st:  # per token: each side's time for its experts, and the whole layer stack
                split[setting].append((st["cpu_share_gpu_ms"] / args.tokens, st["cpu_share_cpu_ms"] / args.tokens,
                                       ms / args.tokens))
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
            f"expert in VRAM).\n\n| setting | tok/s | vs gpu | share of RAM-held experts on the CPU | ms per token: GPU's experts / CPU's experts / all (last round) |\n|---|---|---|---|---|\n")
    for s in settings + ["vram"]:
        part = f"{statistics.median(cpu_part[s]):.0%}" if s in cpu_part else "n/a"
        times = split.get(s) and split[s][-1]
        times = f"{times[0]:.3f} / {times[1]:.3f} / {times[2]:.3f}" if times else "n/a"
        text += f"| {s} | {med[s]:.1f} | {med[s] / med['gpu']:.2f}x | {part} | {times} |\n"
    text += (f"\nAuto: (the fraction it settled at, of the {args.tokens} tokens how many it shared) per round: "
             f"{settled}.\n")
    text += (f"\nHost memory read, GB/s (`host_bandwidths`): by the CPU's threads {bw['cpu_read_gbps']:.1f} alone, "
             f"{bw['cpu_read_gbps_both']:.1f} while the GPU reads too; by the GPU over PCIe {bw['pcie_read_gbps']:.1f} "
             f"alone, {bw['pcie_read_gbps_both']:.1f} while the CPU reads too.\n"
             f"\nRounds: {json.dumps(rates)}\n")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "settled": settled, "cpu_part": cpu_part, **bw}, indent=1))
    publish(text, args.out)


if __name__ == "__main__":
    main()
