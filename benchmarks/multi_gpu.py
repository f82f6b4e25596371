"""Decode with a whole model's experts in the VRAM of several GPUs (placement.py: a block of layers per GPU).

    python benchmarks/multi_gpu.py --root /data/bench [--geometry 397b] [--devices cuda:0,cuda:1] [--k 4,10]
                                   [--tokens 64] [--check-layers 8] [--out benchmarks/RESULTS.md]

Writes a random-weight store of the geometry with every layer the real model has (397b: 60). Its expert files are
holes of their full size: Qwen3.5-397B's 217 GB of 4-bit experts do not fit the machine's disk, so the benchmark
writes random blobs (valid codes and scales, a pool of 64 reused in a fixed order) straight into each GPU's VRAM
slots, and says so. Then greedy decode per K: tokens/s by the wall clock (the whole token: embedding, layers, the
hidden state's hops between GPUs, head, argmax), ms per layer (the GPU time of the blocks, hops left out), and the
bound: each layer's resident bytes and K experts read from HBM at the measured rate.

First, a check on a store of --check-layers layers that fits one GPU: the same blobs on one GPU and split over
the devices give the same greedy tokens, and the one-GPU ms per layer beside the split one's, in the same run.

    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --root /data/bench --distributed [--out ...]

measures the whole model again as torch.distributed ranks (one process a GPU, the hidden state over NCCL), after the
run above wrote its store.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import flashmoe
from flashmoe.store import Store
from flashmoe.synthetic import _random_blobs, expert_layout, write_random_store
from common import GEOMETRIES, hbm_read_gbps, publish, section, timed_decode

POOL = 64  # distinct random blobs, placed by (layer, expert): every GPU's copy of an expert is the same blob


def blob_pool(store: Store, seed: int = 1) -> torch.Tensor:
    cfg = store.config
    layout = expert_layout(cfg, store.quantization["bits"], store.quantization["group_size"])
    assert layout.blob_bytes == store.expert_blob_bytes
    return _random_blobs(layout, POOL, store.quantization["bits"], torch.Generator("cuda").manual_seed(seed), "cuda")


def fill_vram(model, pool: torch.Tensor) -> None:
    """Every expert of every GPU's layers into that GPU's VRAM cache, written directly (the store's blobs are holes)."""
    n = model.config.num_experts
    for stage in model.stages:
        f = stage.fetcher
        on_device = pool.to(stage.device)
        for layer in sorted(f.layers):
            for e in range(n):
                f.vram_slab[f.vram.assign((layer, e))].copy_(on_device[(layer * n + e) % POOL])
            f.vram.unlock_all()
        f._slot_table_current = False
        torch.cuda.synchronize(stage.device)
    assert model.fetcher.resident_slots() is not None, "not every expert landed in VRAM"


def set_k(model, k: int) -> None:
    model.experts_per_token = k
    for stage in model.stages:
        stage.graphs.k = k


def greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    state = model.new_state()
    logits = model.forward(prompt, state, all_logits=False)
    out, rows = [], []
    for _ in range(steps):
        out.append(int(logits[-1].argmax()))
        rows.append(logits[-1].float().cpu())
        logits = model.forward([out[-1]], state, all_logits=False)
    return out, torch.stack(rows)


def measure(model, k: int, tokens: int) -> dict:
    set_k(model, k)
    model.layer_events = []
    prompt = list(range(100, 116))
    ms = timed_decode(model, prompt, tokens)
    layers_ms = model.layers_gpu_ms() / tokens
    model.layer_events = None
    return {"k": k, "tok_s": tokens / (ms / 1e3), "ms_token": ms / tokens,
            "ms_layer": layers_ms / model.config.num_hidden_layers}


def hop_ms(devices: list[torch.device], hidden: int) -> float:
    """The hidden state's trip from one GPU to the next and back to the first, as decode pays it (a sync at the end)."""
    x = torch.randn(1, hidden, dtype=torch.bfloat16, device=devices[0])
    for _ in range(10):
        y = x
        for d in devices[1:] + devices[:1]:
            y = y.to(d)
    torch.cuda.synchronize(devices[0])
    t0 = time.perf_counter()
    for _ in range(200):
        y = x
        for d in devices[1:] + devices[:1]:
            y = y.to(d)
        float(y[0, 0])
    return (time.perf_counter() - t0) * 1e3 / 200


def bound_ms_per_layer(store: Store, k: int, gbps: float) -> float:
    cfg = store.config
    table = cfg.vocab_size * cfg.hidden_size * 2 * 2  # embed_tokens and lm_head, bf16: not per layer
    per_layer = (store.resident_bytes - table) / cfg.num_hidden_layers + k * store.expert_blob_bytes
    return per_layer / (gbps * 1e9) * 1e3


def machine(devices) -> str:
    names = {torch.cuda.get_device_name(d) for d in devices}
    return (f"{len(devices)} x {', '.join(sorted(names))}, {os.cpu_count()} CPU cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--geometry", default="397b", choices=sorted(GEOMETRIES))
    ap.add_argument("--devices", default=None, help="default: every GPU torch sees")
    ap.add_argument("--k", default="4,10")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--check-layers", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--distributed", action="store_true", help="one rank of torchrun: the whole model over the ranks")
    args = ap.parse_args()
    if args.distributed:
        return distributed(args)
    devices = args.devices or ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    parsed = [torch.device(d) for d in devices.split(",")]
    config, _, real_layers, name = GEOMETRIES[args.geometry]
    ks = [int(k) for k in args.k.split(",")]
    gbps = hbm_read_gbps()
    rows, notes = [], []

    # the check: one GPU and the split, same store and blobs
    small = args.root / f"{args.geometry}-L{args.check_layers}-sparse"
    if not (small / "manifest.json").exists():
        write_random_store(small, dict(config, num_hidden_layers=args.check_layers), device="cuda", sparse_experts=True)
    store = Store(small)
    pool = blob_pool(store)
    experts_gb = (store.expert_bytes + len(parsed) * store.expert_blob_bytes) / 1e9  # a slot to spare: GB round
    results = {}
    for label, kw in (("1 GPU", {"device": str(parsed[0])}), (f"{len(parsed)} GPUs", {"devices": devices})):
        model = flashmoe.load(small, vram_cache_gb=experts_gb, **kw)
        fill_vram(model, pool)
        tokens, logits = greedy(model, list(range(100, 116)), 16)
        results[label] = (tokens, logits)
        for k in ks:
            r = measure(model, k, args.tokens)
            rows.append((f"{args.check_layers} ({label})", r, bound_ms_per_layer(store, k, gbps)))
        model.close()
        del model
        torch.cuda.empty_cache()
    (t1, l1), (t2, l2) = results.values()
    same = sum(a == b for a, b in zip(t1, t2))
    notes.append(f"Greedy check, {args.check_layers}-layer store: {same} of {len(t1)} greedy tokens alike on one GPU "
                 f"and split over {len(parsed)}; largest logit difference {float((l1 - l2).abs().max()):.3g}.")

    # the whole model
    big = args.root / f"{args.geometry}-L{real_layers}-sparse"
    t0 = time.perf_counter()
    if not (big / "manifest.json").exists():
        write_random_store(big, dict(config, num_hidden_layers=real_layers), device="cuda", sparse_experts=True)
    written = time.perf_counter() - t0
    store = Store(big)
    t0 = time.perf_counter()
    model = flashmoe.load(big, devices=devices,
                          vram_cache_gb=(store.expert_bytes + len(parsed) * store.expert_blob_bytes) / 1e9)
    fill_vram(model, pool)
    loaded = time.perf_counter() - t0
    blocks = model.placement()["blocks"]
    used = [(torch.cuda.mem_get_info(d)[1] - torch.cuda.mem_get_info(d)[0]) / 2**30 for d in parsed]
    for k in ks:
        r = measure(model, k, args.tokens)
        rows.append((f"{real_layers} ({len(parsed)} GPUs)", r, bound_ms_per_layer(store, k, gbps)))
    notes.append(f"{real_layers}-layer store: {store.expert_bytes / 1e9:.1f} GB of experts and "
                 f"{store.resident_bytes / 1e9:.1f} GB resident "
                 f"(written in {written:.0f} s, loaded and its VRAM filled in {loaded:.0f} s); blocks "
                 + ", ".join(f"{b['device']} layers {b['layers'][0]}-{b['layers'][1]}" for b in blocks)
                 + "; GPU memory in use after load " + ", ".join(f"{u:.1f} GiB" for u in used) + ".")
    notes.append(f"Hidden state's round trip over the GPUs ({' -> '.join(map(str, parsed))} -> back), "
                 f"synchronised: {hop_ms(parsed, store.config.hidden_size) * 1e3:.0f} us. HBM read rate "
                 f"{gbps:.0f} GB/s (cuda:0).")
    model.close()

    table = [f"| {layers} | {r['k']} | {r['tok_s']:.1f} | {r['ms_token']:.2f} | {r['ms_layer']:.3f} | {b:.3f} | "
             f"{r['ms_layer'] / b:.2f}x |" for layers, r, b in rows]
    description = (f"{name} geometry, random weights, 4-bit group 64; expert files written as holes and random blobs "
                   f"written straight into the VRAM slots (the disk cannot hold the experts). " + " ".join(notes))
    publish(section(f"{name}, every expert in the VRAM of {len(parsed)} GPUs (issue 16)", machine(parsed), description,
                    ["layers (devices)", "K", "decode tok/s", "ms/token", "ms/layer (GPU)", "bound ms/layer",
                     "x bound"], table), args.out)


