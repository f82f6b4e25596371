"""Decode speed on one GPU: flashmoe (4-bit store, every expert in VRAM) against transformers (bf16) at the
Qwen3-Next-80B-A3B geometry.

    python benchmarks/vs_transformers.py --root /data/bench [--hf-layers 6] [--tokens 32] [--out benchmarks/RESULTS.md]

80B parameters in bf16 do not fit an 80 GB GPU, so transformers runs the model cut to --hf-layers layers
(random weights, its own Qwen3NextForCausalLM, fla-core kernels where installed) and its per-layer time is
extrapolated to 48 layers. flashmoe runs a random 4-bit store of all 48 layers (written directly,
benchmarks' synthetic stores) with every expert in VRAM. Both decode greedily after a 16-token prompt, K=10.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import time
from pathlib import Path

import torch

import flashmoe
from flashmoe.synthetic import QWEN3_NEXT_80B, write_random_store
from common import publish, timed_decode

LAYERS = 48


def transformers_decode(layers: int, tokens: int) -> float:
    """ms per layer per decode step of transformers' Qwen3-Next in bf16 on the GPU, cut to `layers` layers."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    fields = {k: v for k, v in QWEN3_NEXT_80B.items() if k != "architectures"}
    config = Qwen3NextConfig(**{**fields, "num_hidden_layers": layers})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen3NextForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.arange(100, 116, device="cuda")[None]
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(3):  # warm-up steps
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
    del model, out, past
    torch.cuda.empty_cache()
    return ms / (tokens * layers)


def flashmoe_decode(store: Path, tokens: int) -> tuple[float, float]:
    """(ms per layer, tok/s) of flashmoe decode with every expert in VRAM."""
    model = flashmoe.load(store, device="cuda", vram_cache_gb=1000, cache_gb=0, io_threads=16)
    model.warm_cache()
    ms = timed_decode(model, list(range(100, 116)), tokens, warm_steps=3)  # eager, capture, one replay
    hit = model.stats["vram_cache_hit_rate"]
    model.close()
    assert hit == 1.0, f"expected every expert in VRAM, hit rate {hit}"
    return ms / (tokens * LAYERS), tokens / (ms / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--hf-layers", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    hf_ms = transformers_decode(args.hf_layers, args.tokens)
    print(f"transformers: {hf_ms:.3f} ms/layer", flush=True)
    store = args.root / "store-80b"
    if not (store / "manifest.json").exists():
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        write_random_store(store, QWEN3_NEXT_80B, bits=4, group_size=64, device="cuda")
        print(f"wrote the 48-layer store in {time.perf_counter() - t0:.0f} s", flush=True)
    ours_ms, ours_tok_s = flashmoe_decode(store, args.tokens)
    import transformers

    text = (f"\n### Qwen3-Next-80B-A3B geometry, decode, flashmoe 4-bit vs transformers bf16 ({datetime.date.today()})\n\n"
            f"`python {' '.join(sys.argv)}` on {torch.cuda.get_device_name()}, transformers {transformers.__version__}. "
            f"transformers holds {args.hf_layers} of the 48 layers in bf16 (all 48 need 160 GB) and its time per layer "
            f"is extrapolated; flashmoe runs all 48 layers from a 4-bit store with every expert in VRAM. Random weights, "
            f"K=10, greedy, after a 16-token prompt.\n\n"
            "| engine | ms/layer | decode tok/s at 48 layers |\n|---|---|---|\n"
            f"| transformers, bf16, {args.hf_layers} layers measured | {hf_ms:.3f} | {1e3 / (hf_ms * LAYERS):.2f} (extrapolated) |\n"
            f"| flashmoe, 4-bit, 48 layers | {ours_ms:.3f} | {ours_tok_s:.2f} (measured) |\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
