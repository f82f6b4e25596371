"""The server under load (issue 15): aggregate decode tok/s at 1..N concurrent streams, and a chat's turn-by-turn time
to first token with and without the prefix cache, through the HTTP API with the official openai client.

    python benchmarks/serve.py STORE [--device cuda] [--streams 1,2,4,8,16] [--tokens 64] [--turns 5] [--words 150]
    python benchmarks/serve.py --geometry 35b --layers 4 --experts 64 ...   # a random-weight checkpoint, made here
    python benchmarks/serve.py ... --batch-steps   # the streams with a step each and with batched steps

`flashmoe serve` runs as its own process on 127.0.0.1 (a free port), as users run it; the load comes from threads
here. Streams: N clients each ask /v1/completions for --tokens tokens at once (the server runs up to N at a time);
aggregate tok/s = all completion tokens / wall time from the first request to the last answer; steady decode tok/s
= the tokens streamed while every stream was decoding (after the last one's first token, up to the first one's end) /
that window. Turns: one chat of
--turns turns (--words-word user messages, --reply-token replies, thinking off, greedy), streamed; TTFT = time to
the first chunk that carries text; once on a server with --prefix-cache-gb 0, once with the default.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import publish, section

WORDS = "sea river mountain stone light wind city garden road bridge tower forest winter summer song story".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `flashmoe serve` whose model steps cost nothing: every forward answers a fixed row of logits (argmax: " river"),
# so what the streams measure is the server's own work per token (scheduler, sampling, detokenizing, HTTP)
NO_ENGINE = """
import sys, torch
from flashmoe import cli, engine

def forward_batch(self, inputs):
    if not hasattr(self, "_fixed_row"):
        self._fixed_row = torch.zeros(1, self.config.vocab_size)
        self._fixed_row[0, self.tokenizer.encode(" river", add_special_tokens=False)[0]] = 1.0
    return [self._fixed_row] * len(inputs)

engine.Model.forward_batch = forward_batch
sys.argv[0] = "flashmoe"
cli.main()
"""


class Server:
    """`python -m flashmoe serve STORE ...` on a free port, until closed."""

    def __init__(self, store: Path, device: str, max_concurrent: int, prefix_cache_gb: float, log: Path,
                 batch_steps: bool | None = None, no_engine: bool = False, caches: dict | None = None):
        """batch_steps: serve's --batch-steps / --no-batch-steps, or None for its default. no_engine: NO_ENGINE.
        caches: load_args' options, as serve's --cache-gb / --vram-cache-gb / --resident-format."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        launch = ["-c", NO_ENGINE] if no_engine else ["-m", "flashmoe"]
        cmd = [sys.executable, *launch, "serve", str(store), "--port", str(self.port), "--device", device,
               "--max-concurrent", str(max_concurrent), "--prefix-cache-gb", str(prefix_cache_gb)]
        for name, gb in (caches or {}).items():
            cmd += [f"--{name.replace('_', '-')}", str(gb)]
        if batch_steps is not None:
            cmd.append("--batch-steps" if batch_steps else "--no-batch-steps")
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self._log.close()
                    tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
                    raise SystemExit(f"the server did not start; the end of {log}:\n{tail}")
                time.sleep(0.5)

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=3600)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def stream_rows(server: Server, counts: list[int], tokens: int, how: str = "") -> list[str]:
    """The table's rows of streams(server, n, tokens) for each n in counts, after a warm-up; `how`: the rows' label."""
    streams(server, 1, 4)  # warm-up: kernels, caches
    rows, base = [], None
    for n in counts:
        rate, decode = streams(server, n, tokens)
        base = base or (rate, decode)
        rows.append(f"| {n} streams{how} | {rate:.1f} tok/s | {rate / base[0]:.2f}x | {decode:.1f} tok/s | "
                    f"{decode / base[1]:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def streams(server: Server, n: int, tokens: int) -> tuple[float, float]:
    """n clients at once, streamed: (completion tok/s, from their release together to the last answer; steady decode
    tok/s, the tokens that arrived while all n were decoding over that window: from the last stream's first token to
    the first stream's last). Each chunk's tokens are its stream's usage over its chunks (a chunk is a step's text;
    one whose text is not yet whole is held back and sent with the next). The client and the model's id are made
    before: an openai client took 17-34 ms to make, as long as a short request's decode."""
    client, model, done = server.client(), server_model(server), []
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait()
        arrivals, used = [], None
        for chunk in client.completions.create(model=model, prompt=f"Story {i}: the {WORDS[i % len(WORDS)]}",
                                               max_tokens=tokens, temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.perf_counter())
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        done.append((arrivals, used))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    rate = sum(used for _, used in done) / (max(a[-1] for a, _ in done) - t0)
    start, end = max(a[0] for a, _ in done), min(a[-1] for a, _ in done)
    inside = sum(sum(start < t <= end for t in a) * used / len(a) for a, used in done)
    return rate, (inside / (end - start) if end > start else float("nan"))


def server_model(server: Server) -> str:
    """The served model's id (asked once per server)."""
    if not hasattr(server, "model_id"):
        server.model_id = server.client().models.list().data[0].id
    return server.model_id


def turns(server: Server, n: int, words: int, reply: int, seed: int) -> list[float]:
    """TTFT (ms) of each turn of one chat."""
    client, rng, model = server.client(), random.Random(seed), server_model(server)
    messages, out = [], []
    for _ in range(n):
        messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words))})
        t0, first, text = time.perf_counter(), None, []
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=reply, temperature=0,
                                                    stream=True,
                                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}}):
            delta = chunk.choices[0].delta if chunk.choices else None
            piece = delta and (delta.content or getattr(delta, "reasoning_content", None))
            if piece:
                first = first or time.perf_counter()
                text.append(delta.content or "")
        out.append(((first or time.perf_counter()) - t0) * 1e3)
        messages.append({"role": "assistant", "content": "".join(text)})
    return out


