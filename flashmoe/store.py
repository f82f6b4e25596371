"""The flashmoe store on disk (docs/FORMAT.md): a manifest, resident tensors, one expert file per layer.

Every routed expert is one contiguous blob (gate+up, then down, with their scales and biases),
padded to BLOCK_BYTES so that fetching it is a single aligned read that O_DIRECT can serve.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .errors import FlashMoeError
from .quant import SCALE_DTYPE, QuantizedTensor

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
# safetensors' names of the float dtypes flashmoe converts; resident tensors keep theirs
SOURCE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
CHUNK_BYTES = 16 << 20  # checksums read files in pieces this big, so a resident shard never needs its size in RAM


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


def quantized_parts(name: str) -> tuple[str, str, str]:
    """A resident matrix kept quantized is three tensors, named as MLX names them: X.weight (here uint8 codes, packed
    as the experts' are), X.scales, X.biases."""
    base = name.removesuffix(".weight")
    return name, base + ".scales", base + ".biases"


def expert_file_name(layer: int) -> str:
    return f"experts/layer_{layer:03d}.bin"


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def file_crc32(path: Path, start: int = 0, size: int | None = None, progress=None) -> int:
    """CRC-32 of `size` bytes of a file from `start` (to its end when None), read a chunk at a time."""
    value, left = 0, size if size is not None else path.stat().st_size - start
    with open(path, "rb") as f:
        f.seek(start)
        while left > 0:
            chunk = f.read(min(left, CHUNK_BYTES))
            if not chunk:  # shorter than promised: the checksum then differs, as it should
                break
            value, left = zlib.crc32(chunk, value), left - len(chunk)
            if progress:
                progress(len(chunk))
    return value & 0xFFFFFFFF


# of a quantized store's scales (and biases): affine's; MXFP4's e8m0 exponents (scheme "mxfp4") and FP8's float32
# row-block scales (scheme "fp8") have no biases
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "e8m0": torch.uint8, "float32": torch.float32}
E8M0 = torch.uint8
UNBIASED = {torch.uint8: "mxfp4", torch.float32: "fp8"}  # scale dtype -> the scheme whose blobs have no biases


def scale_dtype_name(dtype: torch.dtype) -> str:
    return "e8m0" if dtype == E8M0 else dtype_name(dtype)


def scheme_of(bits: int | None, scale_dtype: torch.dtype) -> str | None:
    return None if bits is None else UNBIASED.get(scale_dtype, "affine")


