"""mlx-lm checkpoints (mlx-community's `*-4bit`, `*-8bit`, ...) read as the Hugging Face checkpoint they came from.

mlx-lm's `convert` quantizes every Linear and the embedding group-wise affine (w = q * scale + bias, bf16 scales and
biases, codes packed into uint32 little end first: for 2, 4 and 8 bits the bytes are exactly flashmoe's packing), with
per-module overrides in config.json's `quantization` (the routers at 8 bits). Its models' `sanitize()` also changed
the layout; each change is undone here or by the family (`models/<family>.py: from_mlx`):
  - the multimodal wrapper's `language_model.model.` / `language_model.lm_head.` prefixes    -> `model.` / `lm_head.`
  - routed experts stacked as `<mlp>.switch_mlp.{gate,up,down}_proj` [E, ...]                -> read one expert at a time
  - quantized `X.weight` (uint32) + `X.scales` + `X.biases`                                  -> one quantized `X.weight`
  - family layout (Qwen3.5 / Qwen3-Next: conv1d as [C, K, 1], zero-centred norms stored as 1 + w) -> `from_mlx`
Quantized tensors are handed over as they are (QuantizedTensor: uint8 codes, the source's scales), so experts and
resident matrices are repacked, never requantized; `get` dequantizes for what must be float.
mlx-lm's `mxfp4` mode (mlx-community's `-MXFP4` checkpoints) packs OCP MXFP4 as flashmoe's mxfp4 scheme holds it
(e2m1 codes low nibble first, a uint8 e8m0 exponent per 32, no biases): its experts are repacked into mxfp4 blobs,
its resident matrices dequantized (MXFP4 runs in the expert kernels only), its affine overrides (the routers at 8
bits) read as affine. Its `mxfp8` mode (e4m3 codes, four to a uint32 word little end first, a uint8 e8m0 exponent per
32, no biases) is the store's fp8 scheme at group 32: the codes kept byte for byte, each exponent as the float32
scale 2^(e - 127) it stands for (exact). nvfp4 (e4m3 scales per 16) has no scheme in the store: refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from .. import fp8block, mxfp4
from ..errors import FlashMoeError
from ..quant import SUPPORTED_BITS, QuantizedTensor, blob_tensors, dequantize, unpack_codes
from ..store import SOURCE_DTYPES
from .hf import FLOAT_DTYPES, TensorInfo
from .shards import Remote, Shards

PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))
LEFT_OUT_PREFIXES = {"vision_tower.": "vision tower", "model.visual.": "vision tower",
                     "language_model.vision_tower.": "vision tower", "mtp.": "multi-token-prediction head"}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # switch_mlp's, whatever the family calls its experts'
MODES = ("affine", "mxfp4", "mxfp8")  # mlx-lm's quantization modes read here (its nvfp4 is not)
MX_GROUP = 32  # the mx modes' elements per e8m0 exponent


def switch_mlp_prefix(expert_prefix: str) -> str:
    """Where mlx-lm's sanitize() stacks a layer's experts: `switch_mlp.` beside the checkpoint's `experts.`"""
    if not expert_prefix.endswith("experts."):
        raise FlashMoeError(f"no mlx-lm layout known for experts under {expert_prefix!r}")
    return expert_prefix[: -len("experts.")] + "switch_mlp."
REPACKED_BITS = SUPPORTED_BITS  # widths whose MLX bytes are flashmoe's packing; others are dequantized


def mlx_quantization(raw: dict) -> dict | None:
    """config.json's MLX quantization block, or None for a checkpoint mlx-lm did not quantize. HF quantization configs
    (FP8, compressed-tensors, ...) carry a quant_method; MLX's do not."""
    q = raw.get("quantization", raw.get("quantization_config"))
    if isinstance(q, dict) and "quant_method" not in q and "bits" in q and "group_size" in q:
        return q
    return None


def is_mlx_checkpoint(folder: Path, raw: dict, remote: Remote | None = None) -> bool:
    if mlx_quantization(raw) is not None:
        return True
    if remote is not None:
        return remote.metadata(remote.files[0]).get("format") == "mlx"
    return _metadata_format(folder) == "mlx"


