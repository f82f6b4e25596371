"""Time to first token of each turn of a chat, with and without the prefix cache (issue 15).

    python benchmarks/prefix_turns.py [STORE] [--geometry 35b] [--layers 4] [--experts 64] [--turns 5] [--words 150]
                                      [--device cpu] [--out RESULTS.md]

A random-weight Qwen3.5-MoE checkpoint (flashmoe.tiny, with its byte-level tokenizer and ChatML template; the 35B-A3B
layer geometry at the given layers and experts) converted at 8 bits. A chat of --turns turns, each user message
--words words, each reply --reply tokens: the same conversation runs twice, once on a model without a prefix cache
and once with one, rendered and branched as the server does (chat.ChatFormat). TTFT is the prefill time of a turn's
prompt (its first token sampled); "prefilled" is how many prompt tokens ran.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

import flashmoe
from flashmoe.chat import ChatFormat
from flashmoe.convert import convert
from flashmoe.tiny import build_tiny_checkpoint
from common import publish, section

GEOMETRIES = {"tiny": {}, "35b": dict(hidden_size=2048, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                                    num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                                    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                                    linear_value_head_dim=128, num_experts_per_tok=8),
              # Qwen3.5-397B-A17B's layers (the small vocabulary kept: its 248k-row embedding and head are 4 GB)
              "397b": dict(hidden_size=4096, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
                           num_attention_heads=32, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                           linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128,
                           num_experts_per_tok=10)}
WORDS = "sea river mountain stone light wind city garden road bridge tower forest winter summer song story".split()


def chat(model, fmt: ChatFormat, turns: int, words: int, reply: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    messages, rows = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words))})
        kwargs = {"enable_thinking": False}
        prompt = fmt.encode(fmt.render(messages, **kwargs))
        keep_at = fmt.branch_points(prompt, messages, **kwargs) if model.prefix_cache is not None else ()
        before = model.stats["tokens"]
        t0 = time.perf_counter()
        generator = model.generate(prompt, reply, stop_token_ids=[], keep_at=keep_at)
        first = next(t for t in generator if t is not None)
        ttft = time.perf_counter() - t0
        prefilled = model.stats["tokens"] - before
        out = [first] + [t for t in generator if t is not None]
        messages.append({"role": "assistant", "content": fmt.tokenizer.decode(out, skip_special_tokens=True)})
        rows.append({"turn": turn + 1, "prompt": len(prompt), "prefilled": prefilled, "ttft_ms": ttft * 1e3})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store", type=Path, nargs="?", help="a store to run (else a random checkpoint of --geometry)")
    ap.add_argument("--geometry", choices=list(GEOMETRIES), default="35b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--words", type=int, default=150)
    ap.add_argument("--reply", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    shape = dict(GEOMETRIES[args.geometry], num_hidden_layers=args.layers, num_experts=args.experts,
                 layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(args.layers)])
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        store = args.store or convert(build_tiny_checkpoint(Path(tmp) / "ckpt", "qwen3_5_moe", max_shard_size="2GB",
                                                            **shape), Path(tmp) / "store", bits=8, group_size=32)
        results = {}
        for cache_gb in (0.0, 2.0):
            with flashmoe.load(store, device=args.device, prefix_cache_gb=cache_gb) as model:
                model.warm_cache()
                fmt = ChatFormat(model.tokenizer)
                chat(model, fmt, 1, 20, 4, seed=99)  # compile and warm up, on another conversation
                if model.prefix_cache is not None:
                    model.prefix_cache = type(model.prefix_cache)(model.prefix_cache.max_bytes)
                results[cache_gb > 0] = chat(model, fmt, args.turns, args.words, args.reply, seed=1)
    rows = []
    for off, on in zip(results[False], results[True]):
        rows.append(f"| {off['turn']} | {off['prompt']} | {off['prefilled']} | {off['ttft_ms']:.0f} | {on['prefilled']} | "
                    f"{on['ttft_ms']:.0f} | {off['ttft_ms'] / on['ttft_ms']:.1f}x |")
        print(rows[-1], flush=True)
    machine = f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}, {torch.get_num_threads()} threads"
    what = f"store {args.store}" if args.store else f"{args.geometry} geometry, {args.layers} layers"
    text = section(f"Chat turns with and without the prefix cache, {what}", machine,
                   f"{args.turns} turns of {args.words}-word user messages and {args.reply}-token replies; TTFT = "
                   "the prompt's prefill until its first token.",
                   ["turn", "prompt tokens", "prefilled (no cache)", "TTFT ms (no cache)", "prefilled (cache)",
                    "TTFT ms (cache)", "speed-up"], rows)
    publish(text, args.out)


if __name__ == "__main__":
    main()
