"""Hugging Face checkpoint -> flashmoe store, tensor by tensor, resumable (docs/FORMAT.md).

Memory stays bounded by one resident shard (shard_bytes) plus one expert, so a checkpoint far
larger than RAM converts. Progress is recorded in convert-state.json after every finished shard and
layer; the manifest is written last, so an interrupted conversion never loads as a complete store.
"""

from __future__ import annotations

import dataclasses
import errno
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from . import __version__
from .sources.hf import FLOAT_DTYPES, Checkpoint
from .config import ModelConfig, read_hf_config
from .errors import FlashMoeError
from .manifest import manifest_crc32
from .models import ResidentItem, family_of
from .quant import SCALE_DTYPE, QuantizedTensor, blob_tensors, check_quant_params, quantize
from .sources.bnb import bnb_scheme
from .sources.compressed import compressed_schemes
from .sources.fp8 import compressed_fp8, fp8_block_size, quantization_config
from .sources.gguf import GgufCheckpoint, gguf_config, gguf_files, write_tokenizer
from .sources.awq import awq_scheme
from .sources.gptq import gptq_scheme, with_quantize_config
from .sources.hub import SOURCE_DIR, HubRepo, download_gguf, hub_gguf, hub_repo
from .sources.mlx import REPACKED_BITS, MlxCheckpoint, MlxExpertSource, is_mlx_checkpoint, mlx_quantization
from .store import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, SOURCE_DTYPES, BlobLayout, crc32, scale_dtype_name, scheme_of,
                    UNBIASED, expert_file_name, expert_layout, file_crc32, quantized_parts)

STATE_FILE = "convert-state.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "config.json",
)
DEFAULT_SHARD_BYTES = 2 << 30
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64  # for float sources; a quantized source (MLX) keeps its own


def resident_plan(cfg: ModelConfig, ckpt: Checkpoint) -> list[ResidentItem]:
    """The store's resident tensors (the family's resident_shapes), each from its checkpoint tensors: as they
    are, or through one of the family's resident_sources (a split or a merge)."""
    family = family_of(cfg.architecture)
    shapes = family.resident_shapes(cfg)
    if cfg.tie_word_embeddings and ckpt.has("lm_head.weight"):  # tied, but saved anyway: keep it as the checkpoint has it
        shapes = {"lm_head.weight": (cfg.vocab_size, cfg.hidden_size), **shapes}
    made = {name: item for item in family.resident_sources(cfg) for name in item.outputs}
    items = []
    for name, shape in shapes.items():
        # as it is, also where the checkpoint already holds the split the family would make (some GGUFs)
        if name not in made or (ckpt.has(name) and not all(ckpt.has(s) for s in made[name].sources)):
            items.append(ResidentItem({name: shape}, [name], lambda ts: ts))
        elif name == made[name].outputs[0]:  # one item makes all its outputs
            items.append(made[name])
    return items


EXTRA_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def leave_out_extra_layers(ckpt, layers: int) -> None:
    """Layers numbered past the decoder's are multi-token-prediction modules (num_nextn_predict_layers of the
    sigmoid-routed families): not part of the text model, counted into the checkpoint's left_out to be said."""
    tensors = getattr(ckpt, "tensors", None)
    if not isinstance(tensors, dict):
        return
    extra = [n for n in tensors if (m := EXTRA_LAYER.match(n)) and int(m.group(1)) >= layers]
    if extra:
        ckpt.left_out["multi-token-prediction layers"] = [len(extra), sum(tensors[n].nbytes for n in extra)]


def item_source_bytes(item: ResidentItem, ckpt: Checkpoint) -> int:
    return sum(ckpt.info(s).nbytes for s in item.sources)


