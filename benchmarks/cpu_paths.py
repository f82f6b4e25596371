"""CPU decode and prompt speed of each expert path and resident format, side by side in one process.

    python benchmarks/cpu_paths.py [--layers 8] [--experts 256] [--bits 8,4] [--threads 16] [--paths ours,int4]
                                   [--out RESULTS.md]

A random-weight store with the Qwen3.5-35B-A3B geometry (hidden 2048, experts of 512, K=8, shared expert,
DeltaNet + gated attention, the real 248k vocabulary) is written per bit width; every expert is then cached
in RAM and each configuration is timed on the same store: the kernels ("dequantize": every expert to float per
token, as before torch's int4 kernel; "int4": torch's int4 kernel, kernels/cpu_int4.py; "ours": kernels/cpu_native.c,
experts and residents) and the resident format.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import flashmoe
from flashmoe.kernels import cpu_int4, cpu_native
from flashmoe.synthetic import QWEN3_5_35B, write_random_store
from common import publish, section, timed_decode

REAL_LAYERS = 40


def measure(store: Path, resident_format: str, tokens: int, prompt_tokens: int) -> dict:
    model = flashmoe.load(store, device="cpu", cache_gb=1000, resident_format=resident_format)
    model.warm_cache()
    layers = model.config.num_hidden_layers
    decode_ms = timed_decode(model, list(range(10, 42)), tokens) / tokens
    split = {k: model.stats[k] / tokens / layers for k in ("attention_ms", "routing_ms", "expert_compute_ms")}
    t0 = time.perf_counter()
    model.forward(list(range(10, 10 + prompt_tokens)), model.new_state(), all_logits=False)
    prompt_s = time.perf_counter() - t0
    model.close()
    return {"decode_tok_s": 1e3 / decode_ms, "decode_ms": decode_ms, "prompt_tok_s": prompt_tokens / prompt_s, **split}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--formats", default="float,bf16,int8,int4")
    ap.add_argument("--paths", default="dequantize,int4,ours")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dict(QWEN3_5_35B, num_hidden_layers=args.layers, num_experts=args.experts)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        for bits in map(int, args.bits.split(",")):
            store = write_random_store(Path(tmp) / f"store{bits}", cfg, bits=bits, group_size=args.group_size,
                                       device="cuda" if torch.cuda.is_available() else "cpu")
            real_for_store, real_library = cpu_int4.KernelForm.for_store, cpu_native.library
            paths = args.paths.split(",")
            configs = [(p, "float") for p in paths if p == "dequantize"]
            configs += [(p, f) for p in paths if p != "dequantize" for f in args.formats.split(",")]
            for path, fmt in configs:
                if path == "dequantize":
                    cpu_int4.KernelForm.for_store = lambda *a, **k: None
                if path != "ours":
                    cpu_native.library = lambda: None
                try:
                    r = measure(store, fmt, args.tokens, args.prompt_tokens)
                finally:
                    cpu_int4.KernelForm.for_store, cpu_native.library = real_for_store, real_library
                print(bits, path, fmt, {k: round(v, 2) for k, v in r.items()}, flush=True)
                layer_ms = r["attention_ms"] + r["routing_ms"] + r["expert_compute_ms"]
                at_real = 1e3 / (r["decode_ms"] + (REAL_LAYERS - args.layers) * layer_ms)
                rows.append(f"| {bits}-bit g{args.group_size} | {path} | {fmt} | {r['decode_tok_s']:.2f} | {at_real:.2f} | "
                            f"{r['attention_ms']:.2f} | {r['routing_ms']:.2f} | {r['expert_compute_ms']:.2f} | "
                            f"{r['decode_ms'] - args.layers * layer_ms:.1f} | {r['prompt_tok_s']:.1f} |")
    cpu = f"{platform.processor() or platform.machine()}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}"
    columns = ["store", "experts", "resident", f"decode tok/s ({args.layers} layers)",
               f"tok/s at {REAL_LAYERS} layers (est.)", "attention/DeltaNet", "routing", "experts (+shared)",
               "rest of a token, ms (head)", "prompt tok/s"]
    text = section(f"CPU paths, Qwen3.5-35B-A3B geometry, {args.layers} layers x {args.experts} experts", cpu,
                   f"Every expert cached in RAM; decode of {args.tokens} tokens after a 32-token prompt; prompt tok/s "
                   f"from one {args.prompt_tokens}-token prompt. Split columns: ms per layer per token (host timers); the "
                   f"estimate at the real model's {REAL_LAYERS} layers adds the measured per-layer time of the missing "
                   "layers to the measured token.", columns, rows)
    publish(text, args.out)


if __name__ == "__main__":
    main()
