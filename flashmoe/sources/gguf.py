"""GGUF files (llama.cpp's format: Q8_0, Q4_K_M, the UD and IQ quants, ...) read as the Hugging Face checkpoint they
came from, one tensor or one expert at a time.

transformers' GGUF integration does the format's work: it parses the header (`GgufHeader`), rebuilds config.json from
the metadata (`get_gguf_config`), dequantizes every block type ggml publishes (`dequant.dequantize`) and rebuilds the
tokenizer. The family maps llama.cpp's tensor names to HF's and undoes its converter's changes
(`models/<family>.py: GGUF_NAMES, GGUF_LAYER_NAMES, from_gguf`); routed experts (`blk.N.ffn_{gate,up,down}_exps`,
[E, ...] in one tensor) read as HF's fused `mlp.experts.gate_up_proj` / `down_proj`, one expert's rows at a time from
the file. Block types are not flashmoe's affine scheme, so everything is dequantized as read and the
experts quantized to --bits (the manifest records the types they were requantized from).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import torch

from ..errors import FlashMoeError
from ..models import GGUF_FAMILIES, family_of_gguf
from ..store import SOURCE_DTYPES
from ..quant import SCALE_DTYPE, QuantizedTensor, quantize
from .. import mxfp4
from .ggml_blocks import GROUP, MXFP4, REPACK_BITS, repack, repack_mxfp4
from .hf import TensorInfo

FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # ggml type id -> dtype
FLOAT_NAMES = {0: "F32", 1: "F16", 30: "BF16"}
EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
EXPERT_BIASES = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.bias$")  # GPT-OSS's
LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
CHUNK_BYTES = 64 << 20


def split_names(filename: str) -> list[str]:
    """A GGUF's files: itself, or every part of a llama.cpp split set named by its first."""
    m = SPLIT.search(filename)
    if not m:
        return [filename]
    stem, n = filename[: m.start()], int(m.group(2))
    return [f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]