def _metadata_format(folder: Path) -> str | None:
    for file in sorted(folder.glob("*.safetensors"))[:1]:
        try:
            with safe_open(str(file), "pt") as f:
                return (f.metadata() or {}).get("format")
        except Exception:  # the HF reader names a damaged file
            return None
    return None


def canonical_name(key: str) -> str:
    for prefix, replacement in PREFIXES:
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return key.removeprefix("language_model.")


def dequantize_any(q: QuantizedTensor, cols: int, dtype: torch.dtype = torch.float32, chunk_rows: int = 1024
                   ) -> torch.Tensor:
    """Dense [rows, cols] of a QuantizedTensor of any MLX width; odd widths a slice of rows at a time (their bit
    stream is 8 bytes a bit: a 248k-row embedding at once would take 6 GB)."""
    if q.biases is None and q.bits == 8:  # mxfp8 as the fp8 scheme: e4m3 codes, float32 scales per group
        return fp8block.dequantize(q.packed, q.scales, dtype)
    if q.biases is None:  # mxfp4
        return mxfp4.dequantize(q.packed, q.scales, dtype)
    if q.bits in REPACKED_BITS:
        return dequantize(q, dtype)
    out = torch.empty(q.packed.shape[0], cols, dtype=dtype)
    for r in range(0, q.packed.shape[0], chunk_rows):
        rows = slice(r, r + chunk_rows)
        codes = unpack_codes(q.packed[rows], q.bits, cols).to(dtype).reshape(-1, cols // q.group_size, q.group_size)
        w = codes * q.scales[rows].to(dtype).unsqueeze(-1) + q.biases[rows].to(dtype).unsqueeze(-1)
        out[rows] = w.reshape(-1, cols)
    return out


class MlxCheckpoint:
    """The tensors of an MLX checkpoint under the HF checkpoint's names. A quantized matrix's info has the float shape
    it stands for (so config checks read as for HF), `quant(name)` its (bits, group_size), `get_quantized(name)` its
    codes; routed experts are `expert(layer, e)` (MlxExpertSource reads them)."""

    def __init__(self, folder: Path, raw_config: dict, from_mlx: Callable[[str, torch.Tensor], torch.Tensor],
                 remote: Remote | None = None):
        self.folder, self.from_mlx = folder, from_mlx
        self.shards = Shards(folder, remote)
        q = mlx_quantization(raw_config) or {}
        self.default_mode = q.get("mode", "affine")
        if self.default_mode not in MODES:
            raise FlashMoeError(f"{folder}: MLX quantization mode {self.default_mode!r} is not supported yet "
                                f"(flashmoe imports {' and '.join(map(repr, MODES))}); convert the original checkpoint "
                                "instead")
        self.default_quant = (q["bits"], q["group_size"]) if q else None
        self.overrides = {path: v for path, v in q.items() if isinstance(v, (dict, bool))}
        self.tensors: dict[str, TensorInfo] = {}
        self.quantized: dict[str, tuple[int, int]] = {}  # HF name -> (bits, group_size)
        self.mxfp8: set[str] = set()  # HF names in mlx-lm's mxfp8 mode
        self.left_out: dict[str, list[int]] = {}
        self._parts: dict[str, dict[str, TensorInfo]] = {}  # HF name -> {"weight"|"scales"|"biases": raw tensor}
        raw = {}
        for file in self.shards.files:
            raw.update(self._index(file))
        self._assemble(raw)

    def _index(self, file: Path) -> dict[str, TensorInfo]:
        out = {}
        for key, dtype, shape in self.shards.entries(file):
            info = TensorInfo(file, key, dtype, shape)
            left_out = next((what for p, what in LEFT_OUT_PREFIXES.items() if key.startswith(p)), None)
            if left_out:
                count = self.left_out.setdefault(left_out, [0, 0])
                count[0], count[1] = count[0] + 1, count[1] + info.nbytes
                continue
            out[key] = info
        return out

    def _quant_of(self, key: str) -> tuple[int, int, str]:
        """(bits, group_size, mode) of the module whose weight is `key`, from its override (mlx-lm writes none of
        mode for an affine one inside an mxfp4 model) or the default."""
        module = key.removesuffix(".weight")
        override = self.overrides.get(module)
        if isinstance(override, dict):
            mode = override.get("mode", "affine")
            if mode not in MODES:
                raise FlashMoeError(f"{self.folder}: module {module} is quantized in MLX mode {mode!r}, which flashmoe "
                                    "does not read; convert the original checkpoint instead")
            return override["bits"], override["group_size"], mode
        if self.default_quant is None:
            raise FlashMoeError(f"{self.folder}: tensor {key} is quantized but config.json has no 'quantization' block")
        return (*self.default_quant, self.default_mode)

    def _assemble(self, raw: dict[str, TensorInfo]) -> None:
        for key, info in raw.items():
            if key.endswith((".scales", ".biases")):
                continue
            base = key.removesuffix(".weight")
            scales, biases = raw.get(base + ".scales"), raw.get(base + ".biases")
            name = canonical_name(key)
            if scales is None:
                if info.dtype not in FLOAT_DTYPES:
                    raise FlashMoeError(f"tensor {key} in {info.file.name} is {info.dtype} without scales: not an MLX "
                                        "tensor flashmoe can read")
                hf_shape = tuple(self.from_mlx(name, torch.empty(info.shape, device="meta")).shape)
                self.tensors[name] = TensorInfo(info.file, key, info.dtype, hf_shape)
                continue
            bits, group_size, mode = self._quant_of(key)
            if mode != "affine":
                width = 4 if mode == "mxfp4" else 8
                if (bits, group_size) != (width, MX_GROUP) or scales.dtype != "U8" or biases is not None:
                    raise FlashMoeError(f"tensor {key} in {info.file.name}: MLX {mode} is {width} bits in groups of 32 "
                                        f"with uint8 scales and no biases; this one is {bits} bits, group {group_size}, "
                                        f"{scales.dtype} scales{' and biases' if biases is not None else ''}: "
                                        "config.json's quantization does not match the file")
                if mode == "mxfp8":
                    self.mxfp8.add(name)
            elif biases is None or info.dtype != "U32":
                raise FlashMoeError(f"tensor {key} in {info.file.name} has scales but is {info.dtype}"
                                    f"{' and has no biases' if biases is None else ''}: only MLX affine "
                                    "quantization (uint32 codes, scales, biases) and mxfp4 are supported")
            cols = info.shape[-1] * 32 // bits
            if scales.shape[-1] * group_size != cols or (biases is not None and scales.shape != biases.shape):
                raise FlashMoeError(f"tensor {key}: {info.shape[-1]} uint32 words at {bits} bits hold {cols} weights, "
                                    f"but its scales {list(scales.shape)} at group size {group_size} cover "
                                    f"{scales.shape[-1] * group_size}: config.json's quantization does not match the file")
            stored = sum(t.nbytes for t in (info, scales, biases) if t is not None)
            # the float it stands for: an affine tensor's scales' dtype; the mx modes' (uint8 exponents) in bf16
            dtype = scales.dtype if mode == "affine" else "BF16"
            self.tensors[name] = TensorInfo(info.file, key, dtype, (*info.shape[:-1], cols), stored)
            self.quantized[name] = (bits, group_size)
            self._parts[name] = {"weight": info, "scales": scales, **({"biases": biases} if biases is not None else {})}

    # ---- the Checkpoint interface ----------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def quant(self, name: str) -> tuple[int, int] | None:
        return self.quantized.get(name)

    def _read(self, info: TensorInfo, index: int | None = None) -> torch.Tensor:
        return self.shards.read(info.file, info.source_name, index)

    def files_of(self, name: str) -> set[Path]:
        return {t.file for t in self._parts.get(name, {"weight": self.tensors[name]}).values()}

    def scale_dtype_of(self, name: str) -> torch.dtype:
        """bf16 or fp16 (affine), uint8 (mxfp4's exponents: the store's mxfp4 scheme, store.UNBIASED), float32
        (mxfp8's exponents as the scales they stand for: the store's fp8 scheme)."""
        if name in self.mxfp8:
            return torch.float32
        dtype = self._parts[name]["scales"].dtype
        return torch.uint8 if dtype == "U8" else SOURCE_DTYPES[dtype]

    def get_quantized(self, name: str, index: int | None = None) -> QuantizedTensor:
        """A quantized matrix (or row `index` of a stacked one) as uint8 codes in MLX's packing, scales, biases (None:
        mxfp4)."""
        parts = self._parts[name]
        bits, group_size = self.quantized[name]
        words, scales = (self._read(parts[k], index) for k in ("weight", "scales"))
        biases = self._read(parts["biases"], index) if "biases" in parts else None
        packed = words.contiguous().view(torch.uint8).reshape(*words.shape[:-1], -1)
        if name in self.mxfp8:  # e8m0 exponents -> the float32 scales they stand for (2^-127 .. 2^127: exact)
            scales = mxfp4.scale_values(scales)
        return QuantizedTensor(packed, scales, biases, bits, group_size)

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor as the HF checkpoint holds it: quantized matrices dequantized (bf16), the family's layout."""
        info = self.tensors[name]
        if name in self.quantized:
            q = self.get_quantized(name, index)
            return dequantize_any(q, info.shape[-1]).to(SOURCE_DTYPES.get(info.dtype, torch.bfloat16))
        return self.from_mlx(name, self._read(info, index))

    def get_row(self, name: str, index: int) -> torch.Tensor:
        return self.get(name, index)

    def close(self) -> None:
        self.shards.close()


class MlxExpertSource:
    """One layer's routed experts from mlx-lm's stacked `switch_mlp` tensors (GPT-OSS's sanitize keeps them under
    `experts.`, gate and up split, each with its bias): an expert's gate and up rows stacked into one [2I, H] matrix,
    as flashmoe's blobs hold them, codes and scales untouched."""

    def __init__(self, ckpt: MlxCheckpoint, expert_prefix: str, layer: int, hidden: int, inter: int, num_experts: int):
        self.ckpt = ckpt
        stacked = expert_prefix if ckpt.has(f"{expert_prefix}gate_proj.weight") else switch_mlp_prefix(expert_prefix)
        self.names = {p: f"{stacked}{p}.weight" for p in PROJECTIONS}
        self.bias_names = {p: f"{stacked}{p}.bias" for p in PROJECTIONS if ckpt.has(f"{stacked}{p}.bias")}
        self.source_names = list(self.names.values())
        want = {"gate_proj": (num_experts, inter, hidden), "up_proj": (num_experts, inter, hidden),
                "down_proj": (num_experts, hidden, inter)}
        for p, name in self.names.items():
            if not ckpt.has(name):
                raise FlashMoeError(f"MLX checkpoint {ckpt.folder} has no {name} for layer {layer} (its "
                                    "routed experts): not an mlx-lm checkpoint of this architecture")
            if ckpt.info(name).shape != want[p]:
                raise FlashMoeError(f"MLX tensor {ckpt.info(name).source_name} has shape {list(ckpt.info(name).shape)}"
                                    f" but config.json implies {list(want[p])}: the checkpoint does not match its config")
        quants = {ckpt.quant(n) for n in self.names.values()}
        if len(quants) > 1:
            raise FlashMoeError(f"layer {layer}'s expert projections differ in quantization ({sorted(map(str, quants))});"
                                " convert with --requantize --bits N")
        self.quant = quants.pop()  # (bits, group_size), or None when the experts are float
        scales = {ckpt.scale_dtype_of(n) for n in self.names.values()} if self.quant else {torch.bfloat16}
        self.scale_dtype = scales.pop()
        self.source_bytes = sum(ckpt.info(n).nbytes for n in self.names.values())
        self.dtype = torch.bfloat16 if self.quant else SOURCE_DTYPES[ckpt.info(self.names["gate_proj"]).dtype]

    def read(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (gate_up [2I, H], down [H, I]) in float (dequantized), for --requantize or an unquantized source."""
        gate, up, down = (self.ckpt.get(self.names[p], expert) for p in PROJECTIONS)
        return torch.cat([gate, up]), down

    def read_biases(self, expert: int) -> dict[str, torch.Tensor]:
        """The expert's output biases as the blob holds them (float32, gate rows first), where it has any."""
        if not self.bias_names:
            return {}
        gate, up, down = (self.ckpt.get(self.bias_names[p], expert).float() for p in PROJECTIONS)
        return {"gate_up.bias": torch.cat([gate, up]), "down.bias": down}

    def read_quantized(self, expert: int) -> dict[str, torch.Tensor]:
        """The expert's blob tensors, repacked: gate_up.packed / .scales / .biases, down.*."""
        gate, up, down = (self.ckpt.get_quantized(self.names[p], expert) for p in PROJECTIONS)
        return blob_tensors([gate, up], [down])

