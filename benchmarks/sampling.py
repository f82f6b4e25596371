"""What choosing a token costs at a real vocabulary: sample() against the whole-vocabulary sort it replaced.

    python benchmarks/sampling.py [--vocab 248320] [--device cpu|cuda] [--threads N] [--out RESULTS.md]

Logits are random normals times --scale (3: a peaked distribution, whose nucleus is a few dozen tokens; real
models' are usually more peaked still); ms per call, the median of --reps after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import publish, section
from flashmoe.sampling import reference_distribution, sample

SETTINGS = [(0.0, 1.0, 0), (0.7, 1.0, 0), (0.7, 0.95, 0), (0.6, 0.95, 20), (1.0, 1.0, 50)]


def by_full_sort(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> int:
    """The way sample() chose before: a sort of the whole vocabulary for top-p, multinomial over all of it."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = reference_distribution(logits, temperature, top_p, top_k)
    return int(torch.multinomial(probs, 1, generator=generator))


def ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator(args.device).manual_seed(0)
    logits = torch.randn(args.vocab, generator=gen, device=args.device) * args.scale
    rows = []
    for t, p, k in SETTINGS:
        new = ms(lambda: sample(logits, t, p, k, gen), args.reps)
        old = ms(lambda: by_full_sort(logits, t, p, k, gen), args.reps)
        rows.append(f"| {t} | {p} | {k} | {old:.2f} | {new:.2f} | {old / new:.1f}x |")
        print(rows[-1], flush=True)
    publish(section(f"Choosing a token from a {args.vocab}-token vocabulary ({args.device})",
                    f"{args.device}, {torch.get_num_threads()} threads",
                    f"random logits x {args.scale}; ms per token, the median of {args.reps}.",
                    ["temperature", "top_p", "top_k", "whole-vocabulary sort, ms", "sample(), ms", "speed-up"], rows),
            args.out)


if __name__ == "__main__":
    main()
