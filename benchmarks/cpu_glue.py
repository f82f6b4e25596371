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
import collections
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from common import publish

C_FUNCTIONS = ("fm_linear", "fm_moe", "fm_gated_delta_step", "fm_rms_norm", "fm_conv_step", "fm_delta_gates",
               "fm_route_softmax", "fm_qk_norm_rope", "fm_delta_decode")


# the phases of a layer, as the methods that run them (exclusive times: a phase's wall time less its inner ones')
PHASES = [("model", "mix", "norms and residuals"), ("model", "_delta_net", "DeltaNet"),
          ("attention", "attend_many", "attention"), ("model", "moe_projections", "router and shared-expert input"),
          ("model", "route", "routing"), ("model", "shared_expert", "shared expert"),
          ("routed", "_run_native", "routed experts"), ("model", "logits", "head")]
INNER = {"norms and residuals": ("DeltaNet", "attention"), "routed experts": ("shared expert",)}


def clocked_library(clock: dict):
    """The library with each C function timed into clock[phase] (the phase running it), for callers that look the
    functions up at call time."""
    from flashmoe.kernels import cpu_native

    lib = cpu_native.library()
    if lib is None:
        sys.exit("our CPU kernels could not be built here")
    for name in C_FUNCTIONS:
        fn = getattr(lib, name)

        def timed(*args, fn=fn):
            t0 = time.perf_counter()
            out = fn(*args)
            clock["c", clock["phase"]] += (time.perf_counter() - t0) * 1e3
            clock["calls"] += 1
            return out

        setattr(lib, name, timed)
    return lib


def clock_phases(model, clock: dict) -> None:
    """Each phase's method wrapped: its wall time into clock["wall", phase], and the C calls within it attributed."""
    owners = {"model": model.model, "attention": model.model.attention, "routed": model.routed}
    for owner, method, phase in PHASES:
        fn = getattr(owners[owner], method)

        def timed(*args, fn=fn, phase=phase, **kwargs):
            before, clock["phase"] = clock["phase"], phase
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock["wall", phase] += (time.perf_counter() - t0) * 1e3
                clock["phase"] = before

        setattr(owners[owner], method, timed)


def glue_store(root: Path, layers: int, bits: int, group_size: int) -> Path:
    """The random-weight 35B-A3B store these benchmarks share (every 4th layer attention, vocabulary 512), written
    once under root."""
    from flashmoe.synthetic import QWEN3_5_35B, write_random_store

    store = root / f"glue-35b-L{layers}-{bits}bit-g{group_size}"
    if not (store / "manifest.json").exists():
        types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
        write_random_store(store, dict(QWEN3_5_35B, num_hidden_layers=layers, vocab_size=512, layer_types=types),
                           bits=bits, group_size=group_size)
    return store


def store_arguments(ap: argparse.ArgumentParser) -> None:
    """glue_store's arguments and the thread count, for the benchmarks that share its store."""
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bits", type=int, choices=[4, 8], default=8)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    store_arguments(ap)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--store", type=Path, default=None, help="an existing store instead of the 35B-A3B one under --root "
                    "(e.g. serve.random_store's 397b geometry)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import flashmoe
    from flashmoe.store import Store
    torch.set_num_threads(args.threads)
    store = args.store or glue_store(args.root, args.layers, args.bits, args.group_size)
    clock = collections.Counter(phase="other")
    lib = clocked_library(clock)
    model = flashmoe.load(store, cache_gb=Store(store).expert_bytes / 1e9 * 1.1 + 0.1)
    model.warm_cache()
    for stage in model.stages:  # the experts' form holds the function it was made with
        if getattr(stage.fetcher.kernel_form, "moe", None) is not None:
            object.__setattr__(stage.fetcher.kernel_form, "moe", lib.fm_moe)
    clock_phases(model, clock)
    state = model.new_state()
    logits = model.forward(list(range(1, 17)), state, all_logits=False)
    for _ in range(5):
        logits = model.forward([int(logits[-1].argmax())], state, all_logits=False)
    runs = []
    for _ in range(3):
        clock.clear()
        clock["phase"] = "other"
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            logits = model.forward([int(logits[-1].argmax())], state, all_logits=False)
        total = (time.perf_counter() - t0) * 1e3 / args.tokens
        runs.append((total, {k: v / args.tokens for k, v in clock.items() if isinstance(k, tuple) or k == "calls"}))
        print(f"{total:.2f} ms/token, {sum(v for k, v in runs[-1][1].items() if isinstance(k, tuple) and k[0] == 'c'):.2f} in C calls", flush=True)
    total = statistics.median(r[0] for r in runs)
    med = lambda key: statistics.median(r[1].get(key, 0.0) for r in runs)  # noqa: E731
    rows, in_c_total = [], 0.0
    for _, _, phase in PHASES:
        wall = med(("wall", phase)) - sum(med(("wall", inner)) for inner in INNER.get(phase, ()))
        in_c = med(("c", phase))
        in_c_total += in_c
        rows.append(f"| {phase} | {wall:.2f} | {in_c:.2f} | {wall - in_c:.2f} |")
    outside = total - sum(med(("wall", p)) for _, _, p in PHASES if not any(p in v for v in INNER.values()))
    rows.append(f"| outside the phases (embedding, sampling, the step's bookkeeping) | {outside:.2f} | "
                f"{med(('c', 'other')):.2f} | {outside - med(('c', 'other')):.2f} |")
    text = (f"\n### Where a CPU decode token goes (`benchmarks/cpu_glue.py`, {datetime.date.today()})\n\n"
            f"`python {' '.join(sys.argv)}`: "
            + (f"store {args.store}" if args.store else f"35B-A3B geometry, {args.layers} layers (every 4th "
               f"attention), {args.bits}-bit group {args.group_size}")
            + f", {args.threads} threads, every expert in RAM; medians of 3 runs "
            f"of {args.tokens} tokens: {total:.2f} ms a token, {in_c_total + med(('c', 'other')):.2f} of them in our "
            f"C calls ({med('calls'):.0f} a token).\n\n| phase | ms per token | in C | the rest |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