def store_args(ap: argparse.ArgumentParser) -> None:
    """A store to run, or the shape of a random one to make (random_store), the device and the expert caches."""
    ap.add_argument("store", type=Path, nargs="?")
    ap.add_argument("--geometry", default="35b", help="without STORE: a random checkpoint of this layer geometry")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--bits", type=int, default=8, choices=[4, 8])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-gb", type=float, default=None, help="the RAM expert cache (load's cache_gb)")
    ap.add_argument("--vram-cache-gb", type=float, default=None, help="the VRAM expert cache (load's vram_cache_gb)")
    ap.add_argument("--resident-format", default=None, help="load's resident_format (int8 / int4: quantized residents)")


def load_args(args: argparse.Namespace) -> dict:
    """load()'s options that store_args sets (the caches' sizes, the residents' format), those given."""
    return {k: v for k, v in (("cache_gb", args.cache_gb), ("vram_cache_gb", args.vram_cache_gb),
                              ("resident_format", args.resident_format)) if v is not None}


def store_name(args: argparse.Namespace) -> str:
    return f"store {args.store}" if args.store else (
        f"a random {args.geometry} checkpoint, {args.layers} layers, {args.experts} experts, {args.bits}-bit "
        f"group {args.group_size}")


def random_store(root: Path, geometry: str, layers: int, experts: int, bits: int = 8, group_size: int = 32) -> Path:
    """A random-weight store of the geometry's layers (small vocabulary, a trained tiny tokenizer). Up to 4 GB of
    bf16 experts it goes the users' way (transformers' checkpoint, then convert); above, the tiny checkpoint gives
    config and tokenizer and the store is written directly (flashmoe.synthetic: the 397b geometry's 512 experts a
    layer would be 13 GB of bf16 per layer)."""
    import json
    import shutil

    from flashmoe.convert import TOKENIZER_FILES, convert
    from flashmoe.synthetic import write_random_store
    from flashmoe.tiny import build_tiny_checkpoint
    from prefix_turns import GEOMETRIES

    shape = dict(GEOMETRIES[geometry], num_hidden_layers=layers, num_experts=experts,
                 layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)])
    expert_bytes = 3 * 2 * shape.get("hidden_size", 64) * shape.get("moe_intermediate_size", 64)
    if layers * experts * expert_bytes <= 4e9:
        ckpt = build_tiny_checkpoint(root / "ckpt", "qwen3_5_moe", max_shard_size="2GB", **shape)
        return convert(ckpt, root / "store", bits=bits, group_size=group_size)
    ckpt = build_tiny_checkpoint(root / "ckpt", "qwen3_5_moe", **dict(shape, num_hidden_layers=1, num_experts=4,
                                                                      layer_types=shape["layer_types"][:1]))
    config = json.loads((ckpt / "config.json").read_text())
    config.update(num_hidden_layers=layers, num_experts=experts, layer_types=shape["layer_types"])
    import torch

    store = write_random_store(root / "store", config, bits=bits, group_size=group_size,
                               device="cuda" if torch.cuda.is_available() else "cpu")
    for name in TOKENIZER_FILES:
        if (ckpt / name).exists():
            shutil.copy(ckpt / name, store / name)
    return store


