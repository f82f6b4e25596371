"""A store's manifest.json checked at load (docs/FORMAT.md, Validation): every field's type and range, the blob
layout the config implies, and the files the manifest points into. A damaged or hand-edited store fails with one
line naming the field, never with a traceback; an edit that leaves every value plausible fails the manifest's checksum.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import torch
from pathlib import Path
from dataclasses import MISSING, fields
from typing import Any, Callable, get_args, get_origin, get_type_hints

from safetensors import safe_open

from .config import ModelConfig, is_json_type
from .models import FAMILIES, family_of
from .errors import FlashMoeError
from .quant import SUPPORTED_BITS
from .store import (BLOCK_BYTES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, SCALE_DTYPES, SOURCE_DTYPES, BlobLayout, crc32,
                    dtype_name, expert_file_name, expert_layout, quantized_parts, scheme_of)

LAYER_TYPES = ("linear_attention", "full_attention", "sliding_attention")
RESIDENT_FILE = re.compile(r"resident-[0-9]+(-of-[0-9]+)?\.safetensors")  # a bare name: nothing outside the store
UINT32 = 1 << 32
AGAIN = "convert the checkpoint again"


def manifest_crc32(manifest: dict) -> int:
    """CRC-32 of the manifest's canonical JSON without its own checksum: any edit shows, even of one float."""
    body = {k: v for k, v in manifest.items() if k != "manifest_crc32"}
    return crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def read_manifest(path: Path) -> dict:
    """The manifest of a complete store of this format version, its checksum checked where it has one."""
    if not path.exists():
        raise FlashMoeError(f"store {path} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        hint = " (an interrupted conversion: run flashmoe convert again to resume)" if (path / "convert-state.json").exists() else ""
        raise FlashMoeError(f"{path} is not a complete flashmoe store: no {MANIFEST}{hint}")
    try:
        text = manifest_path.read_bytes()  # json decodes it: bytes that are not UTF-8 are then a ValueError too
    except OSError as exc:
        raise FlashMoeError(f"cannot read {manifest_path}: {exc.strerror or exc}") from None
    try:
        m = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FlashMoeError(f"corrupt store: {manifest_path} is not valid JSON ({exc})") from None
    if type(m) is not dict or m.get("format") != FORMAT_NAME:
        raise FlashMoeError(f"{manifest_path} is not a flashmoe manifest")
    version = m.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise FlashMoeError(f"store format version {_show(version)} is not supported by this flashmoe (it reads version "
                            f"{FORMAT_VERSION}); {AGAIN}")
    if m.get("complete") is not True:
        raise FlashMoeError(f"{path} is incomplete: run flashmoe convert again to resume")
    if "manifest_crc32" in m and (type(m["manifest_crc32"]) is not int or m["manifest_crc32"] != manifest_crc32(m)):
        raise FlashMoeError(f"corrupt store: {MANIFEST} fails its checksum (damaged or edited); {AGAIN}")
    return m


def validate_manifest(m: dict, path: Path) -> tuple[ModelConfig, BlobLayout]:
    """Every field of a manifest, and the files it names; returns the config and the experts' blob layout. Keys this
    version does not know are ignored: a later writer of format 1 may add optional ones."""
    for key, hint in (("architecture", str), ("config", dict), ("quantization", dict), ("resident", dict),
                      ("experts", dict), ("source", dict)):  # source records the checkpoint for people; nothing reads it
        _get(m, key, key, hint)
    if "created_by" in m:
        _get(m, "created_by", "created_by", str)
    cfg = _config(m["config"])
    if m["architecture"] != cfg.architecture:
        raise _bad("architecture", f"is {_show(m['architecture'])} but config.architecture is {cfg.architecture!r}")
    bits, group_size, scale_dtype = _quantization(m["quantization"], cfg)
    layout = _experts(m["experts"], cfg, bits, group_size, scale_dtype, path)
    _resident(m["resident"], cfg, path)
    return cfg, layout


# ---- helpers: one line naming the field ------------------------------------------------------------
def _bad(field: str, problem: str) -> FlashMoeError:
    return FlashMoeError(f"corrupt store: manifest field {field}: {problem}; {AGAIN}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _typed(value: Any, hint: Any, field: str) -> Any:
    if not is_json_type(value, hint):
        raise _bad(field, f"should be {hint.__name__ if isinstance(hint, type) else hint}, not {_show(value)}")
    if get_origin(hint) is list:  # name the entry that is wrong
        for i, v in enumerate(value):
            _typed(v, get_args(hint)[0], f"{field}[{i}]")
    return value


def _get(obj: dict, key: str, field: str, hint: Any) -> Any:
    if key not in obj:
        raise _bad(field, "is missing")
    return _typed(obj[key], hint, field)


def _same(have: Any, want: Any, field: str) -> None:
    """Raise at the first place where `have` differs from `want`, exactly as JSON tells values apart."""
    if type(have) is dict and type(want) is dict:
        for key in want:
            if key not in have:
                raise _bad(f"{field}.{key}", "is missing")
            _same(have[key], want[key], f"{field}.{key}")
    elif type(have) is list and type(want) is list and len(have) == len(want):
        for i, (h, w) in enumerate(zip(have, want)):
            _same(h, w, f"{field}[{i}]")
    elif type(have) is not type(want) or have != want:
        raise _bad(field, f"is {_show(have)}, but the config and quantization imply {_show(want)}")


def _numbers(entry: dict, key: str, field: str, count: int, ok: Callable[[int], bool], why: str) -> list[int]:
    values = _get(entry, key, f"{field}.{key}", list)
    if len(values) != count:
        raise _bad(f"{field}.{key}", f"has {len(values)} entries for {count} experts")
    for i, v in enumerate(values):
        if type(v) is not int or not ok(v):
            raise _bad(f"{field}.{key}[{i}]", f"is {_show(v)}, {why}")
    return values


def _corrupt(problem: str) -> FlashMoeError:
    return FlashMoeError(f"corrupt store: {problem}; {AGAIN}")


# ---- the sections ------------------------------------------------------------------------------------
def _config(data: dict) -> ModelConfig:
    hints = get_type_hints(ModelConfig)
    optional = {f.name for f in fields(ModelConfig) if f.default is not MISSING or f.default_factory is not MISSING}
    # a field added after a store was written is absent from its manifest: the default stands
    values = {name: _get(data, name, f"config.{name}", hint) for name, hint in hints.items()
              if name in data or name not in optional}
    cfg = ModelConfig(**{k: float(v) if hints[k] is float else v for k, v in values.items()})
    if cfg.architecture not in FAMILIES:
        raise _bad("config.architecture", f"is {cfg.architecture!r}; flashmoe reads {', '.join(FAMILIES)}")
    family = family_of(cfg.architecture).ARCHITECTURES[cfg.architecture]
    if cfg.family != family:
        raise _bad("config.family", f"is {cfg.family!r}, but {cfg.architecture} is {family!r}")
    if cfg.hidden_act != "silu":
        raise _bad("config.hidden_act", f"is {cfg.hidden_act!r}; flashmoe runs silu")
    recurrent = "linear_attention" in cfg.layer_types
    # sizes a config has are >= 1, those it may lack >= 0; the conv keeps kernel - 1 >= 1 past inputs
    least = {name: 0 for name in optional} | {"n_group": 1, "topk_group": 1}
    if recurrent:
        least.update(dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                                    "linear_num_value_heads"), 1), linear_conv_kernel_dim=2)
    for name, hint in hints.items():
        if hint is int and getattr(cfg, name) < least.get(name, 1):
            raise _bad(f"config.{name}", f"is {getattr(cfg, name)}, below {least.get(name, 1)}")
    pairs = [("num_attention_heads", "num_key_value_heads")]
    if recurrent:
        pairs.append(("linear_num_value_heads", "linear_num_key_heads"))
    for heads, groups in pairs:
        if getattr(cfg, heads) % getattr(cfg, groups):
            raise _bad(f"config.{groups}", f"{getattr(cfg, groups)} does not divide {heads} {getattr(cfg, heads)}")
    if cfg.num_experts % cfg.n_group or not 1 <= cfg.topk_group <= cfg.n_group:
        raise _bad("config.n_group", f"{cfg.n_group} groups of {cfg.num_experts} experts, {cfg.topk_group} of them kept: "
                                     "the groups must divide the experts and keep at least one")
    if not 0 < cfg.routed_scaling_factor < math.inf:
        raise _bad("config.routed_scaling_factor", f"is {cfg.routed_scaling_factor}, not a finite number above 0")
    if cfg.num_experts_per_tok > cfg.num_experts:
        raise _bad("config.num_experts_per_tok", f"is {cfg.num_experts_per_tok}, more than num_experts {cfg.num_experts}")
    # comparisons written so that NaN fails them too
    if not 0 < cfg.rms_norm_eps < 1:
        raise _bad("config.rms_norm_eps", f"is {cfg.rms_norm_eps}, outside (0, 1)")
    if not 1 < cfg.rope_theta < math.inf:  # at or below 1, RoPE's frequencies would grow along the head
        raise _bad("config.rope_theta", f"is {cfg.rope_theta}, not a finite number above 1")
    if not (0 < cfg.partial_rotary_factor <= 1 and cfg.rotary_dim >= 2 and cfg.rotary_dim % 2 == 0):
        raise _bad("config.partial_rotary_factor", f"is {cfg.partial_rotary_factor}, which rotates {cfg.rotary_dim} "
                                                   f"of head_dim {cfg.head_dim} (RoPE needs an even number >= 2)")
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise _bad("config.layer_types", f"has {len(cfg.layer_types)} entries for {cfg.num_hidden_layers} layers")
    for i, kind in enumerate(cfg.layer_types):
        if kind not in LAYER_TYPES:
            raise _bad(f"config.layer_types[{i}]", f"is {kind!r}, not one of {', '.join(LAYER_TYPES)}")
    dense = cfg.dense_layers
    if dense != sorted(set(dense)) or not all(0 <= i < cfg.num_hidden_layers for i in dense):
        raise _bad("config.dense_layers", f"is {_show(dense)}, not increasing layer numbers below {cfg.num_hidden_layers}")
    if not cfg.moe_layers:
        raise _bad("config.dense_layers", "leaves no MoE layer")
    if dense and not cfg.intermediate_size:
        raise _bad("config.intermediate_size", "is 0, but the config has dense MLP layers")
    for i, token in enumerate(cfg.eos_token_id):
        if not 0 <= token < cfg.vocab_size:
            raise _bad(f"config.eos_token_id[{i}]", f"is {token}, outside the vocabulary (0..{cfg.vocab_size - 1})")
    return cfg


