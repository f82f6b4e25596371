"""Decode on one GPU with a real model's geometry (default Qwen3.5-397B-A17B), in three regimes, against physical bounds.

    python benchmarks/gpu_regimes.py --root /data/bench [--geometry 397b] [--expert-gb 35] [--tokens 32] [--out benchmarks/RESULTS.md]
    python benchmarks/gpu_regimes.py --root /data/bench --regime cold-buffered   # one regime (used for the cgroup run)
    python benchmarks/gpu_regimes.py --root /data/bench --trace calibrated --k 10 --regimes ram,cold-cgroup

Writes a random-weight store with the geometry (397b: hidden 4096, 512 experts of 1024, shared expert, its
attention and DeltaNet sizes, K=4; qwen3-235b: Qwen3-235B-A22B, 128 experts of 1536, K=8, full attention only;
mixtral-8x7b: 8 experts of 14336, K=2; glm-4.5-air: 128 experts of 1408, K=8, sigmoid router, shared expert), 4-bit,
with as many layers as --expert-gb of experts allows, measures
the machine's bandwidths (HBM, pinned host-to-device copies, SSD random reads of expert-sized blocks with
O_DIRECT at the queue depth one layer's reads have), then decodes in each regime:

  vram       every expert in VRAM
  ram        a VRAM cache of 20% of the experts, the rest from a pinned RAM cache
  cold       page cache dropped, O_DIRECT reads, a 1 GB VRAM cache
  cold-buffered  page cache dropped, buffered reads, a 1 GB VRAM cache; run it inside a memory-limited cgroup
             to see what a machine with little RAM sees
  cold-cgroup    cold-buffered in a child process inside a cgroup v2 with memory.max=16G (page cache included)
  cold-ram-cgroup  the same cgroup, but O_DIRECT reads into flashmoe's own pinned RAM cache of 10 GB (its eviction
             policy, frequency-LRU, instead of the kernel's page cache): which of the two caches the RAM better

For each: ms per layer (the GPU timeline from the first layer's start to the last layer's end, CUDA events, no
synchronisation inside: the per-token work around the layers, head and sampling and the host, is not spread over
a 9-layer store's few layers), its split (a second pass that synchronizes at phase ends), tokens/s extrapolated
to the real model's layers plus that per-token rest once, hit rates, and the bound: the serial chain of one layer (resident
weights and the K experts' bytes read from HBM, the missed experts over PCIe or the SSD) at measured bandwidths.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import flashmoe
from flashmoe.expert_cache import host_slab
from flashmoe.store import Store
from flashmoe.synthetic import expert_layout, write_random_store
from flashmoe.traces import TraceShape, calibrated_trace, uniform_trace
from flashmoe.config import ModelConfig
from common import GEOMETRIES, hbm_read_gbps, publish, timed_decode

K, LAYERS_OF_REAL_MODEL = 4, 60  # set from --geometry in main()


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# ---- bandwidths -----------------------------------------------------------------------------
def head_ms(model) -> float:
    """One token's final norm, lm_head and argmax (the vocabulary's weights are read once per token, not per layer)."""
    x = torch.randn(1, model.config.hidden_size, dtype=model.model.dtype, device="cuda")
    for _ in range(3):
        model.model.logits(x).argmax()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        model.model.logits(x).argmax()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 20


def hbm_gbps() -> float:
    a = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 10 * 2 * a.numel() / (start.elapsed_time(end) / 1e3) / 1e9  # bytes read + written


def h2d_gbps(blob_bytes: int, n: int = 256) -> float:
    """Pinned RAM slots -> VRAM slots, one copy per expert-sized blob, on a side stream (as the fetcher does)."""
    backing, host = host_slab(n, blob_bytes, pinned=True)
    host.fill_(1)
    dev = torch.empty(n, blob_bytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for i in range(n):
                dev[i].copy_(host[i], non_blocking=True)
        stream.synchronize()
        best = max(best, n * blob_bytes / (time.perf_counter() - t0) / 1e9)
    return best


def ssd_gbps(store: Store, queue_depth: int, n: int = 400) -> float:
    """Random O_DIRECT reads of whole expert blobs, queue_depth at a time (threads), page cache bypassed."""
    layers = store.config.moe_layers
    gen = torch.Generator().manual_seed(queue_depth)
    picks = [(layers[int(torch.randint(len(layers), (1,), generator=gen))],
              int(torch.randint(store.config.num_experts, (1,), generator=gen))) for _ in range(n)]
    blob = store.expert_blob_bytes
    _, bufs = host_slab(queue_depth, blob, pinned=False)
    fds = {}

    def read(i):
        loc = store.expert_location(*picks[i])
        os.preadv(fds[loc.path], [bufs[i % queue_depth].numpy()], loc.offset)

    for p in {store.expert_location(layer, 0).path for layer in layers}:
        fds[p] = os.open(p, os.O_RDONLY | os.O_DIRECT)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(queue_depth) as pool:  # each thread's buffer slot is i % depth: depth reads in flight
        for start in range(0, n, queue_depth):
            list(pool.map(read, range(start, min(n, start + queue_depth))))
    gbps = n * blob / (time.perf_counter() - t0) / 1e9
    for fd in fds.values():
        os.close(fd)
    return gbps


# ---- decode ---------------------------------------------------------------------------------
REGIMES = {
    # name: (vram share of experts or GB, pinned RAM cache GB or None, direct_io, drop page cache first)
    "vram": dict(vram="all", cache_gb=0, direct_io=False, cold=False),
    "ram": dict(vram=0.2, cache_gb="all", direct_io=False, cold=False),
    "cold": dict(vram=1.0, cache_gb=0, direct_io=True, cold=True),
    "cold-buffered": dict(vram=1.0, cache_gb=0, direct_io=False, cold=True),
    "cold-ram": dict(vram=1.0, cache_gb=10.0, direct_io=True, cold=True),
}
CGROUP_REGIMES = {  # name: (the regime run inside the cgroup, memory.max, its label)
    "cold-cgroup": ("cold-buffered", "16G", "cold, buffered reads, cgroup memory.max=16G"),
    "cold-ram-cgroup": ("cold-ram", "16G", "cold, O_DIRECT into a 10 GB pinned RAM cache, cgroup memory.max=16G"),
}


ROUTING = {"router": "Random weights, so the router spreads tokens uniformly over the experts: the worst case for "
                     "caches.",
           "uniform": "Routed by a uniform trace (flashmoe.traces): the worst case for caches.",
           "calibrated": "Routed by a calibrated trace (flashmoe.traces: per-layer popularity skew and token-to-token "
                         "reuse fitted to Qwen3.5-397B's published figures), not by the random weights' router."}


def disk_read_bytes() -> int:
    """Bytes this process (all its threads) has had read from storage: page-cache hits are not counted."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def decode(store_path: Path, regime: str, tokens: int, trace: str = "router") -> dict:
    spec = REGIMES[regime]
    store = Store(store_path)
    experts_gb = store.expert_bytes / 1e9
    vram_gb = experts_gb * 1.01 if spec["vram"] == "all" else (
        experts_gb * spec["vram"] if spec["vram"] < 1 else spec["vram"])
    cache_gb = experts_gb * 1.01 if spec["cache_gb"] == "all" else spec["cache_gb"]
    if spec["cold"]:  # before the load too: a cgroup keeps the last run's page cache charged to it
        drop_page_cache()
    model = flashmoe.load(store_path, device="cuda", experts_per_token=K, vram_cache_gb=vram_gb, cache_gb=cache_gb,
                          direct_io=spec["direct_io"], io_threads=16)
    if trace != "router":  # routing by a trace (replay.py) instead of the random weights' uniform router
        cfg = store.config
        shape = TraceShape(4 * (tokens + 32), len(cfg.moe_layers), cfg.num_experts, K)
        model.route_by_trace(calibrated_trace(shape) if trace == "calibrated" else uniform_trace(shape))
    if not spec["cold"]:
        model.warm_cache()
    prompt = list(range(100, 116))
    results = {}
    for timing in ("wall", "split"):
        model.sync_timing = timing == "split"
        model.layer_events = [] if timing == "wall" else None
        if spec["cold"]:
            drop_page_cache()
        disk0 = []  # counted from the first timed step: the prompt's and the warm steps' reads are not the decode's
        results[timing] = (timed_decode(model, prompt, tokens, on_start=lambda: disk0.append(disk_read_bytes())),
                           model.stats)
        if timing == "wall":
            disk_bytes = disk_read_bytes() - disk0[0]
            layers_ms = model.layers_gpu_ms()
    head = head_ms(model)
    model.close()
    layers = store.config.num_hidden_layers
    wall_ms, s = results["wall"]
    _, split = results["split"]
    per = tokens * layers
    ms_per_layer = layers_ms / per
    per_token_rest = (wall_ms - layers_ms) / tokens  # embedding, head, sampling and the host between tokens
    return {
        "regime": regime, "layers": layers, "tokens": tokens, "vram_cache_gb": round(vram_gb, 2),
        "ram_cache_gb": round(cache_gb, 2), "direct_io": spec["direct_io"],
        "ms_per_token": wall_ms / tokens, "head_ms": head, "per_token_rest_ms": per_token_rest,
        "ms_per_layer": ms_per_layer,
        "tok_s_measured": tokens / (wall_ms / 1e3),
        "tok_s_real_layers": 1e3 / (ms_per_layer * LAYERS_OF_REAL_MODEL + per_token_rest),
        "vram_hit_rate": s["vram_cache_hit_rate"], "ram_hit_rate": s["cache_hit_rate"],
        "misses_per_layer": s["vram_cache_misses"] / per, "ssd_reads_per_layer": s["expert_reads"] / per,
        "disk_reads_per_layer": disk_bytes / store.expert_blob_bytes / per,
        **{k: split[k] / per for k in ("attention_ms", "routing_ms", "expert_io_ms", "expert_compute_ms")},
    }


