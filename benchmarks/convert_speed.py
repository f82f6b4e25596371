"""Convert throughput and peak memory of each source format at the Qwen3.5-397B-A17B expert geometry (hidden 4096,
expert intermediate 1024): the same random weights written as a bf16 release (fused experts), an FP8 block-scaled
one (blocks of 128), a compressed-tensors INT4 one (Kimi's layout: per-expert Linears, symmetric group 32), an
mlx-lm 4-bit one (switch_mlp, group 64) and, when llama.cpp's source is given, the GGUF its own converter writes
(Q8_0). Each conversion runs in its own process: wall time, source and store bytes, and that process's peak RSS.

usage: python convert_speed.py [--experts 128] [--layers 2] [--work DIR] [--llama-cpp DIR] [--out RESULTS.md]
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

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import publish, section  # noqa: E402
from flashmoe.models.qwen3_next import resident_shapes  # noqa: E402
from flashmoe.config import ModelConfig  # noqa: E402
from flashmoe.tiny import build_tokenizer, tiny_config  # noqa: E402

HIDDEN, INTER = 4096, 1024


def config(experts: int, layers: int) -> dict:
    types = ["linear_attention"] * (layers - 1) + ["full_attention"]
    c = tiny_config("qwen3_5_moe", hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=experts,
                    num_experts_per_tok=10, num_hidden_layers=layers, layer_types=types, vocab_size=8192,
                    shared_expert_intermediate_size=INTER, num_attention_heads=32, num_key_value_heads=2,
                    head_dim=256, linear_num_key_heads=16, linear_num_value_heads=64, linear_key_head_dim=128,
                    linear_value_head_dim=128)
    raw = c.to_dict()
    raw["architectures"] = ["Qwen3_5MoeForCausalLM"]
    return raw


def residents(raw: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
            for n, s in resident_shapes(ModelConfig.from_hf(raw)).items()}


def experts(layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, H], down [H, I]) of one expert, bf16, reproducible."""
    g = torch.Generator().manual_seed(1000 * layer + e)
    return ((torch.randn(2 * INTER, HIDDEN, generator=g) * 0.02).to(torch.bfloat16),
            (torch.randn(HIDDEN, INTER, generator=g) * 0.02).to(torch.bfloat16))


def folder(root: Path, raw: dict) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(raw))
    build_tokenizer(raw["vocab_size"]).save_pretrained(root)
    return root


def write_bf16(root: Path, raw: dict) -> Path:
    d = folder(root, raw)
    save_file(residents(raw), str(d / "model-residents.safetensors"), metadata={"format": "pt"})
    for layer in range(raw["num_hidden_layers"]):
        pairs = [experts(layer, e) for e in range(raw["num_experts"])]
        p = f"model.layers.{layer}.mlp.experts."
        save_file({p + "gate_up_proj": torch.stack([a for a, _ in pairs]), p + "down_proj": torch.stack([b for _, b in pairs])},
                  str(d / f"model-layer{layer}.safetensors"), metadata={"format": "pt"})
    return d


def fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    *lead, r, c = w.shape
    b = w.float().reshape(*lead, r // block, block, c // block, block)
    scale = (b.abs().amax(dim=(-3, -1)) / 448).clamp(min=1e-12)
    codes = (b / scale[..., :, None, :, None]).to(torch.float8_e4m3fn).reshape(w.shape)
    return codes, scale


def write_fp8(root: Path, raw: dict) -> Path:
    raw = dict(raw, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]})
    d = folder(root, raw)
    save_file(residents(raw), str(d / "model-residents.safetensors"), metadata={"format": "pt"})
    for layer in range(raw["num_hidden_layers"]):
        p, out = f"model.layers.{layer}.mlp.experts.", {}
        pairs = [experts(layer, e) for e in range(raw["num_experts"])]
        for name, w in (("gate_up_proj", torch.stack([a for a, _ in pairs])), ("down_proj", torch.stack([b for _, b in pairs]))):
            out[p + name], out[p + name + "_scale_inv"] = fp8_blocks(w)
        save_file(out, str(d / f"model-layer{layer}.safetensors"), metadata={"format": "pt"})
    return d