def expert_layout(cfg: ModelConfig, bits: int | None, group_size: int | None, dtype: torch.dtype,
                  scale_dtype: torch.dtype = SCALE_DTYPE) -> BlobLayout:
    """The blob layout a config implies (docs/FORMAT.md, Expert blobs): conversion writes it, and a store whose
    manifest lists any other is damaged. `dtype` is the experts' source dtype, kept when unquantized; `scale_dtype`
    that of the scales and biases (float16 when flashmoe quantizes, bfloat16 as MLX checkpoints have them; e8m0:
    MXFP4, whose blobs hold codes and scales only)."""
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    tensors = {}
    for name, (rows, cols) in (("gate_up", (2 * inter, h)), ("down", (h, inter))):
        if bits is None:
            tensors[f"{name}.weight"] = torch.empty(rows, cols, dtype=dtype, device="meta")
            continue
        tensors[f"{name}.packed"] = torch.empty(rows, cols * bits // 8, dtype=torch.uint8, device="meta")
        tensors[f"{name}.scales"] = torch.empty(rows, cols // group_size, dtype=scale_dtype, device="meta")
        if scale_dtype not in UNBIASED:
            tensors[f"{name}.biases"] = torch.empty(rows, cols // group_size, dtype=scale_dtype, device="meta")
    if cfg.expert_bias:  # GPT-OSS: each projection's output bias, in float32 (a bf16 source's exactly)
        tensors["gate_up.bias"] = torch.empty(2 * inter, dtype=torch.float32, device="meta")
        tensors["down.bias"] = torch.empty(h, dtype=torch.float32, device="meta")
    return BlobLayout.for_tensors(tensors)


@dataclass
class ExpertLocation:
    path: Path
    offset: int
    size: int
    crc32: int


class Store:
    """Read side of a store: the manifest, resident tensors, and where each expert's blob lies."""

    def __init__(self, path: str | os.PathLike):
        from .manifest import read_manifest, validate_manifest  # manifest.py builds on this module's layout

        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        try:
            self.config, self.layout = validate_manifest(m, self.path)
        except (TypeError, KeyError, ValueError, AttributeError, IndexError) as exc:  # a shape no check foresaw
            raise FlashMoeError(f"corrupt store: {MANIFEST} has an unexpected shape ({exc!r}); "
                                "convert the checkpoint again") from None
        self.quantization: dict = m["quantization"]
        self.resident_crc32: dict[str, int] = m["resident"].get("crc32", {})  # absent in stores written before it
        self._layers = {int(k): v for k, v in m["experts"]["layers"].items()}

    @property
    def expert_blob_bytes(self) -> int:
        return self.layout.blob_bytes

    @property
    def expert_bytes(self) -> int:
        return sum(sum(e["sizes"]) for e in self._layers.values())

    @property
    def resident_bytes(self) -> int:
        return int(self.manifest["resident"]["bytes"])

    @property
    def verify_bytes(self) -> int:
        """What verify() reads: every expert blob and every resident file that has a checksum."""
        return self.expert_bytes + sum((self.path / name).stat().st_size for name in self.resident_crc32)

    def expert_location(self, layer: int, expert: int) -> ExpertLocation:
        entry = self._layers[layer]
        return ExpertLocation(self.path / entry["file"], entry["offsets"][expert], entry["sizes"][expert], entry["crc32"][expert])

    @property
    def resident_quantized(self) -> dict[str, dict[str, int]]:
        """Resident matrices kept quantized (MLX imports): name -> {bits, group_size}."""
        return self.manifest["resident"].get("quantized", {})

    def load_resident(self, dtype: torch.dtype, device: str = "cpu", float32: tuple[str, ...] = (),
                      device_of: Callable[[str], str | None] | None = None,
                      each: Callable[[str, torch.Tensor], object] | None = None) -> dict[str, object]:
        """All resident tensors, floats cast to `dtype` (those whose names end with one of `float32` to float32: values
        a bf16 rounding would change decisions with, like a router's bias); a matrix kept quantized is one
        QuantizedTensor (codes, scales and biases as stored). Names, shapes and dtypes were checked against the config
        when the store opened. device_of(name): where each tensor goes instead of `device` (a model over several
        devices); None leaves it unread (another process holds it). each(name, tensor): what to keep of each tensor
        (the codes kept quantized aside), called as it is read, in RAM: by default the tensor on its device. RAM
        then holds one float tensor at a time beside what `each` keeps (a GPU load quantizing its residents)."""
        where = device_of or (lambda name: device)
        each = each or (lambda key, t: t.to(where(key)))
        kept = {part for name in self.resident_quantized for part in quantized_parts(name)}
        tensors, parts = {}, {}
        for key, t in self._resident_reads(lambda key: where(key) is not None):
            if key in kept:
                parts[key] = t
                continue
            want = torch.float32 if key.endswith(float32) else dtype
            tensors[key] = each(key, t.to(want) if t.is_floating_point() else t)
        for name, q in self.resident_quantized.items():
            if where(name) is None:
                continue
            packed, scales, biases = (parts.pop(part).to(where(name)) for part in quantized_parts(name))
            tensors[name] = QuantizedTensor(packed, scales, biases, q["bits"], q["group_size"])
        return tensors

    def _resident_reads(self, wanted: Callable[[str], bool]):
        """(name, tensor) of each resident tensor `wanted` takes, read one at a time from the files."""
        for name in self.manifest["resident"]["files"]:
            try:
                with safe_open(str(self.path / name), "pt") as f:
                    for key in f.keys():
                        if wanted(key):
                            yield key, f.get_tensor(key)
            except Exception as exc:  # safetensors raises its own types for truncated files (the caller's errors
                # do not come here: they are raised in its frame, not at the yield)
                raise FlashMoeError(f"corrupt store: cannot read resident file {name}: {' '.join(str(exc).split())}") from None

    def verify(self, progress=None) -> list[str]:
        """Re-read every expert blob and every checksummed resident file; returns a list of problems (empty if
        clean). Stores written before resident checksums have none to check (resident_crc32 is empty)."""
        problems = []
        for layer, entry in sorted(self._layers.items()):
            for expert, (off, size, want) in enumerate(zip(entry["offsets"], entry["sizes"], entry["crc32"])):
                got = file_crc32(self.path / entry["file"], off, size, progress)
                if got != want:
                    problems.append(f"layer {layer} expert {expert}: checksum {got:08x}, manifest says {want:08x}")
        for name, want in self.resident_crc32.items():
            got = file_crc32(self.path / name, progress=progress)
            if got != want:
                problems.append(f"resident file {name}: checksum {got:08x}, manifest says {want:08x}")
        return problems
