"""How a trained MoE routes (issue 13's traces, the evidence issue 14's caches and prefetch need): its routing recorded
by flashmoe on held-out text, and what caching and prefetch could make of it.

    python benchmarks/routing_traces.py --store flashmoe/data/small-moe --checkpoint /data/run/hf
        --tokens /data/run/tokens-heldout.npy [--windows 32] [--window 256] [--trace-out T.npy] [--out RESULTS.md]

The trace: each held-out window is one prefill (teacher-forced; a causal model routes token t the same in a prefill
as when decoding it), its routers' choices recorded (Model.recording_routing), windows one after another. Per MoE
layer: how concentrated the popularity is (the share of picks that go to the most used quarter of the experts;
uniform routing gives 25%), the share of a token's experts the previous token also used (uniform: K/E), distinct
experts per 27 tokens; then hit rates of each cache policy and Belady's bound at several cache sizes (cache_sim.py,
one budget over all layers). Prefetch: how many of layer L+1's experts are guessed before L+1's attention runs, by
(a) L+1's router applied to the hidden state entering L+1 (its norm, then its gate; what a prefetcher can compute
while L+1's attention runs), (b) the experts L+1 used for the previous token, (c) both (up to 2K guesses), measured
in transformers' model of the same checkpoint, float32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common import publish
from flashmoe.eviction import POLICIES, optimal_hits, replay
from flashmoe.traces import distinct_per_window, reuse_rate, save
from quality import windows_of


def record(store: Path, windows: list[list[int]]) -> np.ndarray:
    import flashmoe

    model = flashmoe.load(store)
    with model.recording_routing() as recorder:
        for w in windows:
            model.logits(w)
    model.close()
    return recorder.trace()


def popularity_top_quarter(picks: np.ndarray, experts: int) -> float:
    counts = np.sort(np.bincount(picks.ravel(), minlength=experts))[::-1]
    return float(counts[: max(1, experts // 4)].sum() / counts.sum())


def prefetch_coverage(checkpoint: Path, windows: list[list[int]]) -> list[dict]:
    """Per predicted layer L+1: the share of its K experts that guesses (a), (b) and (c) hold."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    layers = model.model.layers
    entering, chosen = {}, {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, kw, i=i: entering.__setitem__(i, (kw.get("hidden_states")
                                             if args == () else args[0]).detach()), with_kwargs=True)
             for i, layer in enumerate(layers)]
    hooks += [layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: chosen.__setitem__(i, out[2].detach()))
              for i, layer in enumerate(layers)]
    k = model.config.num_experts_per_tok
    sums = {i: np.zeros(3) for i in range(1, len(layers))}
    count = 0
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]), use_cache=False)
            made = dict(chosen)  # the guesses below call the gates again, and their hook
            for i in range(1, len(layers)):
                layer = layers[i]
                h = layer.post_attention_layernorm(entering[i][0])
                _, _, guess = layer.mlp.gate(h)
                actual, previous = made[i], torch.cat([torch.full_like(made[i][:1], -1), made[i][:-1]])
                for j, guessed in enumerate((guess, previous, torch.cat([guess, previous], dim=1))):
                    hit = (actual[:, :, None] == guessed[:, None, :]).any(-1).sum(-1).float() / k
                    sums[i][j] += hit[1:].sum().item()  # the first token has no previous one
            count += len(w) - 1
    for h in hooks:
        h.remove()
    return [{"layer": i, "router_ahead": s[0] / count, "previous_token": s[1] / count, "both": s[2] / count}
            for i, s in sums.items()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True, help="the Hugging Face checkpoint the store came from")
    ap.add_argument("--tokens", type=Path, required=True, help="held-out token ids (train.py's tokens-heldout.npy)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--trace-out", type=Path, default=None, help="save the trace here (uint8 .npy)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    windows = [w[:-1] for w in windows_of(np.load(args.tokens, mmap_mode="r"), args.windows, args.window)]
    trace = record(args.store, windows)
    experts = json.loads((args.checkpoint / "config.json").read_text())["num_experts"]
    if args.trace_out:
        save(args.trace_out, trace)
    layers = []
    for i in range(trace.shape[1]):
        picks = [trace[j * args.window:(j + 1) * args.window, i] for j in range(len(windows))]
        layers.append({"layer": i, "top_quarter": popularity_top_quarter(trace[:, i], experts),
                       "reuse": float(np.mean([reuse_rate(p) for p in picks])),
                       "distinct_27": float(np.mean([distinct_per_window(p) for p in picks]))})
    total = experts * trace.shape[1]
    cache = []
    for share in args.sizes:
        capacity = max(1, int(share * total))
        cache.append({"share": share, **{name: replay(trace, capacity, make()) / trace.size
                                         for name, make in POLICIES.items()},
                      "belady": optimal_hits(trace, capacity) / trace.size})
    prefetch = prefetch_coverage(args.checkpoint, windows)
    k = trace.shape[2]
    text = (f"\n### Routing of the trained model (`benchmarks/routing_traces.py`, {datetime.date.today()})\n\n"
            f"`python {' '.join(sys.argv)}`: {trace.shape[0]} held-out tokens ({len(windows)} windows of "
            f"{args.window}), {trace.shape[1]} MoE layers of {experts} experts, K={k}. Uniform routing would give "
            f"25% to the top quarter, {k / experts:.1%} reuse and {experts * (1 - (1 - k / experts) ** 27):.1f} "
            f"distinct per 27 tokens.\n\n| layer | picks to the most used quarter | reused from the previous token | "
            f"distinct per 27 tokens | L's experts guessed by its router ahead | by the previous token's | by both "
            f"|\n|---|---|---|---|---|---|---|\n")
    for row in layers:
        p = next((p for p in prefetch if p["layer"] == row["layer"]), None)
        ahead = "- | - | -" if p is None else f"{p['router_ahead']:.1%} | {p['previous_token']:.1%} | {p['both']:.1%}"
        text += (f"| {row['layer']} | {row['top_quarter']:.1%} | {row['reuse']:.1%} | {row['distinct_27']:.1f} | "
                 f"{ahead} |\n")
    text += ("\nHit rates, one cache over all layers, cold start, over the whole trace:\n\n"
             "| cache (share of experts) | " + " | ".join(POLICIES) + " | Belady (bound) |\n|---|"
             + "---|" * (len(POLICIES) + 1) + "\n")
    for c in cache:
        text += (f"| {c['share']:.0%} | " + " | ".join(f"{c[name]:.1%}" for name in POLICIES)
                 + f" | {c['belady']:.1%} |\n")
    publish(text, args.out)
    return {"layers": layers, "cache": cache, "prefetch": prefetch, "trace": trace}


if __name__ == "__main__":
    main()
