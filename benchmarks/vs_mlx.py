"""CPU decode side by side with mlx-lm on the same MLX 4-bit checkpoint.

A Qwen3.5-MoE checkpoint at the 35B-A3B layer geometry (hidden 2048, expert intermediate 512, K=8; fewer layers and
experts so it builds in minutes) is made by transformers, quantized by mlx-lm's own converter (4-bit, group 64, the
routers at 8 bits), and imported by flashmoe as it is (codes repacked). Each engine then decodes the same prompt
greedily on the CPU, in a process of its own: tokens/s after warm-up and the process's peak RSS. mlx-lm's numbers
are its own (stream_generate's generation_tps).

usage: python vs_mlx.py [--layers 8] [--experts 128] [--tokens 64] [--work DIR] [--out RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import publish, section  # noqa: E402

PROMPT = list(range(1000, 1016))


def build(work: Path, layers: int, experts: int) -> tuple[Path, Path]:
    """(the MLX checkpoint, the flashmoe store of it)."""
    from mlx_lm.convert import convert as mlx_convert

    from flashmoe.convert import convert
    from flashmoe.tiny import build_tiny_checkpoint, hf_as_mlx_lm_reads_it

    types = (["linear_attention"] * 3 + ["full_attention"]) * (layers // 4)
    t = time.perf_counter()
    hf = build_tiny_checkpoint(work / "hf", "qwen3_5_moe_vl", max_shard_size="4GB", hidden_size=2048,
                               num_hidden_layers=layers, layer_types=types, num_experts=experts,
                               num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                               num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                               linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                               vocab_size=32768)
    fused = hf_as_mlx_lm_reads_it(hf, work / "hf-fused")
    shutil.rmtree(hf)
    mlx = work / "mlx-4bit"
    mlx_convert(str(fused), str(mlx), quantize=True, q_bits=4, q_group_size=64)
    shutil.rmtree(fused)
    store = convert(mlx, work / "store")
    print(f"built in {time.perf_counter() - t:.0f} s", flush=True)
    return mlx, store


FLASHMOE = """
import json, re, sys, time, torch, flashmoe
sys.path.insert(0, {root!r})
from benchmarks.common import timed_decode
model = flashmoe.load({store!r}, device="cpu")
ms = timed_decode(model, {prompt!r}, {tokens})
print(json.dumps({{"tps": {tokens} / ms * 1e3, "rss": int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024}}))
"""

MLX = """
import json, re, mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler
mx.set_default_device(mx.cpu)
model, tokenizer = load({mlx!r})
last = None
for n in (2, {tokens}):  # the first run warms up
    for last in stream_generate(model, tokenizer, {prompt!r}, max_tokens=n, sampler=make_sampler(temp=0.0)):
        pass
print(json.dumps({{"tps": last.generation_tps, "tokens": last.generation_tokens,
                   "rss": int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024}}))
"""


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vs-mlx"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not (args.work / "store" / "manifest.json").is_file():
        shutil.rmtree(args.work, ignore_errors=True)
        build(args.work, args.layers, args.experts)
    mlx, store = args.work / "mlx-4bit", args.work / "store"
    root = str(Path(__file__).resolve().parents[1])
    ours = run(FLASHMOE.format(root=root, store=str(store), prompt=PROMPT, tokens=args.tokens))
    theirs = run(MLX.format(mlx=str(mlx), prompt=PROMPT, tokens=args.tokens))
    size = sum(f.stat().st_size for f in mlx.glob("*.safetensors")) / 1e9
    rows = [f"| flashmoe | {ours['tps']:.1f} | {ours['rss'] / 1e9:.2f} | {ours['tps'] / theirs['tps']:.2f}x |",
            f"| mlx-lm (CPU) | {theirs['tps']:.1f} | {theirs['rss'] / 1e9:.2f} | 1.00x |"]
    q = json.loads((mlx / "config.json").read_text())["quantization"]
    overrides = sorted({f"{v['bits']}-bit {k.rsplit('.', 1)[-1]}" for k, v in q.items() if isinstance(v, dict)})
    machine = f"{os.cpu_count()} CPU cores"
    publish(section(
        "CPU decode vs mlx-lm, same MLX 4-bit checkpoint", machine,
        f"Qwen3.5-MoE at the 35B-A3B layer geometry, {args.layers} layers x {args.experts} experts, K=8, vocab 32768; "
        f"mlx-lm's converter made the checkpoint ({size:.2f} GB, {q['bits']}-bit group {q['group_size']}, "
        f"{', '.join(overrides)}); flashmoe "
        f"imported it as it is. {len(PROMPT)}-token prompt, {args.tokens} greedy tokens after warm-up, each engine in "
        "a process of its own (peak RSS: its VmHWM). A random model: eos can end mlx-lm's run early "
        f"(it decoded {theirs['tokens']}).",
        ["engine", "decode tok/s", "peak RSS GB", "vs mlx-lm"], rows), args.out)


if __name__ == "__main__":
    main()
