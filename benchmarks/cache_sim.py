"""Replay routing traces against each eviction policy and Belady's optimal, at several cache sizes (CPU, seconds).

    python benchmarks/cache_sim.py                       # Qwen3.5-397B geometry: 60 layers x 512 experts, K=4 and 10
    python benchmarks/cache_sim.py --trace my.npy         # a recorded trace [tokens, layers, K] (flashmoe.traces)
    python benchmarks/cache_sim.py --zero-copy [--trace my.npy]   # the VRAM tier of zero-copy decode: static or refreshed
    python benchmarks/cache_sim.py --batch 1 2 4 8 16 --sizes 0.2   # what batching saves in reads over PCIe

Hit rate = cache hits / expert lookups, one budget over all layers (a share of every expert of the model), over the
whole trace from a cold cache: each expert's first use is a miss for every policy, Belady's included (--warm N:
over the tokens from N on, the ones before warming the cache: a server's cache after its first requests).

--zero-copy asks what zero-copy decode (every expert in pinned RAM, a share in VRAM; experts.py) would gain if its
VRAM tier followed the routing: the VRAM set a prompt of --prompt tokens leaves (its most used experts, counts
decayed by half every ~105 tokens) kept for the rest of the trace, against the same set chosen again from the running
counts every 1, 16 or 64 tokens (or only experts 4x hotter than those they replace); each cell is the VRAM hit rate /
blobs over PCIe per lookup (misses read in place plus the promoted experts' copies); beside them, a per-lookup
frequency-LRU and Belady's bound on the same tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flashmoe.eviction import POLICIES, optimal_hits, replay
from flashmoe.traces import TraceShape, calibrated_sequences, calibrated_trace, load, uniform_trace


def table(traces: dict, sizes: list[float], experts_total: int, warm: int = 0) -> list[str]:
    rows = ["| trace | cache (share of experts) | " + " | ".join(POLICIES) + " | Belady (bound) |",
            "|---|---|" + "---|" * (len(POLICIES) + 1)]
    for name, trace in traces.items():
        lookups = trace[warm:].size
        for share in sizes:
            capacity = max(1, int(share * experts_total))
            rates = [replay(trace, capacity, make(), warm) / lookups for make in POLICIES.values()]
            bound = optimal_hits(trace, capacity, warm) / lookups
            rows.append(f"| {name} | {share:.0%} ({capacity}) | " + " | ".join(f"{r:.1%}" for r in rates)
                        + f" | {bound:.1%} |")
    return rows


def zero_copy_hits(trace, capacity: int, prompt: int, every: int, margin: float = 1.0,
                   decay: float = 0.9 ** (1 / 16)) -> tuple[float, float]:
    """(VRAM hit rate, blobs over PCIe per lookup) after `prompt` tokens when the VRAM set is the `capacity` most used
    experts (decayed counts), chosen after the prompt, then every `every` tokens (0: never) the hottest expert outside
    it swapped for the coldest inside while its count is above `margin` times that one's (1: the hottest set again).
    PCIe carries each miss (read in place, zero-copy) and each promoted expert's copy into VRAM."""
    tokens, layers, _ = trace.shape
    experts = int(trace.max()) + 1
    counts = np.zeros(layers * experts)
    vram = np.zeros(layers * experts, bool)
    hits = lookups = copies = 0
    for t in range(tokens):
        if t == prompt:
            vram[np.argsort(-counts, kind="stable")[:capacity]] = True
        elif every and t > prompt and (t - prompt) % every == 0:
            outside, inside = np.flatnonzero(~vram), np.flatnonzero(vram)
            hot = outside[np.argsort(-counts[outside], kind="stable")]
            cold = inside[np.argsort(counts[inside], kind="stable")]
            n = 0
            while n < min(len(hot), len(cold)) and counts[hot[n]] > margin * counts[cold[n]]:
                n += 1
            vram[hot[:n]], vram[cold[:n]] = True, False
            copies += n
        for layer in range(layers):
            ids = trace[t, layer] + layer * experts
            if t >= prompt:
                hits += int(vram[ids].sum())
                lookups += len(ids)
            counts[ids] += 1
        counts *= decay
    return hits / lookups, (lookups - hits + copies) / lookups


REFRESH = ((0, 1.0), (1, 1.0), (16, 1.0), (64, 1.0), (64, 4.0))  # (every, margin) of the --zero-copy columns