def _quantization(q: dict, cfg: ModelConfig) -> tuple[int | None, int | None, torch.dtype]:
    bits = _get(q, "bits", "quantization.bits", int | None)
    group_size = _get(q, "group_size", "quantization.group_size", int | None)
    scheme = _get(q, "scheme", "quantization.scheme", str | None)
    source_dtype = _get(q, "source_dtype", "quantization.source_dtype", str)
    if bits is not None and bits not in SUPPORTED_BITS:
        raise _bad("quantization.bits", f"is {bits}; flashmoe reads {', '.join(map(str, SUPPORTED_BITS))} or null (unquantized)")
    if (scheme not in (("affine", "mxfp4", "fp8") if bits else (None,)) or (scheme == "mxfp4" and (bits, group_size) != (4, 32))
            or (scheme == "fp8" and bits != 8)):
        raise _bad("quantization.scheme", f"is {_show(scheme)} with bits {bits}; flashmoe knows 'affine' (bits 2, 4 or 8), "
                                          "'mxfp4' (bits 4, group 32), 'fp8' (bits 8) and null (bits null)")
    if bits is None and group_size is not None:
        raise _bad("quantization.group_size", f"is {group_size}, but an unquantized store has null")
    if bits is not None:
        if group_size is None or group_size <= 0 or group_size % 8:
            raise _bad("quantization.group_size", f"is {group_size}, not a positive multiple of 8")
        for name in ("hidden_size", "moe_intermediate_size"):
            if getattr(cfg, name) % group_size:
                raise _bad("quantization.group_size", f"{group_size} does not divide config.{name} {getattr(cfg, name)}")
    if source_dtype not in SOURCE_DTYPES:
        raise _bad("quantization.source_dtype", f"is {source_dtype!r}, not one of {', '.join(SOURCE_DTYPES)}")
    scale_dtype = _get(q, "scale_dtype", "quantization.scale_dtype", str) if "scale_dtype" in q else "float16"
    if scale_dtype not in SCALE_DTYPES:  # absent in stores written before MLX imports: float16
        raise _bad("quantization.scale_dtype", f"is {scale_dtype!r}, not one of {', '.join(SCALE_DTYPES)}")
    if bits and scheme_of(bits, SCALE_DTYPES[scale_dtype]) != scheme:
        raise _bad("quantization.scale_dtype", f"is {scale_dtype!r} in a store of scheme {scheme!r}: e8m0 is MXFP4's "
                                               "alone, float32 FP8's")
    return bits, group_size, SCALE_DTYPES[scale_dtype]


