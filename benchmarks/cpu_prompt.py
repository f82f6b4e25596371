"""A CPU prompt with its resident products in bf16 through oneDNN (on AMX, or AVX-512 BF16) or on our vector kernel.

    python benchmarks/cpu_prompt.py --root /data/bench [--layers 4] [--bits 8] [--threads 16] [--tokens 512]

First one resident matrix of the Qwen3.5-35B-A3B geometry (DeltaNet's input projection, 2048 -> 12288) at several
rows of input, ms per product both ways; then whole prompts of --tokens tokens through a random-weight store of that
geometry (flashmoe.synthetic, vocabulary 512), each way in a fresh process (FLASHMOE_CPU_AMX=0 / 1), the ways taking
turns for --rounds rounds. Needs a CPU with AMX or AVX-512 BF16 for the second way to differ (it says so otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import publish
from cpu_glue import glue_store, store_arguments

ROWS = (8, 16, 32, 64, 128, 512)


def per_call_ms(fn, reps: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def matrix_rows_table(bits: int, group: int) -> list[tuple[int, float, float]]:
    """(rows, our kernel ms, matrix units ms) for one 12288 x 2048 resident matrix."""
    from flashmoe.kernels import cpu_native
    from flashmoe.quant import quantize

    matrix = cpu_native.NativeMatrix.from_quantized(quantize(torch.randn(12288, 2048) * 0.02, bits, group))
    out = []
    cpu_native.MATRIX_UNIT_ROWS = 1  # every row count both ways (the engine sends fewer than 32 to our kernel)
    for rows in ROWS:
        x = torch.randn(rows, 2048)
        cpu_native.matrix_units = lambda: False
        ours = per_call_ms(lambda: matrix(x))
        cpu_native.matrix_units = lambda: True
        units = per_call_ms(lambda: matrix(x))
        out.append((rows, ours, units))
    return out


def child(store: Path, tokens: int, threads: int) -> dict:
    import flashmoe
    from flashmoe.kernels import cpu_native
    from flashmoe.store import Store

    torch.set_num_threads(threads)
    model = flashmoe.load(store, cache_gb=Store(store).expert_bytes / 1e9 * 1.1 + 0.1)
    model.warm_cache()
    prompt = [(i * 37) % 500 + 3 for i in range(tokens)]
    model.forward(prompt[:64], model.new_state())
    times = []
    for _ in range(3):
        state = model.new_state()
        t0 = time.perf_counter()
        model.forward(prompt, state)
        times.append(time.perf_counter() - t0)
    return {"pp_tok_s": tokens / statistics.median(times), "matrix_units": cpu_native.matrix_units()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    store_arguments(ap)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.threads)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flashmoe.kernels import cpu_native

    torch.set_num_threads(args.threads)
    fast = cpu_native.matrix_units()
    units = ("AMX" if torch.cpu._is_amx_tile_supported() else "AVX-512 BF16") if fast else \
        "no fast bf16 products: both ways run our kernel"
    table = matrix_rows_table(args.bits, args.group_size)
    store = glue_store(args.root, args.layers, args.bits, args.group_size)
    runs = {"0": [], "1": []}
    for _ in range(args.rounds):
        for way in runs:
            env = {**os.environ, "FLASHMOE_CPU_AMX": way}
            out = subprocess.run([sys.executable, __file__, "--root", str(args.root), "--child", str(store),
                                  "--tokens", str(args.tokens), "--threads", str(args.threads)],
                                 env=env, capture_output=True, text=True, check=True)
            runs[way].append(json.loads(out.stdout.strip().splitlines()[-1])["pp_tok_s"])
    cpu = torch.backends.cpu.get_cpu_capability()
    text = (f"\n### A CPU prompt's resident products on the matrix units ({datetime.date.today()})\n\n"
            f"`python {' '.join(sys.argv)}`: {args.threads} threads, {os.cpu_count()} CPUs ({cpu}, {units}), "
            f"{args.bits}-bit group {args.group_size}.\n\n"
            "| rows of input | our kernel, ms | matrix units (bf16), ms | speed-up |\n|---|---|---|---|\n")
    text += "".join(f"| {r} | {a:.2f} | {b:.2f} | {a / b:.2f}x |\n" for r, a, b in table)
    text += (f"\nWhole prompts of {args.tokens} tokens ({args.layers} layers, every expert in RAM), tok/s per round: "
             f"our kernel {', '.join(f'{v:.1f}' for v in runs['0'])}; matrix units "
             f"{', '.join(f'{v:.1f}' for v in runs['1'])} "
             f"({statistics.median(runs['1']) / statistics.median(runs['0']):.2f}x).\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