def zero_copy_table(traces: dict, sizes: list[float], prompt: int) -> list[str]:
    rows = ["| trace | VRAM (share of experts) | set after the prompt, kept | refreshed every token | every 16 | every 64 "
            "| every 64, only 4x hotter | frequency-LRU per lookup | Belady (bound) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, trace in traces.items():
        rest = trace[prompt:]
        for share in sizes:
            capacity = max(1, int(share * trace.shape[1] * (int(trace.max()) + 1)))
            cells = [f"{hit:.1%} / {pcie:.3f}" for hit, pcie in
                     (zero_copy_hits(trace, capacity, prompt, every, margin) for every, margin in REFRESH)]
            cells += [f"{replay(rest, capacity, POLICIES['frequency-lru']()) / rest.size:.1%}",
                      f"{optimal_hits(rest, capacity) / rest.size:.1%}"]
            rows.append(f"| {name} | {share:.0%} ({capacity}) | " + " | ".join(cells) + " |")
    return rows


def batch_reads(traces: np.ndarray, batch: int, vram_share: float, prompt: int) -> float:
    """Experts read over PCIe per token when `batch` of the sequences (traces [sequences, tokens, layers, K]) step
    together and each expert a step needs is read once for all its tokens: per layer, the union of their picks less
    the VRAM tier (each layer's most used experts over every sequence's first `prompt` tokens, static as in zero-copy
    decode), over the tokens after the prompt."""
    sequences, tokens, layers, k = traces.shape
    experts = int(traces.max()) + 1
    vram = np.zeros((layers, experts), bool)
    keep = int(vram_share * experts)
    for layer in range(layers):
        counts = np.bincount(traces[:, :prompt, layer].ravel(), minlength=experts)
        vram[layer, np.argsort(-counts, kind="stable")[:keep]] = True
    reads = 0
    for t in range(prompt, tokens):
        for layer in range(layers):
            union = np.unique(traces[:batch, t, layer])
            reads += int((~vram[layer, union]).sum())
    return reads / (batch * (tokens - prompt))


def batch_table(shape: TraceShape, batches: list[int], shares: list[float], prompt: int) -> list[str]:
    rows = ["| trace | VRAM (share of each layer's experts) | " + " | ".join(f"{b} sequences" for b in batches) + " |",
            "|---|---|" + "---|" * len(batches)]
    for name, make in (("calibrated", calibrated_sequences), ("uniform", None)):
        if make is None:  # a random router: every sequence, every token uniform
            traces = np.stack([uniform_trace(shape, seed=i) for i in range(max(batches))])
        else:
            traces = make(shape, max(batches))
        for share in shares:
            per_token = [batch_reads(traces, b, share, prompt) for b in batches]
            rows.append(f"| {name}, K={shape.top_k} | {share:.0%} | " + " | ".join(
                f"{r:.2f} ({per_token[0] / r:.2f}x)" for r in per_token) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--top-k", type=int, nargs="+", default=[4, 10])
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--trace", help="a recorded trace (.npy) instead of the generated ones")
    ap.add_argument("--warm", type=int, default=0, help="count hits from this token on (a cache that has served "
                    "requests before), not from a cold cache")
    ap.add_argument("--zero-copy", action="store_true", help="the VRAM tier of zero-copy decode, static or refreshed")
    ap.add_argument("--prompt", type=int, default=200, help="--zero-copy: tokens before the VRAM set is chosen")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="sequences stepping together (e.g. 1 2 4 8 "
                    "16): expert reads per token over PCIe when each expert a step needs is read once for all")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.batch:
        rows = []
        for k in args.top_k:
            shape = TraceShape(args.tokens, args.layers, args.experts, k)
            rows += batch_table(shape, args.batch, [0.0] + args.sizes, args.prompt)[0 if not rows else 2:]
        print("\n".join(rows))
        print(f"\n{time.perf_counter() - t0:.0f} s")
        return
    if args.trace:
        trace = load(args.trace)
        traces, total = {args.trace: trace}, trace.shape[1] * (int(trace.max()) + 1)
    else:
        traces = {}
        for k in args.top_k:
            shape = TraceShape(args.tokens, args.layers, args.experts, k)
            traces[f"calibrated, K={k}"] = calibrated_trace(shape)
            traces[f"uniform, K={k}"] = uniform_trace(shape)
        total = args.layers * args.experts
    rows = (zero_copy_table(traces, args.sizes, args.prompt) if args.zero_copy
            else table(traces, args.sizes, total, args.warm))
    print("\n".join(rows))
    print(f"\n{sum(t.size for t in traces.values())} lookups per policy and size, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
