"""What the benchmark scripts share: the timed decode loop and how a result is published."""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import torch

from flashmoe.synthetic import (DEEPSEEK_V3, GLM4_5_AIR, GPT_OSS_120B, MIXTRAL_8X7B, QWEN3_235B, QWEN3_5_35B,
                                QWEN3_5_397B)

# real models' geometries for random stores: name -> (config.json, K, the real model's layer count, its name)
GEOMETRIES = {
    "397b": (QWEN3_5_397B, 4, 60, "Qwen3.5-397B-A17B"),  # K=4: Flash-MoE's measured sweet spot for this model
    "35b": (QWEN3_5_35B, 8, 40, "Qwen3.5-35B-A3B"),
    "qwen3-235b": (QWEN3_235B, 8, 94, "Qwen3-235B-A22B"),
    "mixtral-8x7b": (MIXTRAL_8X7B, 2, 32, "Mixtral-8x7B"),
    "glm-4.5-air": (GLM4_5_AIR, 8, 46, "GLM-4.5-Air"),
    "deepseek-v3": (DEEPSEEK_V3, 8, 61, "DeepSeek-V3"),
    "gpt-oss-120b": (GPT_OSS_120B, 4, 36, "gpt-oss-120b"),
}


def timed_decode(model, prompt: list[int], tokens: int, warm_steps: int = 2, on_start=None) -> float:
    """Milliseconds for `tokens` greedy decode steps of a fresh sequence, after prefilling `prompt` and
    `warm_steps` untimed steps (on a GPU the first compiles kernels eagerly, the second captures the CUDA
    graphs); the model's stats are reset before the timed steps, so they describe those alone. on_start() is
    called just before the timed steps (to start other counters there)."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    state = model.new_state()
    logits = model.forward(prompt, state, all_logits=False)
    for _ in range(warm_steps):
        logits = model.forward([int(logits[-1].argmax())], state, all_logits=False)
    model.reset_stats()
    sync()
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = model.forward([int(logits[-1].argmax())], state, all_logits=False)
    sync()
    return (time.perf_counter() - t0) * 1e3


def hbm_read_gbps() -> float:
    """A reduction over 4 GB: bytes read per second, what a matrix-vector product can approach."""
    a = torch.ones(1 << 30, dtype=torch.float32, device="cuda")
    a.sum()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a.sum()
    end.record()
    end.synchronize()
    return 10 * a.numel() * 4 / (start.elapsed_time(end) / 1e3) / 1e9


def section(title: str, machine: str, description: str, columns: list[str], rows: list[str]) -> str:
    """A dated results section: the command that ran (this process's), on which machine, what it measured, a table."""
    command = "python " + " ".join(sys.argv)
    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n" + "\n".join(rows)
    return f"\n### {title} ({datetime.date.today()})\n\n`{command}` on {machine}. {description}\n\n{table}\n"


def publish(text: str, out: Path | None) -> None:
    """Print a result section and append it to the markdown file `out`, if given."""
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text)
