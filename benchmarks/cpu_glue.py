"""Where a CPU decode token's time goes: inside our C kernels (kernels/cpu_native.c) vs everything around them (Python,
small torch ops, the expert cache's bookkeeping).

    python benchmarks/cpu_glue.py --root /data/bench [--layers 4] [--bits 8] [--group-size 32] [--threads 16]

Writes a random-weight store of the Qwen3.5-35B-A3B geometry (flashmoe.synthetic; every 4th layer attention,
vocabulary 512 so the head does not hide the layers), loads it on the CPU with every expert in the RAM cache, then
decodes --tokens tokens three times with every function of the C library wrapped by a clock: ms per token in total,
in the C calls, and the rest. The kernels scale with cores and memory bandwidth; the rest runs on one core.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from common import publish

C_FUNCTIONS = ("fm_linear", "fm_moe", "fm_gated_delta_step", "fm_rms_norm", "fm_conv_step", "fm_delta_gates",
               "fm_route_softmax")


def clocked_library(clock: dict):
    """The library with each C function timed into clock["ms"] (callers that look the functions up at call time)."""
    from flashmoe.kernels import cpu_native

    lib = cpu_native.library()
    if lib is None:
        sys.exit("our CPU kernels could not be built here")
    for name in C_FUNCTIONS:
        fn = getattr(lib, name)

        def timed(*args, fn=fn):
            t0 = time.perf_counter()
            out = fn(*args)
            clock["ms"] += (time.perf_counter() - t0) * 1e3
            clock["calls"] += 1
            return out

        setattr(lib, name, timed)
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bits", type=int, choices=[4, 8], default=8)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import flashmoe
    from flashmoe.store import Store
    from flashmoe.synthetic import QWEN3_5_35B, write_random_store

    torch.set_num_threads(args.threads)
    store = args.root / f"glue-35b-L{args.layers}-{args.bits}bit-g{args.group_size}"
    if not (store / "manifest.json").exists():
        types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(args.layers)]
        write_random_store(store, dict(QWEN3_5_35B, num_hidden_layers=args.layers, vocab_size=512, layer_types=types),
                           bits=args.bits, group_size=args.group_size)
    clock = {"ms": 0.0, "calls": 0}
    lib = clocked_library(clock)
    model = flashmoe.load(store, cache_gb=Store(store).expert_bytes / 1e9 * 1.1 + 0.1)
    model.warm_cache()
    for stage in model.stages:  # the experts' form holds the function it was made with
        if getattr(stage.fetcher.kernel_form, "moe", None) is not None:
            object.__setattr__(stage.fetcher.kernel_form, "moe", lib.fm_moe)
    state = model.new_state()
    logits = model.forward(list(range(1, 17)), state, all_logits=False)
    for _ in range(5):
        logits = model.forward([int(logits[-1].argmax())], state, all_logits=False)
    rows = []
    for _ in range(3):
        clock.update(ms=0.0, calls=0)
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            logits = model.forward([int(logits[-1].argmax())], state, all_logits=False)
        total = (time.perf_counter() - t0) * 1e3 / args.tokens
        rows.append((total, clock["ms"] / args.tokens, clock["calls"] / args.tokens))
        print(f"{total:.2f} ms/token, {rows[-1][1]:.2f} in C calls", flush=True)
    total, in_c, calls = (statistics.median(r[i] for r in rows) for i in range(3))
    text = (f"\n### Where a CPU decode token goes (`benchmarks/cpu_glue.py`, {datetime.date.today()})\n\n"
            f"`python {' '.join(sys.argv)}`: 35B-A3B geometry, {args.layers} layers, {args.bits}-bit group "
            f"{args.group_size}, {args.threads} threads, every expert in RAM; medians of 3 runs of {args.tokens} "
            f"tokens.\n\n| ms per token | in our C calls ({calls:.0f} a token) | the rest | the rest per layer |\n"
            f"|---|---|---|---|\n| {total:.2f} | {in_c:.2f} | {total - in_c:.2f} | {(total - in_c) / args.layers:.3f} |\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