def _experts(e: dict, cfg: ModelConfig, bits: int | None, group_size: int | None, scale_dtype: torch.dtype,
             path: Path) -> BlobLayout:
    blob_bytes = _get(e, "blob_bytes", "experts.blob_bytes", int)
    segments = _get(e, "segments", "experts.segments", list)
    layers = _get(e, "layers", "experts.layers", dict)
    dtype = None
    if bits is None:  # unquantized experts keep their source dtype, which only the segments record
        floats = {dtype_name(t): t for t in SOURCE_DTYPES.values()}
        first = segments[0] if segments and type(segments[0]) is dict else {}
        dtype = floats.get(first.get("dtype")) if type(first.get("dtype")) is str else None
        if dtype is None:
            raise _bad("experts.segments[0].dtype", f"should be one of {', '.join(floats)} in an unquantized store")
    layout = expert_layout(cfg, bits, group_size, dtype, scale_dtype)
    want = layout.to_json()
    if len(segments) != len(want):
        raise _bad("experts.segments", f"has {len(segments)} entries, but the config and quantization imply {len(want)}")
    _same(segments, want, "experts.segments")
    if blob_bytes != layout.blob_bytes:
        raise _bad("experts.blob_bytes", f"is {blob_bytes}, but the segments make {layout.blob_bytes}")
    moe_layers = {str(i) for i in cfg.moe_layers}
    for key in layers:
        if key not in moe_layers:
            raise _bad("experts.layers", f"has an entry {_show(key)}, which is not a MoE layer of the config")
    for layer in cfg.moe_layers:
        _layer(_get(layers, str(layer), f"experts.layers.{layer}", dict), layer, cfg.num_experts, blob_bytes, path)
    return layout