def main() -> None:
    ap = argparse.ArgumentParser()
    store_args(ap)
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--turns", type=int, default=5, help="0: no chat")
    ap.add_argument("--words", type=int, default=150)
    ap.add_argument("--reply", type=int, default=32)
    ap.add_argument("--batch-steps", action="store_true", help="the streams twice: a step each, then batched steps")
    ap.add_argument("--no-engine", action="store_true",
                    help="only the streams, the model's forward replaced by a fixed row: the server's own cost")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        tmp = Path(tmp)
        store = args.store or random_store(tmp, args.geometry, args.layers, args.experts, args.bits, args.group_size)
        rows, ttft, caches = [], {}, load_args(args)
        if args.no_engine:
            server = Server(store, args.device, max(counts), 0.0, tmp / "serve-no-engine.log", no_engine=True, caches=caches)
            try:
                rows += stream_rows(server, counts, args.tokens, ", no engine")
            finally:
                server.close()
            publish(section("The server's own work per token (no engine)", f"device {args.device}, "
                            f"{os.cpu_count()} CPU cores", f"`python serve.py {' '.join(sys.argv[1:])}`: /v1/completions "
                            f"of {args.tokens} tokens per stream, every forward a fixed row of logits.",
                            ["load", "completion", "vs one stream", "steady decode", "vs one stream"], rows), args.out)
            return
        if args.batch_steps:  # the streams both ways, one server each, side by side
            for batch in (False, True):
                server = Server(store, args.device, max(counts), 1.0, tmp / f"serve-batch{batch}.log", batch, caches=caches)
                try:
                    rows += stream_rows(server, counts, args.tokens, ", batched steps" if batch else ", a step each")
                finally:
                    server.close()
        server = Server(store, args.device, max(counts), 1.0, tmp / "serve-cache.log", caches=caches)
        try:
            if not args.batch_steps:  # serve's default way
                rows += stream_rows(server, counts, args.tokens)
            if args.turns:
                turns(server, 1, 20, 4, seed=99)  # warm-up on another chat
                ttft["cache"] = turns(server, args.turns, args.words, args.reply, seed=1)
        finally:
            server.close()
        if args.turns:
            server = Server(store, args.device, 1, 0.0, tmp / "serve-nocache.log", caches=caches)
            try:
                turns(server, 1, 20, 4, seed=99)
                ttft["none"] = turns(server, args.turns, args.words, args.reply, seed=1)
            finally:
                server.close()
    for i, (off, on) in enumerate(zip(ttft.get("none", []), ttft.get("cache", []))):
        rows.append(f"| turn {i + 1} TTFT | {off:.0f} ms without the prefix cache, {on:.0f} ms with | {off / on:.1f}x | | |")
        print(rows[-1], flush=True)
    text = section(f"Serving under load, {store_name(args)}", f"device {args.device}, {os.cpu_count()} CPU cores",
                   f"/v1/completions of {args.tokens} tokens per stream, all streams at once; then a {args.turns}-turn "
                   f"chat ({args.words}-word messages, {args.reply}-token replies), streamed.",
                   ["load", "completion / TTFT", "vs one stream / speed-up", "steady decode", "vs one stream"], rows)
    publish(text, args.out)


if __name__ == "__main__":
    main()
