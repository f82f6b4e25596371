"""Decode of several sequences at once through the engine alone (no HTTP; issue 15): aggregate tok/s at 1..N
sequences, a forward each (Model.forward per sequence, its own graph) against one forward for all (Model.step over
the batch: on a GPU holding every expert, one CUDA graph for the batch).

    python benchmarks/batch_decode.py STORE [--device cuda] [--counts 1,2,4,8,16] [--tokens 128]
    python benchmarks/batch_decode.py --geometry 35b --layers 4 --experts 64 ...   # a random checkpoint, made here
    python benchmarks/batch_decode.py ... --churn   # also: sequences ending at random lengths, each replaced
    python benchmarks/batch_decode.py ... --server-graphs   # batched as serve runs it: one alone in a graph of one
    python benchmarks/batch_decode.py ... --trace calibrated   # each sequence routed by its own calibrated trace

Each count runs twice per way; the second run's numbers are kept (the first compiles kernels and captures graphs for
its set of sequences). Steady = the last half of the steps (graphs replaying); whole = prompt to last token, with
every capture. Greedy sampling, as Sequence.advance does it. --trace calibrated routes each sequence by its own trace
of one model (traces.calibrated_sequences: the layers' popularity shared, the picks each sequence's own), so a
batch's tokens share experts as a trained model's concurrent requests do; random weights route uniformly (a batch
of 8 at K=10 over 512 experts picks ~77 distinct experts a layer: ~7.7x one token's expert bytes).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import flashmoe
from common import publish, section
from flashmoe.traces import TraceShape, calibrated_sequences, uniform_trace
from serve import load_args, random_store, store_args, store_name


def run(model, count: int, tokens: int, batched: bool) -> tuple[float, float, float]:
    """(steady tok/s, whole tok/s, the share of the steady time in Model.step) of `count` sequences making `tokens`
    tokens each."""
    seqs = [model.sequence([5 + i, 17, 3 * i + 1, 40, 2], tokens, stop_token_ids=[]) for i in range(count)]
    t0, marks, in_step = time.perf_counter(), [], []
    while not all(s.done for s in seqs):
        running = [s for s in seqs if not s.done]
        stepping = 0.0
        for group in [running] if batched else [[s] for s in running]:
            t1 = time.perf_counter()
            rows = model.step(group)
            stepping += time.perf_counter() - t1
            for s, row in zip(group, rows):
                s.advance(row)
        if all(s.prompt_done for s in seqs):
            marks.append(time.perf_counter())
            in_step.append(stepping)
    for s in seqs:
        s.close()
    end = time.perf_counter()
    half = len(marks) // 2
    steady = count * (len(marks) - 1 - half) / (marks[-1] - marks[half])
    return steady, count * tokens / (end - t0), sum(in_step[half + 1 :]) / (marks[-1] - marks[half])


def churn(model, count: int, tokens: int, batched: bool, seed: int = 0) -> float:
    """Aggregate tok/s of `count` running sequences that end after 1/4 to all of `tokens` tokens, each replaced by a
    new one (a short prompt first) until count x tokens tokens are made: the set a server steps changes often."""
    rng = random.Random(seed)
    made, started = 0, 0

    def new():
        nonlocal started
        started += 1
        return model.sequence([5 + started % 50, 17, 3, 40, 2], rng.randint(max(1, tokens // 4), tokens),
                              stop_token_ids=[])

    seqs = [new() for _ in range(count)]
    t0 = time.perf_counter()
    while made < count * tokens:
        for group in [seqs] if batched else [[s] for s in seqs]:
            for s, row in zip(group, model.step(group)):
                made += s.advance(row) is not None
        for i, s in enumerate(seqs):
            if s.done:
                s.close()
                seqs[i] = new()
    for s in seqs:
        s.close()
    return made / (time.perf_counter() - t0)


def profile(model, count: int, steps: int = 10) -> str:
    """The kernels of `steps` batched decode steps of `count` sequences, once their graphs are captured: per kernel
    total device time, by torch.profiler (graph replays show their kernels)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    seqs = [model.sequence([5 + i, 17, 3 * i + 1, 40, 2], 8 + steps, stop_token_ids=[]) for i in range(count)]
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        for s, row in zip(seqs, model.step(seqs)):
            s.advance(row)

    while not all(s.prompt_done for s in seqs):
        step()
    for _ in range(3):  # eager, capture, replay
        step()
    sync()
    with profiler(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    for s in seqs:
        s.close()
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25, max_name_column_width=70)