class ExpertSource:
    """Reads one routed expert's gate, up and down weights, from per-expert tensors or fused [E, ...] ones: in float,
    or (a compressed-tensors source whose codes import as they are) as its blob's quantized tensors.

    What a family declares about its fused experts: FUSED_EXPERTS_TRANSPOSED (float ones stored [E, in, out], as
    GPT-OSS's are; its MXFP4 ones are [E, out, in] like everyone's), GATE_UP_INTERLEAVED (gate and up rows
    alternate; the blob has gate rows first), EXPERT_BIASES (the names of the two projections' [E, out] biases)."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, layer: int):
        family = family_of(cfg.architecture)
        self.ckpt, self.p, self.names = ckpt, family.expert_prefix(layer), family.EXPERT_PROJECTIONS
        h, inter, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.fused = ckpt.has(self.p + "gate_up_proj")
        native = not getattr(ckpt, "canonical_experts", False)  # a GGUF's are [E, out, in], gate rows first already
        self.transposed = (native and self.fused and getattr(family, "FUSED_EXPERTS_TRANSPOSED", False)
                           and ckpt.quant(self.p + "gate_up_proj") is None)
        self.interleaved = native and getattr(family, "GATE_UP_INTERLEAVED", False)
        self.bias_names = [self.p + n for n in getattr(family, "EXPERT_BIASES", ())]
        if self.transposed:
            expect = {self.p + "gate_up_proj": (e, h, 2 * inter), self.p + "down_proj": (e, inter, h)}
        elif self.fused:
            expect = {self.p + "gate_up_proj": (e, 2 * inter, h), self.p + "down_proj": (e, h, inter)}
        else:
            expect = {}
            gate, up, down = self.names
            for x in range(e):
                expect[f"{self.p}{x}.{gate}.weight"] = (inter, h)
                expect[f"{self.p}{x}.{up}.weight"] = (inter, h)
                expect[f"{self.p}{x}.{down}.weight"] = (h, inter)
        check_sources(ckpt, expect)
        if self.bias_names:
            check_sources(ckpt, dict(zip(self.bias_names, [(e, 2 * inter), (e, h)])))
        self.source_bytes = sum(ckpt.info(n).nbytes for n in [*expect, *self.bias_names])
        self.source_names = list(expect)
        self.dtype = SOURCE_DTYPES[ckpt.info(next(iter(expect))).dtype]  # kept by --no-quant
        quants = {ckpt.quant(n) for n in expect}
        self.quant = quants.pop() if len(quants) == 1 else "mixed"  # (bits, group_size), None (float) or "mixed"
        self.scale_dtype = (ckpt.scale_dtype_of(self.source_names[0]) if self.quant not in (None, "mixed")
                            else self.dtype)  # a repacked source's scales

    def read_quantized(self, expert: int) -> dict[str, torch.Tensor]:
        """The expert's blob tensors from the source's codes: gate_up.packed / .scales / .biases, down.*."""
        if self.fused:
            get = self.ckpt.get_quantized
            gate_up = get(self.p + "gate_up_proj", expert)
            if self.interleaved:  # rows are quantized one by one: they move with their scales
                gate_up = QuantizedTensor(*(None if t is None else gate_first(t) for t in (
                    gate_up.packed, gate_up.scales, gate_up.biases)), gate_up.bits, gate_up.group_size)
            return blob_tensors([gate_up], [get(self.p + "down_proj", expert)])
        gate, up, down = (self.ckpt.get_quantized(f"{self.p}{expert}.{x}.weight") for x in self.names)
        return blob_tensors([gate, up], [down])

    def read(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (gate_up [2I, H] with gate rows first, down [H, I])"""
        if self.fused:
            gate_up, down = (self.ckpt.get_row(self.p + n, expert) for n in ("gate_up_proj", "down_proj"))
            if self.transposed:
                gate_up, down = gate_up.t(), down.t()
            return gate_first(gate_up) if self.interleaved else gate_up, down
        gate, up, down = (self.ckpt.get(f"{self.p}{expert}.{x}.weight") for x in self.names)
        return torch.cat([gate, up]), down

    def read_biases(self, expert: int) -> dict[str, torch.Tensor]:
        """The expert's output biases, as the blob holds them (float32, gate rows first)."""
        if not self.bias_names:
            return {}
        gate_up, down = (self.ckpt.get_row(n, expert).float() for n in self.bias_names)
        return {"gate_up.bias": gate_first(gate_up) if self.interleaved else gate_up, "down.bias": down}


def gate_first(rows: torch.Tensor) -> torch.Tensor:
    """Alternating gate / up rows (GPT-OSS's) -> the gate rows, then the up rows."""
    return torch.cat([rows[0::2], rows[1::2]])