def bound_ms(r: dict, bw: dict, store: Store) -> float:
    """The serial chain of one layer at measured bandwidths: resident bytes and the K experts read from HBM, missed
    experts over PCIe (from RAM) or the SSD (then PCIe, pipelined per expert: one extra blob's copy). Of the expert
    reads only those that reached the disk are priced at its rate (inside a cgroup the page cache serves some of
    the rest), the others at PCIe's."""
    cfg = store.config
    blob = store.expert_blob_bytes
    embed = cfg.vocab_size * cfg.hidden_size * 2 * 2  # embed_tokens and lm_head, bf16: not per layer
    resident_per_layer = (store.resident_bytes - embed) / cfg.num_hidden_layers
    hbm = (resident_per_layer + K * blob) / (bw["hbm_read_gbps"] * 1e9)
    misses = r["misses_per_layer"] * blob
    if r["ssd_reads_per_layer"] > 0:
        # every VRAM miss crosses PCIe (from the page cache or the pinned RAM cache), those that reached the disk
        # come from it first (pipelined per expert: one extra blob's copy)
        disk = min(r.get("disk_reads_per_layer", r["ssd_reads_per_layer"]), r["ssd_reads_per_layer"])
        io = disk * blob / (bw["ssd_gbps_qd"] * 1e9) + (max(r["misses_per_layer"], disk) - disk + 1) * blob / (
            bw["h2d_gbps"] * 1e9)
    else:
        io = misses / (bw["h2d_gbps"] * 1e9)
    return (hbm + io) * 1e3


