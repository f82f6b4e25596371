"""Relative logit error of quantized stores against the unquantized one (the table in docs/FORMAT.md).

    python benchmarks/quant_error.py [--arch qwen3_5_moe] [--group-size 64]

Runs on the CPU in a minute: random-weight checkpoints built with transformers, converted at each bit width,
compared on the same prompt. Also reports greedy-token agreement over 32 tokens.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import flashmoe
from flashmoe.convert import convert
from flashmoe.tiny import build_tiny_checkpoint

PROMPT = [7, 300, 12, 45, 99, 3, 250, 18, 77, 401, 5, 66, 129, 88, 42, 310, 2, 19, 200, 150] * 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen3_5_moe")
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = build_tiny_checkpoint(root / "ckpt", args.arch, hidden_size=256, moe_intermediate_size=128,
                                     num_experts=32, num_hidden_layers=8, max_shard_size="5MB")
        exact_model = flashmoe.load(convert(ckpt, root / "exact", bits=None))
        exact = exact_model.logits(PROMPT)
        exact_tokens = list(exact_model.generate(PROMPT[:8], 32, stop_token_ids=[]))
        print("| bits | group | relative logit error | top-1 agreement (prompt) | greedy tokens equal (of 32) |")
        print("|---|---|---|---|---|")
        for bits in (8, 4, 2):
            model = flashmoe.load(convert(ckpt, root / f"q{bits}", bits=bits, group_size=args.group_size))
            logits = model.logits(PROMPT)
            err = float((logits - exact).norm() / exact.norm())
            top1 = float((logits.argmax(-1) == exact.argmax(-1)).float().mean())
            tokens = list(model.generate(PROMPT[:8], 32, stop_token_ids=[]))
            same = next((i for i, (a, b) in enumerate(zip(tokens, exact_tokens)) if a != b), 32)
            print(f"| {bits} | {args.group_size} | {err:.4f} | {top1:.0%} | {same} |")


if __name__ == "__main__":
    main()