def distributed(args) -> None:
    """Each rank loads its block of the whole-model store onto its GPU, fills its VRAM and decodes with the others."""
    config, _, real_layers, name = GEOMETRIES[args.geometry]
    big = args.root / f"{args.geometry}-L{real_layers}-sparse"
    store = Store(big)
    model = flashmoe.load(big, device="cuda", distributed=True,
                          vram_cache_gb=(store.expert_bytes + 2 * store.expert_blob_bytes) / 1e9)
    fill_vram(model, blob_pool(store))
    gbps = hbm_read_gbps()
    rows = []
    for k in [int(k) for k in args.k.split(",")]:
        r = measure(model, k, args.tokens)
        # the GPU time of this rank's block; each rank's share of a token is its layers'
        rows.append((k, r["tok_s"], r["ms_token"], model.pipeline.gather(r["ms_layer"] * real_layers)))
    mine = model.stages[0].layers
    layers = model.pipeline.gather((mine.start, mine.stop - 1))
    if model.pipeline.first:
        world = model.pipeline.world
        table = [f"| {real_layers} ({world} ranks) | {k} | {tok_s:.1f} | {ms:.2f} | "
                 f"{sum(per_rank) / real_layers:.3f} | {bound_ms_per_layer(store, k, gbps):.3f} | "
                 f"{sum(per_rank) / real_layers / bound_ms_per_layer(store, k, gbps):.2f}x |"
                 for k, tok_s, ms, per_rank in rows]
        description = (f"{name} geometry as above, the same store and blobs, run as {world} torch.distributed ranks "
                       f"(torchrun, one process a GPU, the hidden state sent over NCCL and the logits broadcast back): "
                       + ", ".join(f"rank {i} layers {a}-{b}" for i, (a, b) in enumerate(layers)) + ".")
        publish(section(f"{name} over {world} torch.distributed ranks (issue 16)", machine(
            [torch.device(f"cuda:{i}") for i in range(world)]), description,
            ["layers (ranks)", "K", "decode tok/s", "ms/token", "ms/layer (GPU)", "bound ms/layer", "x bound"], table),
            args.out)
    model.close()


if __name__ == "__main__":
    sys.exit(main())