def check_sources(ckpt: Checkpoint, expect: dict[str, tuple[int, ...]]) -> None:
    missing = [n for n in expect if not ckpt.has(n)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FlashMoeError(f"checkpoint {ckpt.folder} is missing tensor {', '.join(missing[:3])}{more}")
    for name, shape in expect.items():
        info = ckpt.info(name)
        if info.shape != tuple(shape):
            raise FlashMoeError(
                f"tensor {name} has shape {list(info.shape)} but config.json implies {list(shape)}: "
                "the checkpoint does not match its config"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise FlashMoeError(f"tensor {name} is {info.dtype}; flashmoe converts bf16, fp16 or fp32 checkpoints")


def expert_tensors(gate_up: torch.Tensor, down: torch.Tensor, bits: int | None, group_size: int) -> dict[str, torch.Tensor]:
    """The named tensors of one expert blob: quantized (packed, scales, biases) or in the source dtype."""
    if bits is None:
        return {"gate_up.weight": gate_up.contiguous(), "down.weight": down.contiguous()}
    out = {}
    for name, w in (("gate_up", gate_up), ("down", down)):
        q = quantize(w, bits, group_size)
        out[f"{name}.packed"], out[f"{name}.scales"], out[f"{name}.biases"] = q.packed, q.scales, q.biases
    return out


def in_order(fn, items, workers: int):
    """fn over items on `workers` threads, results in order, at most 2 x workers in flight (a layer's blobs are
    written as they come; torch's kernels release the GIL, and one expert's matrices are too small to keep torch's
    own threads busy: measured 13 experts/s on 16 cores with one at a time)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _no_space(dst: Path) -> FlashMoeError:
    free_gb = shutil.disk_usage(dst).free / 1e9
    return FlashMoeError(
        f"no space left on device writing {dst} ({free_gb:.2f} GB free); free some space and run the same "
        "flashmoe convert command again: it resumes where it stopped"
    )


class Converter:
    """bits="auto": 4 for a float checkpoint, and for an MLX one its own (its codes repacked, never requantized);
    None keeps a float source's dtype. requantize: an MLX source's experts dequantized and quantized to `bits`."""

    def __init__(self, src: Path, dst: Path, bits: int | None | str = "auto", group_size: int | None = None,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, requantize: bool = False, revision: str | None = None):
        self.src, self.dst, self.shard_bytes = Path(src), Path(dst), shard_bytes
        self.workers = min(8, os.cpu_count() or 1)  # experts converted at once
        self.hub, self.remote, hub_file = hub_repo(str(src)), None, hub_gguf(str(src))
        self.downloaded: Path | None = None  # a Hub GGUF's folder, removed once the store is done
        if self.hub:  # downloaded shard by shard into DST/.source as the conversion reads them
            self._check_destination()
            self.remote = HubRepo(self.hub, revision, self.dst / SOURCE_DIR)
            self.src = self.remote.folder
        elif hub_file:  # a GGUF is read whole: downloaded first, into DST/.source
            self._check_destination()
            self.downloaded = self.dst / SOURCE_DIR
            self.dst.mkdir(parents=True, exist_ok=True)
            self.src = download_gguf(*hub_file, revision, self.downloaded, shutil.disk_usage(self.dst).free)
            self.hub = f"{hub_file[0]}/{hub_file[1]}"
        elif revision:
            raise FlashMoeError(f"--revision is for a Hugging Face Hub repository; {src} is a local path")
        self.gguf = gguf_files(self.src)
        if self.gguf is None and not self.src.is_dir():
            raise FlashMoeError(f"source checkpoint {self.src} is not a folder or a .gguf file")
        if self.gguf:
            self.raw_config = gguf_config(self.gguf)
            self.cfg = ModelConfig.from_hf(self.raw_config)
        else:
            self.cfg, self.raw_config = read_hf_config(self.src)
            self.raw_config = with_quantize_config(self.raw_config, self.src)
        if self.cfg.hidden_act != "silu":
            raise FlashMoeError(f"hidden_act {self.cfg.hidden_act!r} is not supported (only silu)")
        family = family_of(self.cfg.architecture)
        self.mlx = not self.gguf and is_mlx_checkpoint(self.src, self.raw_config, self.remote)
        self.fp8_block = None if self.mlx or self.gguf else fp8_block_size(self.raw_config)
        # compressed-tensors' FP8 (float-quantized) and bitsandbytes' 4-bit: dequantized as read, like the FP8 releases
        self.fp8_float = (None if self.mlx or self.gguf
                          else compressed_fp8(self.raw_config, str(self.src / "config.json")))
        self.bnb = None if self.mlx or self.gguf else bnb_scheme(self.raw_config, str(self.src / "config.json"))
        self.schemes = (None if self.mlx or self.gguf
                        else compressed_schemes(self.raw_config, str(self.src / "config.json")))
        method = (quantization_config(self.raw_config) or {}).get("quant_method") if not self.mlx else None
        self.mxfp4 = method == "mxfp4"
        where = str(self.src / "config.json")
        # GPTQ's or AWQ's scheme (their X.qweight / qzeros / scales)
        self.qweights = None if self.mlx or self.gguf else (gptq_scheme(self.raw_config, where)
                                                            or awq_scheme(self.raw_config, where))
        # a source whose codes flashmoe can take as they are (experts repacked, residents kept quantized)
        self.quantized_source = ("MLX" if self.mlx else "compressed-tensors" if self.schemes
                                 else "MXFP4" if self.mxfp4 else method.upper() if self.qweights else None)
        if self.gguf:
            self.ckpt = GgufCheckpoint(self.gguf, self.cfg, family)
            self.quantized_source = "GGUF" if self.ckpt.expert_scheme else None
        elif self.mlx:
            # families whose mlx-lm sanitize() changes nothing but the experts' stacking have no from_mlx
            self.ckpt = MlxCheckpoint(self.src, self.raw_config, getattr(family, "from_mlx", lambda name, t: t),
                                      self.remote)
        else:
            self.ckpt = Checkpoint(self.src, self.fp8_block, self.schemes, self.remote, self.mxfp4, self.qweights,
                                   self.fp8_float, self.bnb)
            self.ckpt.keep_fp8 = bits == "fp8" and self.fp8_block is not None
        try:
            leave_out_extra_layers(self.ckpt, self.cfg.num_hidden_layers)
            self.plan = resident_plan(self.cfg, self.ckpt)
            check_sources(self.ckpt, {s: shape for item in self.plan for s, shape in item.sources.items()})
            if self.mlx:
                self.expert_sources = {i: MlxExpertSource(self.ckpt, family.expert_prefix(i), i, self.cfg.hidden_size,
                                                          self.cfg.moe_intermediate_size, self.cfg.num_experts)
                                       for i in self.cfg.moe_layers}
            else:
                self.expert_sources = {i: ExpertSource(self.cfg, self.ckpt, i) for i in self.cfg.moe_layers}
            self.bits, self.group_size, self.repack = self._expert_quantization(bits, group_size, requantize)
        except BaseException:
            self.ckpt.close()
            raise
        if self.bits is not None:
            check_quant_params(self.bits, self.group_size, self.cfg.hidden_size, "gate/up")
            check_quant_params(self.bits, self.group_size, self.cfg.moe_intermediate_size, "down")
        first = self.expert_sources[self.cfg.moe_layers[0]]
        self.scale_dtype = first.scale_dtype if self.repack else SCALE_DTYPE
        self.layout = expert_layout(self.cfg, self.bits, self.group_size, first.dtype, self.scale_dtype)
        self.resident_quant = self._resident_quantization()
        source = f"hf://{self.hub}@{revision or 'main'}" if self.hub else str(self.src.resolve())
        self.options = {"source": source, "bits": "fp8" if bits == "fp8" else self.bits,
                        "group_size": self.group_size if self.bits else None}
        if self.quantized_source:
            self.options["requantize"] = not self.repack

    def _expert_quantization(self, bits, group_size, requantize: bool) -> tuple[int | None, int | None, bool]:
        """(bits, group_size, whether experts are repacked from the source's codes)."""
        if bits == "fp8":  # FP8 experts kept as they are (fp8block.py)
            if self.fp8_block is None:
                raise FlashMoeError(f"--bits fp8 keeps an FP8 checkpoint's experts as they are; {self.src} is not FP8 "
                                    "block-scaled: use --bits 4 or 8")
            if group_size is not None or requantize:
                raise FlashMoeError("--bits fp8 keeps the checkpoint's blocks: drop --group-size and --requantize")
            cols = self.fp8_block[1]
            if self.cfg.hidden_size % cols or self.cfg.moe_intermediate_size % cols or cols % 16:
                raise FlashMoeError(f"--bits fp8 needs whole blocks along each expert row: weight_block_size "
                                    f"{list(self.fp8_block)} does not divide hidden {self.cfg.hidden_size} and expert "
                                    f"intermediate {self.cfg.moe_intermediate_size} into groups of 16 or more; "
                                    "use --bits 4 or 8")
            return 8, cols, True
        if not self.quantized_source:
            if requantize:
                raise FlashMoeError(f"--requantize is for quantized sources (MLX, compressed-tensors); {self.src} holds "
                                    "float weights: drop --requantize")
            bits = DEFAULT_BITS if bits == "auto" else bits
            return bits, (group_size or DEFAULT_GROUP_SIZE) if bits else None, False
        quants = {source.quant for source in self.expert_sources.values()}
        source_quant = quants.pop() if len(quants) == 1 else "mixed"
        # an MLX mxfp4 checkpoint's experts are named MXFP4 (an HF MXFP4 source says so already)
        mxfp4_experts = (self.quantized_source != "MXFP4"
                         and getattr(next(iter(self.expert_sources.values())), "scale_dtype", None) == torch.uint8)
        described = ("float" if source_quant is None else "of mixed quantization" if source_quant == "mixed"
                     else "MXFP4" if mxfp4_experts else f"{source_quant[0]}-bit (group {source_quant[1]})")
        if requantize or source_quant is None:
            bits = DEFAULT_BITS if bits == "auto" else bits
            return bits, (group_size or DEFAULT_GROUP_SIZE) if bits else None, False
        if bits != "auto" or group_size is not None:
            article = "an" if self.quantized_source[0] in "AEFIMO" else "a"  # an MLX, an MXFP4, a GGUF
            raise FlashMoeError(f"{self.src} is {article} {self.quantized_source} checkpoint whose experts are {described}; "
                                "flashmoe imports them as they are: drop --bits/--group-size/--no-quant, or add "
                                "--requantize to quantize them again")
        if source_quant == "mixed":
            raise FlashMoeError(f"{self.src}'s experts differ in quantization from layer to layer; flashmoe's store "
                                "holds one: convert with --requantize --bits N")
        if source_quant[0] not in REPACKED_BITS:
            raise FlashMoeError(f"{self.src}'s experts are {self.quantized_source} {source_quant[0]}-bit; flashmoe's "
                                "kernels read 2, 4 or 8 bits: convert with --requantize --bits 4 (or 8)")
        return source_quant[0], source_quant[1], True

    def _resident_quantization(self) -> dict[str, dict[str, int]]:
        """The resident matrices kept quantized as the source has them (MLX at 2, 4 or 8 bits, compressed-tensors'
        symmetric 4 and 8, GGUF's Q8_0, Q4_0, Q4_1 and Q4_K): store name -> {bits, group_size}. An item is kept
        quantized when all its sources share one quantization."""
        if not (self.quantized_source or self.gguf):  # a GGUF's Q8_0/Q4_x residents stay quantized too
            return {}
        out = {}
        for item in self.plan:
            quants = {self.ckpt.quant(s) for s in item.sources}
            q = quants.pop() if len(quants) == 1 else None
            # MXFP4 and FP8 (no biases) run in the expert kernels only
            if q is not None and q[0] in REPACKED_BITS and item.rows_only and not any(
                    self.ckpt.scale_dtype_of(s) in UNBIASED for s in item.sources):
                out.update({name: {"bits": q[0], "group_size": q[1]} for name in item.outputs})
        return out

    def resident_tensors(self, item: ResidentItem) -> dict[str, torch.Tensor]:
        """One plan item's store tensors: float, or (kept quantized) each output's codes, scales and biases, the
        item's row transform applied to each."""
        if item.outputs[0] not in self.resident_quant:
            return dict(zip(item.outputs, item.make([self.ckpt.get(s) for s in item.sources])))
        parts = [self.ckpt.get_quantized(s) for s in item.sources]
        made = [item.make([getattr(p, field) for p in parts]) for field in ("packed", "scales", "biases")]
        out = {}
        for i, name in enumerate(item.outputs):
            out.update(zip(quantized_parts(name), (made[0][i], made[1][i], made[2][i])))
        return out

    def expert_blob_tensors(self, source, expert: int) -> dict[str, torch.Tensor]:
        if self.repack:
            tensors = source.read_quantized(expert)
        else:
            tensors = expert_tensors(*source.read(expert), self.bits, self.group_size)
        return {**tensors, **source.read_biases(expert)}

    # ---- planning -------------------------------------------------------------------------
    def _last_file(self, names) -> int:
        """When streaming, the position of the last source shard a job reads (jobs run in that order)."""
        if not self.remote:
            return 0
        return max(self.remote.position[f] for n in names for f in self.ckpt.files_of(n))

    def resident_shards(self) -> list[list[ResidentItem]]:
        """The plan's items grouped into resident files of about shard_bytes; when streaming, in the order of the
        last source shard each reads, a file never waiting on a shard its predecessor did not need."""
        items = sorted(self.plan, key=lambda item: self._last_file(item.sources))
        shards, current, size, key = [], [], 0, None
        for item in items:
            nbytes, item_key = item_source_bytes(item, self.ckpt), self._last_file(item.sources)
            if current and (size + nbytes > self.shard_bytes or item_key != key):
                shards.append(current)
                current, size = [], 0
            current.append(item)
            size, key = size + nbytes, item_key
        if current:
            shards.append(current)
        return shards

    @property
    def store_expert_bytes(self) -> int:
        return self.layout.blob_bytes * self.cfg.num_experts * len(self.expert_sources)

    @property
    def store_resident_bytes(self) -> int:
        return sum(item_source_bytes(item, self.ckpt) for item in self.plan)

    # ---- state ----------------------------------------------------------------------------
    def _check_destination(self) -> None:
        if (self.dst / MANIFEST).exists():
            raise FlashMoeError(f"{self.dst} already holds a complete flashmoe store; remove it or choose another path")

    def _load_state(self) -> dict:
        self._check_destination()
        state_path = self.dst / STATE_FILE
        if state_path.is_file():
            try:
                state = json.loads(state_path.read_text())
            except ValueError:
                state = None
            if not (type(state) is dict and type(state.get("resident")) is dict and type(state.get("layers")) is dict):
                raise FlashMoeError(f"{state_path} is damaged; remove {self.dst} and run flashmoe convert again")
            if state.get("options") != self.options:
                raise FlashMoeError(
                    f"{self.dst} holds an interrupted conversion with other options ({state.get('options')}); "
                    "remove it or use the same options to resume"
                )
            return state
        if self.dst.exists() and any(p.name != SOURCE_DIR for p in self.dst.iterdir()):
            raise FlashMoeError(f"destination {self.dst} exists and is not empty")
        return {"options": self.options, "resident": {}, "layers": {}}

    def _save_state(self, state: dict) -> None:
        _write_atomic(self.dst / STATE_FILE, json.dumps(state))

    # ---- the work -------------------------------------------------------------------------
    def run(self, progress: Callable[[int], None] | None = None, log: Callable[[str], None] = lambda s: None) -> Path:
        progress = progress or (lambda n: None)
        for what, (count, nbytes) in self.ckpt.left_out.items():
            log(f"leaving out the {what}: {count} tensors, {nbytes / 1e9:.2f} GB (flashmoe runs the text decoder)")
        try:
            self.dst.mkdir(parents=True, exist_ok=True)
            state = self._load_state()
            (self.dst / "experts").mkdir(exist_ok=True)
            self._check_space(state)
            groups = self.resident_shards()
            resident_files = [f"resident-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
            jobs = [("resident", name, group) for name, group in zip(resident_files, groups)]
            jobs += [("layer", layer, source) for layer, source in self.expert_sources.items()]
            if self.remote:  # shard by shard: each job once the last shard it reads is in; stable otherwise
                jobs.sort(key=lambda job: self._last_file(self._job_sources(job)))
            files_left = Counter(f for job in jobs for f in self._job_files(job))
            for job in jobs:
                kind, key, what = job
                if kind == "resident":
                    self._write_resident_file(key, what, state, progress, log)
                else:
                    self._write_layer(key, what, state, progress, log)
                for f in self._job_files(job):
                    files_left[f] -= 1
                    if files_left[f] == 0:  # every tensor it holds is written
                        self.ckpt.shards.release(f)
            self._copy_tokenizer(log)
            self._write_manifest(state, resident_files)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _no_space(self.dst) from None
            raise FlashMoeError(f"cannot write {self.dst}: {exc.strerror or exc}") from None
        finally:
            self.ckpt.close()
        (self.dst / STATE_FILE).unlink(missing_ok=True)
        if self.remote:
            self.remote.remove()
        if self.downloaded:
            shutil.rmtree(self.downloaded, ignore_errors=True)
        return self.dst

    def _job_sources(self, job) -> list[str]:
        kind, _, what = job
        return [s for item in what for s in item.sources] if kind == "resident" else what.source_names

    def _job_files(self, job) -> set:
        """The source files a job reads, released (closed; a streamed one deleted) after the last job reading them:
        a mapped file's touched pages count in the process's memory until it is closed."""
        if not hasattr(self.ckpt, "files_of"):
            return set()
        return {f for name in self._job_sources(job) for f in self.ckpt.files_of(name)}

    def total_source_bytes(self) -> int:
        return self.store_resident_bytes + sum(s.source_bytes for s in self.expert_sources.values())

    def _check_space(self, state: dict) -> None:
        done_layers = len(state["layers"])
        need = self.store_resident_bytes + self.layout.blob_bytes * self.cfg.num_experts * (len(self.expert_sources) - done_layers)
        what = "the store"
        if self.remote:  # the shards being converted sit beside it (about two at a time)
            need += 2 * max(self.remote.shard_bytes(f) for f in self.remote.files)
            what = "the store and two source shards in flight"
        free = shutil.disk_usage(self.dst).free
        if free < need:
            raise FlashMoeError(
                f"not enough space at {self.dst} for {what}: it needs about {need / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB is free"
            )

    def _write_resident_file(self, name: str, shard: list[ResidentItem], state: dict, progress, log) -> None:
        source_bytes = sum(item_source_bytes(item, self.ckpt) for item in shard)
        if self._resident_done(name, state["resident"].get(name), log):
            progress(source_bytes)
            return
        tensors = {}
        for item in shard:
            tensors.update((n, t.contiguous()) for n, t in self.resident_tensors(item).items())
            progress(item_source_bytes(item, self.ckpt))
        tmp = self.dst / (name + ".partial")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; the store's other files follow the umask
        os.replace(tmp, self.dst / name)
        state["resident"][name] = {"bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                                   "file_bytes": (self.dst / name).stat().st_size, "crc32": file_crc32(self.dst / name)}
        self._save_state(state)

    def _resident_done(self, name: str, done, log) -> bool:
        """Finished before, and the file still has the size and checksum it was written with."""
        if done is None:
            return False
        path = self.dst / name
        if (type(done) is dict and path.is_file() and path.stat().st_size == done.get("file_bytes")
                and file_crc32(path) == done.get("crc32")):
            return True
        log(f"{name} is damaged; rewriting it")
        return False

    def _layer_done(self, layer: int, done, log) -> bool:
        """Finished before, and every blob of the file still has the checksum it was written with."""
        if done is None:
            return False
        path, blob_bytes = self.dst / expert_file_name(layer), self.layout.blob_bytes
        offsets = [e * blob_bytes for e in range(self.cfg.num_experts)]
        if path.is_file() and path.stat().st_size == len(offsets) * blob_bytes and done == {
                "file": expert_file_name(layer), "offsets": offsets, "sizes": [blob_bytes] * len(offsets),
                "crc32": [file_crc32(path, o, blob_bytes) for o in offsets]}:
            return True
        log(f"layer {layer}'s file is damaged; rewriting it")
        return False

    def _write_layer(self, layer: int, source, state: dict, progress, log) -> None:
        blob_bytes, rel = self.layout.blob_bytes, expert_file_name(layer)
        if self._layer_done(layer, state["layers"].get(str(layer)), log):
            progress(source.source_bytes)
            return
        tmp = self.dst / (rel + ".partial")
        offsets, sizes, sums = [], [], []
        per_expert = source.source_bytes // self.cfg.num_experts

        def blob(expert: int) -> tuple[bytes, int]:
            data = self.layout.pack(self.expert_blob_tensors(source, expert))
            return data, crc32(data)

        with open(tmp, "wb") as f:
            for expert, (data, checksum) in enumerate(in_order(blob, range(self.cfg.num_experts), self.workers)):
                offsets.append(expert * blob_bytes)
                sizes.append(blob_bytes)
                sums.append(checksum)
                f.write(data)
                progress(per_expert)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dst / rel)
        state["layers"][str(layer)] = {"file": rel, "offsets": offsets, "sizes": sizes, "crc32": sums}
        self._save_state(state)

    def _copy_tokenizer(self, log) -> None:
        if self.gguf:  # a GGUF carries its config and vocabulary as metadata
            _write_atomic(self.dst / "config.json", json.dumps(self.raw_config, indent=1))
            problem = write_tokenizer(self.gguf, self.dst)
            if problem:
                log(problem)
            return
        for name in TOKENIZER_FILES:
            if (self.src / name).is_file():
                shutil.copyfile(self.src / name, self.dst / name)

    def _write_manifest(self, state: dict, resident_files: list[str]) -> None:
        source = {"path": self.options["source"], "format": "gguf" if self.gguf else "mlx" if self.mlx else "safetensors",
                  "left_out": {k: {"tensors": v[0], "bytes": v[1]} for k, v in self.ckpt.left_out.items()}}
        if self.mlx:
            source["quantization"] = mlx_quantization(self.raw_config)
        if self.schemes:
            source["quantization"] = {"method": "compressed-tensors",
                                      "format": quantization_config(self.raw_config).get("format"),
                                      "schemes": [dataclasses.asdict(x) for x in self.schemes]}
        if self.mxfp4:
            source["quantization"] = {"method": "mxfp4"}
        if self.qweights:
            source["quantization"] = {"method": self.quantized_source.lower(), **dataclasses.asdict(self.qweights)}
        if self.quantized_source:
            source["experts"] = "repacked" if self.repack else "requantized"
        if self.gguf:  # the experts' ggml types, counted over tensors: repacked as they are, or requantized
            source["experts"] = "repacked" if self.repack else "requantized" if self.bits else "dequantized"
            repacked, requantized = self.ckpt.expert_types(self.repack)
            source.update({k: v for k, v in (("repacked_from", repacked), ("requantized_from", requantized)) if v})
        if self.fp8_block is not None:  # dequantized block by block as read; experts quantized to `bits`
            source["quantization"] = {"method": "fp8", "weight_block_size": list(self.fp8_block)}
            source["experts"] = "repacked" if self.repack else "requantized" if self.bits else "dequantized"
        if self.fp8_float is not None:
            source["quantization"] = {"method": "compressed-tensors", "format": "float-quantized",
                                      **dataclasses.asdict(self.fp8_float)}
            source["experts"] = "requantized" if self.bits else "dequantized"
        if self.bnb is not None:
            source["quantization"] = {"method": "bitsandbytes", **dataclasses.asdict(self.bnb)}
            source["experts"] = "requantized" if self.bits else "dequantized"
        resident = state["resident"]
        write_manifest(self.dst, self.cfg, self.bits, self.group_size, self.ckpt.info("model.embed_tokens.weight").dtype,
                       resident_files, sum(resident[f]["bytes"] for f in resident_files), self.layout,
                       {str(i): state["layers"][str(i)] for i in self.expert_sources}, source,
                       {f: resident[f]["crc32"] for f in resident_files}, self.scale_dtype, self.resident_quant)


def write_manifest(dst: Path, cfg: ModelConfig, bits: int | None, group_size: int, source_dtype: str,
                   resident_files: list[str], resident_bytes: int, layout: BlobLayout, layers: dict, source: dict,
                   resident_crc32: dict[str, int] | None = None, scale_dtype: torch.dtype = SCALE_DTYPE,
                   resident_quantized: dict[str, dict[str, int]] | None = None) -> None:
    """The manifest, written last and atomically: its presence is what makes a store complete. Its last key is the
    checksum of the rest (manifest.manifest_crc32)."""
    resident = {"files": resident_files, "bytes": resident_bytes,
                "file_bytes": {f: (dst / f).stat().st_size for f in resident_files}}
    if resident_crc32 is not None:  # whole-file checksums, which `flashmoe info --verify` compares
        resident["crc32"] = resident_crc32
    if resident_quantized:  # matrices kept quantized as the source had them (MLX)
        resident["quantized"] = resident_quantized
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": True,
        "created_by": f"flashmoe {__version__}",
        "architecture": cfg.architecture,
        "config": cfg.to_dict(),
        "quantization": {"bits": bits, "group_size": group_size if bits else None,
                         "scheme": scheme_of(bits, scale_dtype), "source_dtype": source_dtype,
                         "scale_dtype": scale_dtype_name(scale_dtype)},
        "resident": resident,
        "experts": {"blob_bytes": layout.blob_bytes, "segments": layout.to_json(), "layers": layers},
        "source": source,
    }
    manifest["manifest_crc32"] = manifest_crc32(manifest)
    _write_atomic(dst / MANIFEST, json.dumps(manifest, indent=1))


def convert(src: str | os.PathLike, dst: str | os.PathLike, bits: int | None | str = "auto", group_size: int | None = None,
            progress: Callable[[int], None] | None = None, log: Callable[[str], None] = lambda s: None,
            shard_bytes: int = DEFAULT_SHARD_BYTES, requantize: bool = False, revision: str | None = None) -> Path:
    """Convert a checkpoint folder (Hugging Face safetensors or mlx-lm's) into a flashmoe store. bits: "auto" (4-bit
    group 64 for a float source; an MLX source's own), 2/4/8, or None to keep a float source's dtype."""
    return Converter(Path(src), Path(dst), bits, group_size, shard_bytes, requantize, revision).run(progress, log)
