"""CPU decode with the small ops around a layer in our kernels or in torch's, alternated round by round in one process
(a noisy machine then moves both alike; timing one configuration after the other does not cancel it).

    python benchmarks/cpu_small_ops.py [--layers 4] [--bits 8] [--rounds 5] [--threads 16] [--root DIR]

Qwen3.5-35B-A3B geometry (vocabulary 512, as benchmarks/peers.py's model), random weights, every expert in RAM.
Configurations: everything through kernels/cpu_native.c; RMSNorm, the conv step and DeltaNet's gates through torch
(kernels/fused.py's references); and DeltaNet's recurrent step through torch too.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import flashmoe
from flashmoe.kernels import cpu_native, gated_delta
from flashmoe.synthetic import QWEN3_5_35B, write_random_store

SMALL_OPS = ("rms_norm", "conv_step", "delta_gates")
CONFIGS = (("all ours", True, True), ("norms, conv, gates in torch", False, True),
           ("... and DeltaNet's step in torch", False, False))


def decode_tok_s(model, tokens: int) -> float:
    state = model.new_state()
    model.forward(list(range(10, 42)), state, all_logits=False)
    model.forward([5], state, all_logits=False)
    t0 = time.perf_counter()
    for _ in range(tokens):
        model.forward([5], state, all_logits=False)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_native.library() is None:
        raise SystemExit("our CPU kernels could not be built here")
    real = {name: getattr(cpu_native, name) for name in SMALL_OPS}
    real_step = gated_delta.gated_delta_step
    cfg = dict(QWEN3_5_35B, num_hidden_layers=args.layers, num_experts=256, vocab_size=512)
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        store = write_random_store(Path(tmp) / "store", cfg, bits=args.bits, group_size=32,
                                   device="cuda" if torch.cuda.is_available() else "cpu")
        model = flashmoe.load(store, device="cpu", cache_gb=1000)
        model.warm_cache()
        rates: dict[str, list[float]] = {}
        try:
            for r in range(args.rounds):
                for name, small_ops, delta_step in CONFIGS:
                    for op, fn in real.items():
                        setattr(cpu_native, op, fn if small_ops else (lambda *a, **k: None))
                    gated_delta.gated_delta_step = real_step if delta_step else (lambda *a: None)
                    rates.setdefault(name, []).append(decode_tok_s(model, args.tokens))
                print(r, {k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
        finally:
            for op, fn in real.items():
                setattr(cpu_native, op, fn)
            gated_delta.gated_delta_step = real_step
        model.close()
    print(f"median decode tok/s ({args.layers} layers, {args.bits}-bit, int8 activations: "
          f"{cpu_native.int8_activations()}):", {k: round(statistics.median(v), 1) for k, v in rates.items()})


if __name__ == "__main__":
    main()