def int4_symmetric(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' pack-quantized INT4: codes + 8 packed little end first into int32, bf16 scales."""
    g = w.float().reshape(w.shape[0], -1, group)
    scale = (g.abs().amax(-1) / 7.5).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.clamp(torch.round(g / scale.float().unsqueeze(-1)), -8, 7).to(torch.int32) + 8
    q = q.reshape(w.shape[0], -1, 8) << (torch.arange(8, dtype=torch.int32) * 4)
    return q.sum(-1, dtype=torch.int32), scale


def write_int4(root: Path, raw: dict) -> Path:
    group = {"targets": ["re:.*mlp\\.experts\\..*"], "input_activations": None, "output_activations": None,
             "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}
    raw = dict(raw, quantization_config={"quant_method": "compressed-tensors", "format": "pack-quantized",
                                          "config_groups": {"group_0": group}, "ignore": ["lm_head"]})
    d = folder(root, raw)
    save_file(residents(raw), str(d / "model-residents.safetensors"), metadata={"format": "pt"})
    for layer in range(raw["num_hidden_layers"]):
        out = {}
        for e in range(raw["num_experts"]):
            gate_up, down = experts(layer, e)
            for name, w in (("gate_proj", gate_up[:INTER]), ("up_proj", gate_up[INTER:]), ("down_proj", down)):
                p = f"model.layers.{layer}.mlp.experts.{e}.{name}."
                out[p + "weight_packed"], out[p + "weight_scale"] = int4_symmetric(w)
                out[p + "weight_shape"] = torch.tensor(list(w.shape))
        save_file(out, str(d / f"model-layer{layer}.safetensors"), metadata={"format": "pt"})
    return d


def affine4(w: torch.Tensor, group: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlx's affine 4-bit: uint32 words of eight codes (little end first), bf16 scales and biases."""
    from flashmoe.quant import quantize

    q = quantize(w, 4, group)
    return q.packed.view(torch.int32), q.scales.to(torch.bfloat16), q.biases.to(torch.bfloat16)


def write_mlx(root: Path, raw: dict) -> Path:
    raw = dict(raw, quantization={"group_size": 64, "bits": 4, "mode": "affine"})
    d = folder(root, raw)
    res = residents(raw)
    for n in [n for n in res if n.endswith("conv1d.weight")]:  # mlx-lm's conv1d layout [C, K, 1]
        res[n] = res[n].transpose(1, 2).contiguous()
    save_file(res, str(d / "model-residents.safetensors"), metadata={"format": "mlx"})
    for layer in range(raw["num_hidden_layers"]):
        parts = {k: [] for k in ("gate_proj", "up_proj", "down_proj")}
        for e in range(raw["num_experts"]):
            gate_up, down = experts(layer, e)
            for name, w in (("gate_proj", gate_up[:INTER]), ("up_proj", gate_up[INTER:]), ("down_proj", down)):
                parts[name].append(affine4(w))
        out = {}
        for name, qs in parts.items():
            p = f"language_model.model.layers.{layer}.mlp.switch_mlp.{name}."
            out[p + "weight"] = torch.stack([q[0] for q in qs]).view(torch.uint32) if hasattr(torch, "uint32") \
                else torch.stack([q[0] for q in qs])
            out[p + "scales"], out[p + "biases"] = torch.stack([q[1] for q in qs]), torch.stack([q[2] for q in qs])
        save_file(out, str(d / f"model-layer{layer}.safetensors"), metadata={"format": "mlx"})
    return d


def write_gguf(root: Path, bf16: Path, llama: Path) -> Path:
    root.mkdir(parents=True)
    out = root / "model-q8_0.gguf"  # returns the folder, like the other writers
    tool = Path(__file__).resolve().parents[1] / "tests" / "tools" / "llama_convert.py"
    subprocess.run([sys.executable, str(tool), str(llama), str(bf16), str(out), "q8_0"], check=True,
                   stdout=subprocess.DEVNULL)
    return root


MEASURE = """
import re, threading, time
import flashmoe.convert as c
peak = [0]

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024

def sample():  # anonymous memory (what the conversion holds), apart from the mapped source pages VmHWM counts
    while True:
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
c.convert({src!r}, {dst!r})
print(time.perf_counter() - t, status("VmHWM"), max(peak[0], status("RssAnon")))
"""


def measure(src: Path, dst: Path) -> tuple[float, int, int]:
    """(seconds, peak RSS, peak anonymous RSS) of `flashmoe.convert(src, dst)` in a process of its own. The peak RSS
    is that process's VmHWM (a forked child's ru_maxrss would start from this process's size); it counts the source
    pages a mapped reader touched, which the page cache can take back, so the anonymous peak is sampled too."""
    out = subprocess.run([sys.executable, "-c", MEASURE.format(src=str(src), dst=str(dst))], stdout=subprocess.PIPE,
                         text=True, check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])))
    seconds, hwm, anon = out.stdout.split()[-3:]
    return float(seconds), int(hwm), int(anon)


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/convert-speed"))
    ap.add_argument("--llama-cpp", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    raw = config(args.experts, args.layers)
    writers = {"bf16 safetensors": ("bf16", write_bf16), "FP8 block 128": ("fp8", write_fp8),
               "compressed-tensors INT4 g32": ("int4", write_int4), "MLX 4-bit g64": ("mlx", write_mlx)}
    if args.llama_cpp:
        writers["GGUF Q8_0 (llama.cpp's converter)"] = (
            "gguf", lambda d, raw: write_gguf(d, args.work / "bf16", args.llama_cpp))
    made = args.work / "sources.json"  # sources written by an earlier run with the same geometry are reused
    if not (made.is_file() and json.loads(made.read_text()) == [args.experts, args.layers]):
        shutil.rmtree(args.work, ignore_errors=True)
        t = time.perf_counter()
        for name, (sub, write) in writers.items():
            write(args.work / sub, raw)
        made.write_text(json.dumps([args.experts, args.layers]))
        print(f"sources written in {time.perf_counter() - t:.0f} s", flush=True)
    sources = {name: args.work / sub / ("model-q8_0.gguf" if sub == "gguf" else "") for name, (sub, _) in writers.items()}
    rows = []
    for name, src in sources.items():
        dst = args.work / ("store-" + src.name)
        seconds, rss, anon = measure(src, dst)
        manifest = json.loads((dst / "manifest.json").read_text())
        made = f"{manifest['quantization']['bits']}-bit g{manifest['quantization']['group_size']}, " \
               f"{manifest['source'].get('experts', 'quantized')}"
        rows.append(f"| {name} | {size(src) / 1e9:.2f} | {made} | {size(dst) / 1e9:.2f} | {seconds:.1f} | "
                    f"{size(src) / seconds / 1e9:.2f} | {raw['num_experts'] * args.layers / seconds:.0f} | "
                    f"{rss / 1e9:.2f} | {anon / 1e9:.2f} |")
        print(rows[-1], flush=True)
        shutil.rmtree(dst)
    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    publish(section(
        "Convert throughput by source format, 397B expert geometry", machine,
        f"{args.layers} MoE layers x {args.experts} experts of hidden {HIDDEN} x expert intermediate {INTER} (the "
        "Qwen3.5-397B-A17B expert), small residents; one process per conversion, sources in the page cache (just "
        "written). GB/s counts source bytes; peak RSS is the converting process's VmHWM, which includes the source pages "
        "a mapped (safetensors) reader touched; peak anonymous is its sampled RssAnon, the memory it holds.",
        ["source", "source GB", "store experts", "store GB", "seconds", "source GB/s", "experts/s", "peak RSS GB",
         "peak anonymous GB"],
        rows), args.out)


if __name__ == "__main__":
    main()
