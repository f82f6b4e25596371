"""A long prompt arriving while a stream decodes (issue 15's chunked prefill): how long the running stream waits.

    python benchmarks/chunked_prefill.py STORE [--device cpu] [--prompt 2048] [--chunk 512]

Stream A decodes; after a few tokens B arrives with a --prompt-token prompt. The two are stepped as the server steps
them (Model.step over both where the model batches well, else a step each), B's prompt in chunks of --chunk tokens
or in one pass. Reported: A's usual gap between tokens, its longest gap while B's prompt went through, and the time
of one chunk and of the whole prompt alone (best of two): with chunks A should wait about one chunk, not the whole
prompt.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import flashmoe
from common import publish, section


def sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def alone_s(model, tokens: list[int]) -> float:
    """Seconds of one pass over `tokens` on a fresh state (best of two)."""
    best = float("inf")
    for _ in range(2):
        state = model.new_state()
        t0 = time.perf_counter()
        model.forward(tokens, state, all_logits=False)
        sync(model)
        best = min(best, time.perf_counter() - t0)
    return best


def stream_gaps(model, prompt: list[int], chunk: int | None, warm: int) -> tuple[float, float]:
    """(A's median gap before B arrived, A's longest gap while B's prompt went through), seconds."""
    a = model.sequence([5, 17, 3, 40, 2], 100_000, stop_token_ids=[])
    b, times, arrived, ended = None, [], None, None
    while ended is None or len(times) < warm * 2 + 3:
        seqs = [s for s in (a, b) if s is not None and not s.done]
        for group in [seqs] if model.batches_well else [[s] for s in seqs]:
            for s, row in zip(group, model.step(group)):
                token = s.advance(row)
                if s is a and token is not None:
                    times.append(time.perf_counter())
        if b is None and len(times) == warm:
            b = model.sequence(prompt, 1, stop_token_ids=[], prefill_chunk=chunk)
            arrived = times[-1]
        if b is not None and b.done and ended is None:
            ended = time.perf_counter()
            b.close()
    a.close()
    before = sorted(t1 - t0 for t0, t1 in zip(times[: warm - 1], times[1:warm]))
    during = [t1 - t0 for t0, t1 in zip(times, times[1:]) if t1 > arrived and t0 < ended]
    return before[len(before) // 2], max(during)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--warm", type=int, default=6, help="A's tokens before B arrives")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model = flashmoe.load(args.store, device=args.device)
    model.warm_cache()
    model.warm_prompts(args.chunk)  # as serve does: kernels compiled and tuned before B arrives
    vocab = model.config.vocab_size
    prompt = [(7 * i + 11) % (vocab - 10) + 5 for i in range(args.prompt)]
    one_chunk, whole = alone_s(model, prompt[: args.chunk]), alone_s(model, prompt)
    rows = [f"| B's prompt alone | one chunk of {args.chunk}: {one_chunk * 1e3:.0f} ms | "
            f"all {args.prompt} tokens: {whole * 1e3:.0f} ms |"]
    for chunk in (args.chunk, None):
        usual, longest = stream_gaps(model, prompt, chunk, args.warm)
        how = f"in chunks of {chunk}" if chunk else "in one pass"
        rows.append(f"| B's prompt {how} | A's usual gap {usual * 1e3:.0f} ms | A's longest gap {longest * 1e3:.0f} ms "
                    f"({longest / one_chunk:.2f}x one chunk) |")
        print(rows[-1], flush=True)
    model.close()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    text = section("A long prompt beside a running stream", machine,
                   f"`python chunked_prefill.py {args.store} --device {args.device} --prompt {args.prompt} --chunk "
                   f"{args.chunk}`: stream A decodes; B arrives with a {args.prompt}-token prompt, stepped with A as "
                   f"the server steps them ({'together' if model.batches_well else 'a step each'}).",
                   ["", "", ""], rows)
    publish(text, args.out)


if __name__ == "__main__":
    main()