def machine() -> str:
    gpu = torch.cuda.get_device_name()
    return f"{gpu}, {os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--geometry", choices=list(GEOMETRIES), default="397b")
    ap.add_argument("--trace", choices=["router", "calibrated", "uniform"], default="router",
                    help="route by the model's router (random weights: uniform) or by a trace (flashmoe.traces)")
    ap.add_argument("--expert-gb", type=float, default=35.0)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=None, help="experts per token (default: the geometry's)")
    ap.add_argument("--regime", choices=list(REGIMES), default=None, help="run one regime, print its JSON")
    ap.add_argument("--regimes", default="vram,ram,cold")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    global K, LAYERS_OF_REAL_MODEL
    geometry, K, LAYERS_OF_REAL_MODEL, _ = GEOMETRIES[args.geometry]
    K = args.k or K
    store_path = args.root / f"store-{args.geometry}"
    if args.regime:  # a child run (e.g. inside a cgroup)
        print(json.dumps(decode(store_path, args.regime, args.tokens, args.trace)))
        return

    cfg = dict(geometry, num_experts_per_tok=K)
    experts = ModelConfig.from_hf({**cfg, "num_hidden_layers": 1})
    blob = expert_layout(experts, 4, 64).blob_bytes
    moe_layers = max(1, int(args.expert_gb * 1e9 // (blob * experts.num_experts)))
    layers = moe_layers  # and the dense layers before them (DeepSeek-V3's first three)
    while len(ModelConfig.from_hf({**cfg, "num_hidden_layers": layers}).moe_layers) < moe_layers:
        layers += 1
    cfg["num_hidden_layers"] = layers
    if not (store_path / "manifest.json").exists():
        shutil.rmtree(store_path, ignore_errors=True)
        t0 = time.perf_counter()
        write_random_store(store_path, cfg, bits=4, group_size=64, device="cuda")
        print(f"wrote a {layers}-layer store in {time.perf_counter() - t0:.0f} s", flush=True)
    store = Store(store_path)
    drop_page_cache()
    bw = {"hbm_gbps": hbm_gbps(), "hbm_read_gbps": hbm_read_gbps(), "h2d_gbps": h2d_gbps(blob), "ssd_gbps_qd": ssd_gbps(store, K),
          "ssd_gbps_qd32": ssd_gbps(store, 32)}
    print(json.dumps(bw), flush=True)
    rows = []
    for regime in args.regimes.split(","):
        try:
            if regime in CGROUP_REGIMES:
                inner, memory_max, label = CGROUP_REGIMES[regime]
                r = cgroup_run(args, inner, memory_max)
                r["regime"] = label
            else:
                r = decode(store_path, regime, args.tokens, args.trace)
        except (OSError, SystemExit, RuntimeError) as exc:  # e.g. no cgroup v2 memory controller: report, go on
            print(f"regime {regime} failed: {exc}", flush=True)
            continue
        r["bound_ms"] = bound_ms(r, bw, store)
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.json:  # after every regime, so a run cut short keeps what it measured
            args.json.write_text(json.dumps({"bandwidths": bw, "regimes": rows}, indent=1))
    publish(report(args, bw, rows, store, blob), args.out)


def cgroup_run(args, regime: str, memory_max: str) -> dict:
    """The regime in a child process inside a cgroup v2 whose memory.max (page cache included) is memory_max."""
    group = Path("/sys/fs/cgroup/flashmoe-bench")
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(memory_max)
    cmd = (f"echo $$ > {group}/cgroup.procs && exec {sys.executable} {Path(__file__).resolve()} --root {args.root} "
           f"--geometry {args.geometry} --regime {regime} --tokens {args.tokens} --trace {args.trace} --k {K}")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise SystemExit(f"cgroup run failed:\n{out.stderr[-3000:]}")
    peak = (group / "memory.peak").read_text().strip() if (group / "memory.peak").exists() else "?"
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["cgroup_memory_peak_gb"] = round(int(peak) / 1e9, 1) if peak.isdigit() else peak
    return r


def report(args, bw: dict, rows: list[dict], store: Store, blob: int) -> str:
    cmd = "python " + " ".join(sys.argv)
    name = GEOMETRIES[args.geometry][3]
    head = (f"\n### {name} geometry, {rows[0]['layers']} layers ({store.expert_bytes / 1e9:.1f} GB of "
            f"4-bit experts, {blob / 1e6:.2f} MB each), K={K}, decode ({datetime.date.today()})\n\n"
            f"`{cmd}` on {machine()}. {ROUTING[args.trace]} Measured bandwidths: HBM read {bw['hbm_read_gbps']:.0f} GB/s (a reduction; "
            f"a copy moves {bw['hbm_gbps']:.0f} GB/s read + write), "
            f"pinned host-to-device {bw['h2d_gbps']:.1f} GB/s, SSD random O_DIRECT reads of one blob "
            f"{bw['ssd_gbps_qd']:.2f} GB/s at queue depth {K} and {bw['ssd_gbps_qd32']:.2f} GB/s at 32. "
            f"The split columns come from a second pass that synchronizes the GPU at each phase end.\n\n"
            "ms/layer is the layers' GPU timeline (CUDA events around them); the rest of a token (embedding, the "
            f"head: final norm, lm_head over the {store.config.vocab_size // 1000}k vocabulary, argmax; the host between "
            f"tokens) is its own column and counted once in tok/s at {LAYERS_OF_REAL_MODEL} layers. With CUDA graphs the router and shared expert run inside the "
            "attention/DeltaNet column, and with every expert resident the whole layer is one graph (expert compute).\n\n"
            "| regime | ms/layer | bound ms/layer | measured / bound | rest of a token, ms (head alone) | "
            f"tok/s at {LAYERS_OF_REAL_MODEL} layers | tok/s measured | attention/DeltaNet | router | expert I/O wait | expert compute | "
            "VRAM hit rate | expert reads/layer (from the disk) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['regime']} | {r['ms_per_layer']:.3f} | {r['bound_ms']:.3f} | {r['ms_per_layer'] / r['bound_ms']:.2f}x | "
             f"{r['per_token_rest_ms']:.2f} ({r['head_ms']:.2f}) | {r['tok_s_real_layers']:.2f} | {r['tok_s_measured']:.1f} | "
             f"{r['attention_ms']:.3f} | {r['routing_ms']:.3f} | {r['expert_io_ms']:.3f} | "
             f"{r['expert_compute_ms']:.3f} | {r['vram_hit_rate']:.0%} | {r['ssd_reads_per_layer']:.2f} "
             f"({r.get('disk_reads_per_layer', 0):.2f}) |" for r in rows]
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