def _layer(entry: dict, layer: int, num_experts: int, blob_bytes: int, path: Path) -> None:
    field = f"experts.layers.{layer}"
    name = _get(entry, "file", f"{field}.file", str)
    if name != expert_file_name(layer):
        raise _bad(f"{field}.file", f"is {_show(name)}; layer {layer}'s experts live in {expert_file_name(layer)!r}")
    offsets = _numbers(entry, "offsets", field, num_experts, lambda o: o >= 0 and o % BLOCK_BYTES == 0,
                       f"not a multiple of {BLOCK_BYTES} (blobs are block aligned)")
    _numbers(entry, "sizes", field, num_experts, lambda s: s == blob_bytes, f"not the blob size {blob_bytes}")
    _numbers(entry, "crc32", field, num_experts, lambda c: 0 <= c < UINT32, "not a CRC-32")
    order = sorted(range(num_experts), key=offsets.__getitem__)
    for before, after in zip(order, order[1:]):
        if offsets[after] < offsets[before] + blob_bytes:
            raise _bad(f"{field}.offsets[{after}]", f"is {offsets[after]}, inside expert {before}'s blob at {offsets[before]}")
    f = path / name
    if not f.is_file():
        raise _corrupt(f"expert file {name} (layer {layer}) is missing")
    need, size = max(offsets) + blob_bytes, f.stat().st_size
    if size < need:
        raise _corrupt(f"{name} is {size} bytes but layer {layer}'s experts need {need}")


def _resident(r: dict, cfg: ModelConfig, path: Path) -> None:
    files = _get(r, "files", "resident.files", list[str])
    if not files:
        raise _bad("resident.files", "is empty")
    for i, name in enumerate(files):
        if not RESIDENT_FILE.fullmatch(name):
            raise _bad(f"resident.files[{i}]", f"is {_show(name)}, not the name of a resident shard")
        if name in files[:i]:
            raise _bad(f"resident.files[{i}]", f"repeats {name!r}")
        if not (path / name).is_file():
            raise _corrupt(f"resident file {name} is missing from {path}")
    nbytes = _get(r, "bytes", "resident.bytes", int)
    for key, ok, why in (("crc32", lambda v: 0 <= v < UINT32, "not a CRC-32"), ("file_bytes", lambda v: v >= 0, "not a size in bytes")):
        if key in r:  # both absent in stores written before they were added
            per_file = _get(r, key, f"resident.{key}", dict)
            if sorted(per_file) != sorted(files):
                raise _bad(f"resident.{key}", f"names {_show(sorted(per_file))}, not the resident files")
            for name, value in per_file.items():
                if type(value) is not int or not ok(value):
                    raise _bad(f"resident.{key}.{name}", f"is {_show(value)}, {why}")
    for name, want in r.get("file_bytes", {}).items():
        size = (path / name).stat().st_size
        if size != want:
            raise _corrupt(f"resident file {name} is {size} bytes, the manifest says {want} (truncated or overwritten)")
    _resident_tensors(files, nbytes, cfg, path, _resident_quantized(r, cfg))


