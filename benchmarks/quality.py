"""What quantization and a smaller K cost in quality (issue 13): held-out perplexity and next-token agreement with the
unquantized model, by bits, group size and experts per token, on the CPU.

    python benchmarks/quality.py --checkpoint /data/run/hf --tokens /data/run/tokens-heldout.npy --work /data/q
        [--bits none,8,4,2] [--groups 32,64,128] [--k 4,3,2,1] [--windows 32] [--window 256] [--out RESULTS.md]

The checkpoint (a Hugging Face one: the trained model's export) is converted once per (bits, group) into --work;
each store is loaded on the CPU with float residents (so the rows differ by their experts alone) and reads the same
--windows windows of --window held-out tokens (evenly spaced, teacher-forced). Perplexity is exp of the mean
next-token loss; agreement is the share of positions whose argmax equals the unquantized model's at the trained K.
Expert MB per token: K times an expert's stored bytes times the MoE layers (what a token reads when nothing is
cached). Prints a markdown table (and appends it to --out) and writes --json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from common import publish


def windows_of(tokens: np.ndarray, count: int, length: int) -> list[list[int]]:
    """`count` evenly spaced windows of `length` + 1 tokens (the last one's target included)."""
    starts = np.linspace(0, len(tokens) - length - 1, count).astype(np.int64)
    return [tokens[s : s + length + 1].astype(np.int64).tolist() for s in starts]


def store_for(checkpoint: Path, work: Path, bits: int | None, group: int | None) -> Path:
    from flashmoe.convert import convert

    dst = work / (f"store-{bits}bit-g{group}" if bits else "store-unquantized")
    if not (dst / "manifest.json").exists():
        convert(checkpoint, dst, bits=bits, group_size=group)
    return dst


def measure(store: Path, k: int | None, windows: list[list[int]], reference: list[torch.Tensor] | None,
            resident_format: str = "float", device: str = "cpu", one_token: bool = False):
    """(perplexity, agreement with `reference`'s argmax or None, the argmax per window, expert MB per token).
    one_token: each window read a token a step, as decode reads it (its kernels and graphs), not as one prompt."""
    import flashmoe

    model = flashmoe.load(store, device=device, experts_per_token=k, resident_format=resident_format)
    if device != "cpu":
        model.warm_cache()
    loss, agree, positions, argmax = 0.0, 0, 0, []
    for w in windows:
        if one_token:
            state = model.new_state()
            logits = torch.cat([model.forward([t], state).float().cpu() for t in w[:-1]])
        else:
            logits = model.logits(w[:-1]).float().cpu()
        target = torch.tensor(w[1:])
        loss += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        argmax.append(logits.argmax(-1))
        positions += len(target)
    if reference is not None:
        agree = sum(int((a == b).sum()) for a, b in zip(argmax, reference))
    cfg = model.config
    mb = model.experts_per_token * model.store.expert_blob_bytes * len(cfg.moe_layers) / 1e6
    model.close()
    return math.exp(loss / positions), (agree / positions if reference is not None else None), argmax, mb


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a Hugging Face checkpoint (train.py --export)")
    ap.add_argument("--tokens", type=Path, required=True, help="held-out token ids (train.py's tokens-heldout.npy)")
    ap.add_argument("--work", type=Path, required=True, help="stores are converted here")
    ap.add_argument("--bits", default="none,8,4,2")
    ap.add_argument("--groups", default="32,64,128", help="group sizes tried at 4 bits (the others: the first)")
    ap.add_argument("--k", default=None, help="experts per token to try (default: the trained K down to 1)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    windows = windows_of(np.load(args.tokens, mmap_mode="r"), args.windows, args.window)
    groups = [int(g) for g in args.groups.split(",")]
    stores = [(None, None)] + [(int(b), g) for b in args.bits.split(",") if b != "none"
                               for g in (groups if int(b) == 4 else groups[:1])]
    base = store_for(args.checkpoint, args.work, None, None)
    ppl, _, reference, mb = measure(base, None, windows, None)
    trained_k = json.loads((args.checkpoint / "config.json").read_text()).get("num_experts_per_tok")
    ks = [int(k) for k in args.k.split(",")] if args.k else list(range(trained_k, 0, -1))
    rows = [{"bits": None, "group": None, "k": trained_k, "perplexity": ppl, "agreement": 1.0, "expert_mb": mb}]
    for bits, group in stores:
        store = base if bits is None else store_for(args.checkpoint, args.work, bits, group)
        for k in ks:
            if bits is None and k == trained_k:
                continue
            p, a, _, m = measure(store, k, windows, reference)
            rows.append({"bits": bits, "group": group, "k": k, "perplexity": p, "agreement": a, "expert_mb": m})
            print(json.dumps(rows[-1]), flush=True)
    text = (f"\n### Quality by bits and K (`benchmarks/quality.py`, {datetime.date.today()})\n\n"
            f"`python {' '.join(sys.argv)}`: {args.windows} held-out windows of {args.window} tokens, CPU, float "
            f"residents.\n\n| experts stored | K | held-out perplexity | next-token agreement with unquantized, "
            f"K={trained_k} | expert MB read per token |\n|---|---|---|---|---|\n")
    for r in rows:
        stored = "unquantized (bf16)" if r["bits"] is None else f"{r['bits']}-bit, group {r['group']}"
        text += f"| {stored} | {r['k']} | {r['perplexity']:.2f} | {r['agreement']:.1%} | {r['expert_mb']:.2f} |\n"
    publish(text, args.out)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return {"rows": rows}


if __name__ == "__main__":
    main()
