"""Decode speed of the streaming engine on a random-weight Qwen3.5-MoE store, cold (no expert cache) and warm.

    python benchmarks/decode.py [--device cpu|cuda] [--hidden 1024] [--experts 64] [--layers 8] [--bits 4]
                                [--tokens 32] [--out benchmarks/RESULTS.md]

Builds the checkpoint with transformers (random weights), converts it, then for each regime prints tokens/s
and ms per layer split into attention/DeltaNet, routing, expert I/O wait and expert compute. With --out,
appends a dated section with the command and the machine to that markdown file.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

import flashmoe
from flashmoe.convert import convert
from flashmoe.tiny import build_tiny_checkpoint
from common import publish, section, timed_decode


def machine() -> str:
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} / {cpu}"
    return cpu


def measure(store: Path, device: str, cache_gb: float, tokens: int, k: int | None) -> dict:
    """Decode-only numbers: the prompt is prefilled first, then stats are reset and `tokens` steps timed."""
    tier = {"vram_cache_gb": cache_gb} if device.startswith("cuda") else {"cache_gb": cache_gb}
    model = flashmoe.load(store, device=device, experts_per_token=k, **tier)
    prompt = list(range(10, 42))
    if cache_gb > 0:  # warm: every expert in the cache
        model.warm_cache()
    wall_ms = timed_decode(model, prompt, tokens)
    s = model.stats
    model.close()
    per_layer = tokens * model.config.num_hidden_layers
    split = {k: s[k] / per_layer for k in ("attention_ms", "routing_ms", "expert_io_ms", "expert_compute_ms")}
    return {"tok_s": tokens / (wall_ms / 1e3), "ms_per_layer": wall_ms / per_layer, "hit_rate": s["cache_hit_rate"],
            "mb_read": s["expert_bytes_read"] / 1e6 / tokens, **split}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--moe-intermediate", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = build_tiny_checkpoint(root / "ckpt", "qwen3_5_moe", hidden_size=args.hidden, num_experts=args.experts,
                                     moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
                                     shared_expert_intermediate_size=args.moe_intermediate, num_experts_per_tok=8,
                                     num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                                     linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64,
                                     linear_value_head_dim=64, max_shard_size="500MB")
        store = convert(ckpt, root / "store", bits=args.bits)
        rows = []
        for name, cache_gb in (("cold: no expert cache (page cache warm; on cuda no VRAM cache)", 0.0), ("warm: every expert cached (on cuda in VRAM)", 100.0)):
            r = measure(store, args.device, cache_gb, args.tokens, args.k)
            rows.append(f"| {name} | {r['tok_s']:.2f} | {r['ms_per_layer']:.2f} | {r['attention_ms']:.2f} | "
                        f"{r['routing_ms']:.2f} | {r['expert_io_ms']:.2f} | {r['expert_compute_ms']:.2f} | "
                        f"{r['hit_rate']:.0%} | {r['mb_read']:.0f} |")
    columns = ["regime", "decode tok/s", "ms/layer", "attention/DeltaNet", "routing", "expert I/O wait", "expert compute",
               "cache hit rate", "expert MB read per token"]
    text = section(f"decode, {args.device}, {args.layers} layers x {args.experts} experts, hidden {args.hidden}, "
                   f"{args.bits}-bit", machine(), "Decode only (after a 32-token prefill), greedy; the split columns are "
                   "ms per layer per token, host-side timers (on CUDA they include kernel launches, not queued GPU work).",
                   columns, rows)
    publish(text, args.out)


if __name__ == "__main__":
    main()