def _resident_quantized(r: dict, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """resident.quantized: {matrix name: {bits, group_size}} for resident matrices kept quantized (MLX imports);
    absent when every resident tensor is float."""
    if "quantized" not in r:
        return {}
    shapes = family_of(cfg.architecture).resident_shapes(cfg)
    if cfg.tie_word_embeddings:
        shapes.setdefault("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    out = {}
    for name, entry in _get(r, "quantized", "resident.quantized", dict).items():
        field = f"resident.quantized.{name}"
        if len(shapes.get(name, ())) != 2:
            raise _bad(field, "names no resident matrix of the config")
        bits = _get(_typed(entry, dict, field), "bits", f"{field}.bits", int)
        group_size = _get(entry, "group_size", f"{field}.group_size", int)
        if bits not in SUPPORTED_BITS:
            raise _bad(f"{field}.bits", f"is {bits}; flashmoe reads {', '.join(map(str, SUPPORTED_BITS))}")
        if group_size <= 0 or shapes[name][1] % group_size or group_size * bits % 8:
            raise _bad(f"{field}.group_size", f"is {group_size}, which does not divide the input size {shapes[name][1]} "
                                              "in whole bytes")
        out[name] = (bits, group_size)
    return out


def _expected_resident(cfg: ModelConfig, quantized: dict[str, tuple[int, int]]) -> dict[str, tuple[tuple, tuple]]:
    """Store tensor name -> (shape, allowed safetensors dtypes): float matrices and vectors, or a quantized matrix's
    packed codes (uint8) with its scales and biases (float16 or bfloat16)."""
    floats, scales = tuple(SOURCE_DTYPES), ("F16", "BF16")
    want = {}
    for name, shape in family_of(cfg.architecture).resident_shapes(cfg).items():
        if name not in quantized:
            want[name] = (shape, floats)
            continue
        (rows, cols), (bits, group_size) = shape, quantized[name]
        packed, scale, bias = quantized_parts(name)
        want.update({packed: ((rows, cols * bits // 8), ("U8",)), scale: ((rows, cols // group_size), scales),
                     bias: ((rows, cols // group_size), scales)})
    return want


def _resident_tensors(files: list[str], nbytes: int, cfg: ModelConfig, path: Path,
                      quantized: dict[str, tuple[int, int]]) -> None:
    """Every tensor the model needs, in its shape and dtype, once; read from the safetensors headers only."""
    want = _expected_resident(cfg, quantized)
    optional = {}  # a tied head saved anyway
    if cfg.tie_word_embeddings:
        untied = _expected_resident(dataclasses.replace(cfg, tie_word_embeddings=False), quantized)
        optional = {n: v for n, v in untied.items() if n not in want}
    seen, total = {}, 0
    for name in files:
        try:
            with safe_open(str(path / name), "pt") as f:
                header = {key: (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())) for key in f.keys()}
        except Exception as exc:  # safetensors raises its own types for a damaged header
            raise _corrupt(f"cannot read resident file {name} ({' '.join(str(exc).split())})") from None
        for key, (dtype, shape) in header.items():
            expect = want.get(key, optional.get(key))
            if key in seen:
                raise _corrupt(f"resident tensor {key} is in both {seen[key]} and {name}")
            if expect is None:
                raise _corrupt(f"resident file {name} holds {key}, which the config has no place for")
            if shape != expect[0]:
                raise _corrupt(f"resident tensor {key} is {list(shape)}, but the config implies {list(expect[0])}")
            if dtype not in expect[1]:
                raise _corrupt(f"resident tensor {key} is {dtype}, not one of {', '.join(expect[1])}")
            seen[key] = name
            total += math.prod(shape) * (1 if dtype == "U8" else SOURCE_DTYPES[dtype].itemsize)
    missing = [key for key in want if key not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _corrupt(f"resident tensor {missing[0]}{more} is missing")
    if total != nbytes:
        raise _bad("resident.bytes", f"is {nbytes}, but the resident tensors hold {total}")
