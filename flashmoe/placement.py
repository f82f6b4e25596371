"""Which device runs which layers, when a model spans several GPUs: contiguous blocks of layers, one per device.

At one token per step a layer's experts and its attention run back to back, so a device holds whole layers: their
resident weights, caches and a VRAM expert cache of their experts. The hidden state (a few KB) then crosses to the
next device once per block per token, instead of twice per layer as it would with each layer's experts scattered
over the GPUs and summed on one (llama.cpp's default `--split-mode layer` makes the same choice). Blocks are sized
so each device's share of the weights follows what it has free; one RAM tier and one I/O pool serve every device's
VRAM tier (experts.ExpertFetcher(host=...)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import FlashMoeError

LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")
EMBEDDING = "model.embed_tokens."


@dataclass(frozen=True)
class Block:
    device: torch.device
    layers: range


def parse_devices(devices: str | list[str]) -> list[torch.device]:
    """'cuda:0,cuda:1' (or a list) -> devices, each named once; one line naming the problem otherwise."""
    names = [d.strip() for d in devices.split(",")] if isinstance(devices, str) else list(devices)
    for name in names:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
            raise FlashMoeError(f"devices must be a comma-separated list like cuda:0,cuda:1, not {devices!r}")
    out = [torch.device(n) for n in names]
    if not out:
        raise FlashMoeError("devices is empty; name at least one, like cuda:0")
    if len({d.type for d in out}) > 1:
        raise FlashMoeError(f"devices mixes the CPU and GPUs ({devices!r}); name GPUs only, or cpu alone")
    gpus = [d for d in out if d.type == "cuda"]
    if len(set(gpus)) < len(gpus):
        raise FlashMoeError(f"a GPU is named twice in {devices!r}")
    return out


def split_layers(layer_bytes: list[int], capacity: list[float], first_bytes: int = 0, last_bytes: int = 0
                 ) -> list[range]:
    """Contiguous blocks of layers, one per device, so that each device's bytes (its layers', plus `first_bytes` on the
    first device and `last_bytes` on the last: the embedding and the head) follow `capacity`; no block is empty."""
    n, total_layers = len(capacity), len(layer_bytes)
    if n > total_layers:
        raise FlashMoeError(f"{n} devices for a model of {total_layers} layers; name at most {total_layers}")
    total = first_bytes + sum(layer_bytes) + last_bytes
    before = [first_bytes]  # bytes on the devices before layer j, if j starts a block
    for b in layer_bytes:
        before.append(before[-1] + b)
    starts, share = [0], 0.0
    for i in range(n - 1):
        share += capacity[i] / sum(capacity)
        lo, hi = starts[-1] + 1, total_layers - (n - 1 - i)  # at least one layer each, before and after
        starts.append(min(range(lo, hi + 1), key=lambda j: abs(before[j] - share * total)))
    starts.append(total_layers)
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def plan(cfg: ModelConfig, devices: list[torch.device], expert_blob_bytes: int, resident_bytes: int,
         capacity: list[float]) -> list[Block]:
    """The blocks for `devices`: per layer its experts' bytes and an even share of the resident weights that are not the
    embedding or the head."""
    dtype_bytes = 2  # the embedding and head in bf16: their share of the residents, for balancing only
    table = cfg.vocab_size * cfg.hidden_size * dtype_bytes
    per_layer = max(0, resident_bytes - 2 * table) // cfg.num_hidden_layers
    layer_bytes = [per_layer + (cfg.num_experts * expert_blob_bytes if cfg.is_moe_layer(i) else 0)
                   for i in range(cfg.num_hidden_layers)]
    ranges = split_layers(layer_bytes, capacity, table, table)
    return [Block(d, r) for d, r in zip(devices, ranges)]


def block_of(name: str, blocks: list[Block]) -> int:
    """Which block holds a resident tensor: its layer's; the embedding goes with the first, the rest (final norm,
    head) with the last."""
    m = LAYER_NAME.match(name)
    if m is not None:
        layer = int(m[1])
        return next(i for i, b in enumerate(blocks) if layer in b.layers)
    return 0 if name.startswith(EMBEDDING) else len(blocks) - 1