def gguf_files(src: Path) -> list[Path] | None:
    """The GGUF file(s) of a source: a .gguf file (the first of a split set brings the rest), or a folder holding one
    model's; None when it is not a GGUF source."""
    if src.is_file() and src.suffix == ".gguf":
        files = [src]
    elif src.is_dir() and not (src / "config.json").is_file():
        files = sorted(src.glob("*.gguf"))
        if not files:
            return None
    else:
        return None
    names = split_names(files[0].name)
    if len(names) > 1:  # llama.cpp's gguf-split: NAME-00001-of-0000N.gguf, the metadata in the first
        files = [files[0].with_name(n) for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            stem = files[0].name[: SPLIT.search(files[0].name).start()]
            raise FlashMoeError(f"{files[0].parent} lacks {missing[0]} of the split GGUF {stem}: download every part")
    elif len(files) > 1:
        raise FlashMoeError(f"{src} holds {len(files)} GGUF files of different models ({files[0].name}, "
                            f"{files[1].name}, ...): name the one to convert")
    return files


def _gguf():
    try:
        from transformers.integrations.gguf import GgufHeader, get_gguf_config, read_gguf_metadata
        from transformers.integrations.gguf.dequant import GGML_BLOCK, GGML_NAME, dequantize
    except ImportError:
        raise FlashMoeError("reading GGUF needs transformers >= 5.24 (its GGUF integration): pip install -U "
                            "transformers") from None
    # its header reader sizes each tensor from this table, which has no MXFP4 (GPT-OSS's experts): its block is 32
    # weights in 17 bytes. flashmoe reads those tensors itself (ggml_blocks.repack_mxfp4), never through transformers.
    GGML_BLOCK.setdefault(MXFP4, (32, 17))
    return GgufHeader, get_gguf_config, read_gguf_metadata, GGML_BLOCK, GGML_NAME, dequantize


def gguf_config(files: list[Path]) -> dict:
    """config.json as the GGUF's metadata states it (transformers' mapping), for the architectures it knows."""
    _, get_gguf_config, read_gguf_metadata, *_ = _gguf()
    try:
        metadata, _ = read_gguf_metadata(str(files[0]))
        names = tuple(n for f in files for n in read_gguf_metadata(str(f))[1])
        family = family_of_gguf(metadata["general.architecture"])
        if family is None:
            raise FlashMoeError(f"{files[0]} is a GGUF of architecture {metadata['general.architecture']!r}, which "
                                f"flashmoe does not read; it reads {', '.join(GGUF_FAMILIES)} (llama: Mixtral)")
        if hasattr(family, "config_from_gguf"):  # one transformers has no mapping for
            try:
                raw = get_gguf_config(metadata, names)
            except ValueError:
                raw = family.config_from_gguf(metadata, names)
        else:
            raw = get_gguf_config(metadata, names)
        # the file says which layers are recurrent; transformers' mapping keeps only the interval, which a model
        # whose pattern is not every-Nth-layer would get wrong
        recurrent = metadata.get(f"{metadata['general.architecture']}.attention.recurrent_layers")
        if isinstance(recurrent, list) and len(recurrent) >= raw.get("num_hidden_layers", 0):
            raw["layer_types"] = ["linear_attention" if r else "full_attention"
                                  for r in recurrent[: raw["num_hidden_layers"]]]
        return raw
    except FlashMoeError:  # the family's own refusal (a dense llama, say)
        raise
    except KeyError as exc:
        raise FlashMoeError(f"{files[0]} lacks metadata key {exc}: not a complete llama.cpp GGUF") from None
    except ValueError as exc:  # an architecture transformers has no config mapping for
        raise FlashMoeError(f"{files[0]}: {exc}") from None
    except Exception as exc:
        raise FlashMoeError(f"cannot read {files[0]} as GGUF: {exc}") from None


def write_tokenizer(files: list[Path], dst: Path) -> str | None:
    """tokenizer.json, tokenizer_config.json and the chat template, rebuilt from the GGUF's vocabulary by transformers;
    a line saying why not when it cannot (the store still converts; generate and chat need a tokenizer)."""
    try:  # transformers' own GGUF tokenizer rebuild, without AutoTokenizer's check of the model architecture
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        arch, vocabulary, settings = get_gguf_tokenizer(str(files[0]))
        backend, more = convert_gguf_tokenizer(arch, vocabulary)
        PreTrainedTokenizerFast(tokenizer_object=backend, **settings, **more).save_pretrained(str(dst))
    except Exception as exc:  # a tokenizer type transformers cannot rebuild
        return (f"warning: cannot rebuild the tokenizer from {files[0].name} ({exc}); copy tokenizer.json and "
                f"tokenizer_config.json from the original model into {dst}")
    return None


class GgufCheckpoint:
    """The tensors of a GGUF model under the HF checkpoint's names (the Checkpoint interface of sources/hf.py)."""

    canonical_experts = True  # fused experts [E, out, in] with gate rows first, whatever the family's own layout

    def __init__(self, files: list[Path], cfg, family):
        GgufHeader, _, _, self._block, self._type_name, self._dequantize = _gguf()
        self.folder, self.cfg, self.family = files[0].parent, cfg, family
        self.tensors: dict[str, TensorInfo] = {}
        self.left_out: dict[str, list[int]] = {}
        self.types: Counter = Counter()  # the block types of the routed experts' tensors (for the manifest)
        self._where: dict[str, tuple] = {}  # HF name -> (file, torch shape, ggml type, offset, nbytes) per part
        self._experts: set[str] = set()  # the fused routed-expert names, read as they are
        self._expert_biases: set[str] = set()  # their fused biases (GPT-OSS), [E, out]
        self._fds: dict[Path, int] = {}
        experts: dict[tuple[int, str], tuple] = {}
        biases: dict[tuple[int, str], tuple] = {}
        for f in files:
            try:
                header = GgufHeader.from_file(str(f))
            except Exception as exc:
                raise FlashMoeError(f"cannot read {f} as GGUF: {exc}") from None
            for t in header.tensors:
                part = (f, tuple(t.shape), t.ggml_type, header.data_start + t.offset, t.nbytes)
                if t.ggml_type not in FLOAT_TYPES and t.ggml_type not in self._block:
                    raise FlashMoeError(f"tensor {t.name} in {f.name} is of ggml type {t.ggml_type}, which the "
                                        "installed transformers cannot dequantize: upgrade transformers, or convert "
                                        "from another quantization of the model")
                m = EXPERTS.match(t.name)
                if m:
                    experts[(int(m.group(1)), m.group(2))] = part
                    self.types[t.ggml_type] += 1
                    continue
                m = EXPERT_BIASES.match(t.name)
                if m:
                    biases[(int(m.group(1)), m.group(2))] = part
                    continue
                names = self._hf_names(t.name)
                if not names:
                    what = "multi-token-prediction head" if t.name.startswith("blk.") else "other"
                    count = self.left_out.setdefault(what, [0, 0])
                    count[0], count[1] = count[0] + 1, count[1] + t.nbytes
                    continue
                for name in names:  # one GGUF tensor may hold several HF ones (Qwen3-Next's ssm_ba)
                    self._where[name] = (part,)
                    shape = tuple(family.from_gguf(cfg, name, torch.empty(t.shape, device="meta")).shape)
                    self.tensors[name] = TensorInfo(f, t.name, self._dtype_name(t.ggml_type), shape,
                                                    t.nbytes // len(names))
        self._fuse_experts(experts)
        self._fuse_expert_biases(biases)
        # experts whose blocks are flashmoe's affine scheme are repacked (ggml_blocks.py), the others quantized into
        # the same scheme; a file mixing 4- and 8-bit ones, or with none of them, is quantized to --bits instead
        widths = {REPACK_BITS[part[2]] for part in experts.values() if part[2] in REPACK_BITS}
        self.expert_scheme = (widths.pop(), GROUP) if len(widths) == 1 else None
        # experts all MXFP4 (GPT-OSS's files): kept as the store's mxfp4 scheme
        self.mxfp4 = bool(experts) and all(part[2] == MXFP4 for part in experts.values())
        if self.mxfp4:
            self.expert_scheme = (4, mxfp4.GROUP)

    def _name_of(self, ggml_type: int) -> str:
        return FLOAT_NAMES.get(ggml_type) or self._type_name.get(ggml_type, "MXFP4" if ggml_type == MXFP4 else str(ggml_type))

    def _dtype_name(self, ggml_type: int) -> str:
        return FLOAT_NAMES.get(ggml_type, "BF16")  # block types dequantize to bf16

    def _hf_names(self, gguf_name: str) -> list[str]:
        if gguf_name in self.family.GGUF_NAMES:
            return [self.family.GGUF_NAMES[gguf_name]]
        m = LAYER.match(gguf_name)
        if m and int(m.group(1)) < self.cfg.num_hidden_layers and m.group(2) in self.family.GGUF_LAYER_NAMES:
            hf = self.family.GGUF_LAYER_NAMES[m.group(2)]
            return [f"model.layers.{m.group(1)}.{n}" for n in ((hf,) if isinstance(hf, str) else hf)]
        if m and int(m.group(1)) >= self.cfg.num_hidden_layers:
            return []  # llama.cpp writes the MTP block as one more layer
        raise FlashMoeError(f"GGUF tensor {gguf_name} has no counterpart in flashmoe's {self.cfg.architecture} "
                            "(a different model, or a llama.cpp conversion newer than flashmoe)")

    def _fuse_experts(self, experts: dict[tuple[int, str], tuple]) -> None:
        """Each MoE layer's gate and up experts as one [E, 2I, H] tensor (HF's fused layout), down as [E, H, I]."""
        for layer in sorted({key[0] for key in experts}):
            parts = {k: experts.get((layer, k)) for k in ("gate", "up", "down")}
            if None in parts.values():
                missing = next(k for k, v in parts.items() if v is None)
                raise FlashMoeError(f"GGUF tensor blk.{layer}.ffn_{missing}_exps.weight is missing: the file is "
                                    "incomplete")
            p = self.family.expert_prefix(layer)
            gate, up, down = parts["gate"], parts["up"], parts["down"]
            for name, group in ((p + "gate_up_proj", (gate, up)), (p + "down_proj", (down,))):
                e, rows, cols = group[0][1]
                self._where[name] = group
                self._experts.add(name)
                self.tensors[name] = TensorInfo(group[0][0], name, self._dtype_name(group[0][2]),
                                                (e, rows * len(group), cols), sum(g[4] for g in group))

    def _fuse_expert_biases(self, biases: dict[tuple[int, str], tuple]) -> None:
        """GPT-OSS's expert biases as its HF names hold them, gate then up: [E, 2I] and [E, H]."""
        for layer in sorted({key[0] for key in biases}):
            p = self.family.expert_prefix(layer)
            for name, kinds in ((p + "gate_up_proj_bias", ("gate", "up")), (p + "down_proj_bias", ("down",))):
                group = tuple(biases[(layer, k)] for k in kinds if (layer, k) in biases)
                if len(group) != len(kinds):
                    raise FlashMoeError(f"GGUF tensor blk.{layer}.ffn_{'_/'.join(kinds)}_exps.bias is missing: the "
                                        "file is incomplete")
                e, width = group[0][1]
                self._where[name] = group
                self._expert_biases.add(name)
                self.tensors[name] = TensorInfo(group[0][0], name, self._dtype_name(group[0][2]),
                                                (e, width * len(group)), sum(g[4] for g in group))

    # ---- the Checkpoint interface ----------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def quant(self, name: str) -> tuple[int, int] | None:
        """The routed experts' scheme when they are repacked; a resident matrix's when its blocks are affine already
        and the family's changes to it only move rows (which carry their codes, scales and biases along)."""
        if name in self._experts:
            return self.expert_scheme
        (file, shape, ggml_type, offset, nbytes), *more = self._where[name]
        if more or ggml_type not in REPACK_BITS or len(shape) != 2 or not self.family.gguf_rows_only(self.cfg, name):
            return None
        return REPACK_BITS[ggml_type], GROUP

    def scale_dtype_of(self, name: str) -> torch.dtype:
        return torch.uint8 if self.mxfp4 else SCALE_DTYPE  # of repacked experts: ggml's scales are fp16 (e8m0: MXFP4)

    def repacked(self, ggml_type: int) -> bool:
        if self.mxfp4:
            return ggml_type == MXFP4
        return self.expert_scheme is not None and REPACK_BITS.get(ggml_type) == self.expert_scheme[0]

    def expert_types(self, repacking: bool) -> tuple[dict[str, int], dict[str, int]]:
        """(repacked, requantized): the experts' tensors counted by ggml type name."""
        out = ({}, {})
        for t, n in sorted(self.types.items()):
            out[0 if repacking and self.repacked(t) else 1][self._name_of(t)] = n
        return out

    def get_quantized(self, name: str, index: int | None = None) -> QuantizedTensor:
        """One expert's rows in the experts' scheme: its blocks repacked, or (another type) dequantized and quantized.
        A resident matrix (index None): its blocks repacked, the family's row changes applied to each part."""
        if index is None:
            (file, (rows, cols), ggml_type, offset, nbytes), = self._where[name]
            q = repack(self._pread(file, offset, nbytes), ggml_type, rows, cols)
            moved = (self.family.from_gguf(self.cfg, name, t) for t in (q.packed, q.scales, q.biases))
            return QuantizedTensor(*moved, q.bits, q.group_size)
        bits, group = self.expert_scheme
        parts = []
        for file, shape, ggml_type, offset, nbytes in self._where[name]:
            rows, cols = shape[1:]
            if self.repacked(ggml_type):
                per = nbytes // shape[0]
                raw = self._pread(file, offset + index * per, per)
                parts.append(repack_mxfp4(raw, rows, cols) if ggml_type == MXFP4 else repack(raw, ggml_type, rows, cols))
            else:
                parts.append(quantize(self._read((file, shape, ggml_type, offset, nbytes), index), bits, group))
        return QuantizedTensor(*(None if parts[0].biases is None and f == "biases" else
                                 torch.cat([getattr(q, f) for q in parts]) for f in ("packed", "scales", "biases")),
                               bits, group)

    def _pread(self, file: Path, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes read with pread, not mapped: a mapped file's touched pages would count in the process's memory."""
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        data = os.pread(self._fds[file], nbytes, offset)
        if len(data) != nbytes:
            raise FlashMoeError(f"{file} is truncated (a tensor runs past its end): download it again")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def _read(self, part: tuple, index: int | None) -> torch.Tensor:
        file, shape, ggml_type, offset, nbytes = part
        if index is not None:  # one slice along the first axis: its rows are contiguous
            nbytes //= shape[0]
            offset += index * nbytes
            shape = shape[1:]
        if ggml_type in FLOAT_TYPES:
            return self._pread(file, offset, nbytes).view(FLOAT_TYPES[ggml_type]).reshape(shape)
        if ggml_type == MXFP4:  # transformers has no dequantizer for it: ours, from the repacked codes
            q = repack_mxfp4(self._pread(file, offset, nbytes), nbytes // (shape[-1] // 32 * 17), shape[-1])
            return mxfp4.dequantize(q.packed, q.scales, torch.bfloat16).reshape(shape)
        # row slices of at most CHUNK_BYTES: a 397B model's Q4_K embedding at once would pass through 4 GB of float32
        out = torch.empty(shape, dtype=torch.bfloat16)
        flat, row_bytes = out.view(-1, shape[-1]), nbytes // (out.numel() // shape[-1])
        step = max(1, CHUNK_BYTES // row_bytes)
        for r in range(0, flat.shape[0], step):
            rows = min(step, flat.shape[0] - r)
            raw = self._pread(file, offset + r * row_bytes, rows * row_bytes)
            flat[r: r + rows] = self._dequantize(raw, ggml_type, torch.float32).view(rows, shape[-1])
        return out

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        parts = self._where[name]
        if name in self._expert_biases:  # gate and up biases one after the other
            return torch.cat([self._read(p, index) for p in parts], dim=-1)
        if name in self._experts:  # gate and up rows stacked, as HF fuses them
            dtype = SOURCE_DTYPES[self.tensors[name].dtype]
            return torch.cat([self._read(p, index).to(dtype) for p in parts], dim=-2)
        return self.family.from_gguf(self.cfg, name, self._read(parts[0], index))

    def get_row(self, name: str, index: int) -> torch.Tensor:
        return self.get(name, index)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
