"""The flashmoe store on disk (docs/FORMAT.md): a manifest, resident tensors, one expert file per layer.

Every routed expert is one contiguous blob (gate+up, then down, with their scales and biases),
padded to BLOCK_BYTES so that fetching it is a single aligned read that O_DIRECT can serve.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .errors import FlashMoeError

FORMAT_NAME = "flashmoe"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BLOCK_BYTES = 4096  # page / NVMe block: blobs and their offsets are multiples of this
SEGMENT_ALIGN = 64  # segments inside a blob start on cache-line boundaries

DTYPES = {
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class Segment:
    name: str  # e.g. "gate_up.packed", "down.scales", "gate_up.weight"
    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes from the blob's start
    nbytes: int


class BlobLayout:
    """Where each tensor of an expert sits inside its blob; the same for every expert of a store."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        end = max(s.offset + s.nbytes for s in segments)
        self.blob_bytes = round_up(end, BLOCK_BYTES)

    @classmethod
    def for_tensors(cls, tensors: dict[str, torch.Tensor]) -> "BlobLayout":
        segments, offset = [], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            segments.append(Segment(name, dtype_name(t.dtype), tuple(t.shape), offset, nbytes))
            offset = round_up(offset + nbytes, SEGMENT_ALIGN)
        return cls(segments)

    def pack(self, tensors: dict[str, torch.Tensor]) -> bytes:
        blob = bytearray(self.blob_bytes)
        for s in self.segments:
            t = tensors[s.name].contiguous()
            if tuple(t.shape) != s.shape or dtype_name(t.dtype) != s.dtype:
                raise ValueError(f"{s.name}: {tuple(t.shape)} {t.dtype} does not match layout {s.shape} {s.dtype}")
            blob[s.offset : s.offset + s.nbytes] = t.view(torch.uint8).numpy().tobytes()
        return bytes(blob)

    def unpack(self, blob: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into a uint8 blob tensor (no copy)."""
        out = {}
        for s in self.segments:
            raw = blob[s.offset : s.offset + s.nbytes]
            out[s.name] = raw.view(DTYPES[s.dtype]).view(s.shape)
        return out

    def to_json(self) -> list[dict]:
        return [dict(name=s.name, dtype=s.dtype, shape=list(s.shape), offset=s.offset, nbytes=s.nbytes) for s in self.segments]

    @classmethod
    def from_json(cls, data: list[dict]) -> "BlobLayout":
        return cls([Segment(d["name"], d["dtype"], tuple(d["shape"]), d["offset"], d["nbytes"]) for d in data])


def expert_file_name(layer: int) -> str:
    return f"experts/layer_{layer:03d}.bin"


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass
class ExpertLocation:
    path: Path
    offset: int
    size: int
    crc32: int


class Store:
    """Read side of a store: the manifest, resident tensors, and where each expert's blob lies."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = self._read_manifest()
        m = self.manifest
        self.config = ModelConfig.from_dict(m["config"])
        self.quantization: dict = m["quantization"]
        self.layout = BlobLayout.from_json(m["experts"]["segments"])
        self._layers = {int(k): v for k, v in m["experts"]["layers"].items()}
        self._check_files()

    def _read_manifest(self) -> dict:
        if not self.path.exists():
            raise FlashMoeError(f"store {self.path} does not exist")
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = " (an interrupted conversion: run flashmoe convert again to resume)" if (self.path / "convert-state.json").exists() else ""
            raise FlashMoeError(f"{self.path} is not a complete flashmoe store: no {MANIFEST}{hint}")
        try:
            m = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise FlashMoeError(f"corrupt store: {manifest_path} is not valid JSON ({exc})") from None
        if m.get("format") != FORMAT_NAME:
            raise FlashMoeError(f"{manifest_path} is not a flashmoe manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise FlashMoeError(
                f"store format version {m.get('format_version')} is not supported by this flashmoe "
                f"(it reads version {FORMAT_VERSION}); convert the checkpoint again"
            )
        if not m.get("complete"):
            raise FlashMoeError(f"{self.path} is incomplete: run flashmoe convert again to resume")
        return m

    def _check_files(self) -> None:
        for name in self.manifest["resident"]["files"]:
            if not (self.path / name).is_file():
                raise FlashMoeError(f"corrupt store: resident file {name} is missing from {self.path}")
        for layer, entry in self._layers.items():
            f = self.path / entry["file"]
            if not f.is_file():
                raise FlashMoeError(f"corrupt store: expert file {entry['file']} (layer {layer}) is missing")
            need = max(o + s for o, s in zip(entry["offsets"], entry["sizes"]))
            if f.stat().st_size < need:
                raise FlashMoeError(
                    f"corrupt store: {entry['file']} is {f.stat().st_size} bytes but layer {layer}'s experts need {need}"
                )

    @property
    def expert_blob_bytes(self) -> int:
        return self.layout.blob_bytes

    @property
    def expert_bytes(self) -> int:
        return sum(sum(e["sizes"]) for e in self._layers.values())

    @property
    def resident_bytes(self) -> int:
        return int(self.manifest["resident"]["bytes"])

    def expert_location(self, layer: int, expert: int) -> ExpertLocation:
        entry = self._layers[layer]
        return ExpertLocation(self.path / entry["file"], entry["offsets"][expert], entry["sizes"][expert], entry["crc32"][expert])

    def load_resident(self, dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
        """All resident tensors, cast to `dtype` (integer tensors keep theirs)."""
        tensors = {}
        for name in self.manifest["resident"]["files"]:
            try:
                with safe_open(str(self.path / name), "pt") as f:
                    for key in f.keys():
                        t = f.get_tensor(key)
                        tensors[key] = (t.to(dtype) if t.is_floating_point() else t).to(device)
            except Exception as exc:  # safetensors raises its own types for truncated headers
                raise FlashMoeError(f"corrupt store: cannot read resident file {name}: {exc}") from None
        return tensors

    def verify(self, progress=None) -> list[str]:
        """Re-read every expert blob and compare checksums; returns a list of problems (empty if clean)."""
        problems = []
        for layer, entry in sorted(self._layers.items()):
            with open(self.path / entry["file"], "rb") as f:
                for expert, (off, size, want) in enumerate(zip(entry["offsets"], entry["sizes"], entry["crc32"])):
                    f.seek(off)
                    got = crc32(f.read(size))
                    if got != want:
                        problems.append(f"layer {layer} expert {expert}: checksum {got:08x}, manifest says {want:08x}")
                    if progress:
                        progress(size)
        return problems