def main() -> None:
    ap = argparse.ArgumentParser()
    store_args(ap)
    ap.add_argument("--counts", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--churn", action="store_true",
                    help="also: sequences of random lengths, each replaced by a new one when it ends")
    ap.add_argument("--server-graphs", action="store_true",
                    help="batched as the server steps them: a lone sequence through a batch graph of one, not its own")
    ap.add_argument("--profile", type=int, default=0,
                    help="also: the GPU kernels of 10 batched steps of this many sequences (torch.profiler), top 25")
    ap.add_argument("--trace", choices=("router", "calibrated", "uniform"), default="router",
                    help="route each sequence by its own trace (16 of them, taken in turn) instead of the router")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        store = args.store or random_store(Path(tmp), args.geometry, args.layers, args.experts, args.bits,
                                           args.group_size)
        model = flashmoe.load(store, device=args.device, **load_args(args))
        if args.trace != "router":
            cfg = model.config
            shape = TraceShape(args.tokens + 16, len(cfg.moe_layers), cfg.num_experts, model.experts_per_token)
            model.route_by_trace(calibrated_sequences(shape, 16) if args.trace == "calibrated"
                                 else np.stack([uniform_trace(shape, seed=i) for i in range(16)]))
        model.warm_cache()
        rows, base, churned = [], None, []
        for count in [int(n) for n in args.counts.split(",")]:
            got = {}
            for batched in (False, True):
                # batched, as the server steps them: with --server-graphs no sequence has a graph of its own, so
                # one alone steps through a batch graph of one (the "one forward for all" column at 1 sequence)
                model.graph_per_sequence = not (batched and args.server_graphs)
                run(model, count, args.tokens, batched)
                got[batched] = run(model, count, args.tokens, batched)
            base = base or got[False][0]
            (each, each_whole, each_in), (together, together_whole, together_in) = got[False], got[True]
            rows.append(f"| {count} | {each:.0f} | {together:.0f} | {together / each:.2f}x | {together / base:.2f}x "
                        f"| {each_whole:.0f} / {together_whole:.0f} | {each_in:.0%} / {together_in:.0%} |")
            print(rows[-1], flush=True)
            if args.churn:
                turns = [churn(model, count, args.tokens, batched) for batched in (False, True)]
                churned.append(f"| {count} | {turns[0]:.0f} | {turns[1]:.0f} | {turns[1] / turns[0]:.2f}x |")
                print(churned[-1], flush=True)
        if args.profile:
            print(profile(model, args.profile), flush=True)
        model.close()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    text = section(f"Batched decode through the engine, {store_name(args)}", f"{machine}",
                   f"`python batch_decode.py --counts {args.counts} --tokens {args.tokens} --device {args.device} "
                   f"--trace {args.trace}`: "
                   f"sequences of {args.tokens} greedy tokens each, all at once; steady = the last half of the steps.",
                   ["sequences", "a forward each, tok/s", "one forward for all, tok/s", "batched / each",
                    "batched / one sequence", "whole run (prompt to last token), each / batched",
                    "steady time in Model.step, each / batched"], rows)
    if churned:
        text += ("\nWith churn (`--churn`: each sequence ends after a random 1/4 to all of the tokens and a new one takes"
                 " its place), aggregate tok/s:\n\n| sequences | a forward each | one forward for all | batched / each |\n"
                 "|---|---|---|---|\n" + "\n".join(churned) + "\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
