"""Replay routing traces against each eviction policy and Belady's optimal, at several cache sizes (CPU, seconds).

    python benchmarks/cache_sim.py                       # Qwen3.5-397B geometry: 60 layers x 512 experts, K=4 and 10
    python benchmarks/cache_sim.py --trace my.npy         # a recorded trace [tokens, layers, K] (flashmoe.traces)

Hit rate = cache hits / expert lookups, one budget over all layers (a share of every expert of the model), over the
whole trace from a cold cache: each expert's first use is a miss for every policy, Belady's included.
"""

from __future__ import annotations

import argparse
import time

from flashmoe.eviction import POLICIES, optimal_hits, replay
from flashmoe.traces import TraceShape, calibrated_trace, load, uniform_trace


def table(traces: dict, sizes: list[float], experts_total: int) -> list[str]:
    rows = ["| trace | cache (share of experts) | " + " | ".join(POLICIES) + " | Belady (bound) |",
            "|---|---|" + "---|" * (len(POLICIES) + 1)]
    for name, trace in traces.items():
        for share in sizes:
            capacity = max(1, int(share * experts_total))
            rates = [replay(trace, capacity, make()) / trace.size for make in POLICIES.values()]
            bound = optimal_hits(trace, capacity) / trace.size
            rows.append(f"| {name} | {share:.0%} ({capacity}) | " + " | ".join(f"{r:.1%}" for r in rates)
                        + f" | {bound:.1%} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--top-k", type=int, nargs="+", default=[4, 10])
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--trace", help="a recorded trace (.npy) instead of the generated ones")
    args = ap.parse_args()
    t0 = time.perf_counter()
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
    print("\n".join(table(traces, args.sizes, total)))
    print(f"\n{sum(t.size for t in traces.values())} lookups per policy and size, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
