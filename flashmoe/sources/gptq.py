"""GPTQ checkpoints (`quantization_config.quant_method == "gptq"`: AutoGPTQ / GPTQModel exports, the `-GPTQ-Int4` and
`-GPTQ-Int8` releases).

A quantized Linear X is `X.qweight` (int32 [in * bits / 32, out]: codes packed along the input, little end first),
`X.qzeros` (int32 [groups, out * bits / 32], packed along the output), `X.scales` ([groups, out], fp16) and `X.g_idx`
(int32 [in]: each input's group): w[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o]. checkpoint_format "gptq"
(v1, AutoGPTQ's) stores each zero less one; "gptq_v2" as it is. With inputs in their own order (g_idx[i] =
i // group_size: desc_act false) a 4- or 8-bit weight is repacked as flashmoe's affine (affine_from_zeros): its codes
transposed into rows, scale as stored, bias = -zero * scale. A symmetric scheme's zeros are all 2^(bits-1), so its
bias is a power-of-two multiple of a stored value: exact, the import lossless; an asymmetric one's is rounded to the
scales' dtype (in fp16 within 2^-11 of it: at 4 bits under 1% of a quantization step, at 8 under 13%). Activation
order and 2-bit codes are dequantized as read.

GPTQModel's `dynamic` settings give modules their own bits, group size, symmetry and order, or leave them
unquantized ("-:" rules), by regular expressions over the module's name; read as vLLM reads them: the first rule that
re.match-es the name decides. Weights of one expert set or resident item with different schemes import as a float
source's would (requantized).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FlashMoeError
from ..quant import QuantizedTensor, pack
from .compressed import EXACT_SCALES, unpack_words
from .fp8 import quantization_config

PARTS = ("qweight", "qzeros", "scales", "g_idx")
QUANTIZE_CONFIG = "quantize_config.json"
FORMATS = ("gptq", "gptq_v2")
READ_BITS = (2, 4, 8)  # widths whose words hold whole codes (3-bit words run across each other: not read)
REPACKED_BITS = (4, 8)


@dataclass(frozen=True)
class GptqScheme:
    bits: int
    group_size: int  # -1: one group over the whole input
    desc_act: bool
    symmetric: bool
    v1: bool  # zeros stored less one
    dynamic: tuple = ()  # GPTQModel's per-module rules, in order: (pattern, its overrides as (field, value)s or None)

    def for_module(self, module: str) -> GptqScheme | None:
        """The scheme of the module named so in the checkpoint: the first `dynamic` rule that matches decides
        (None: left unquantized), else the checkpoint's."""
        for pattern, overrides in self.dynamic:
            if re.match(pattern, module):
                return None if overrides is None else dataclasses.replace(self, **dict(overrides), dynamic=())
        return self


def with_quantize_config(raw: dict, folder: Path) -> dict:
    """config.json's fields, with an older AutoGPTQ export's quantize_config.json beside it (TheBloke's releases keep
    their GPTQ settings there, not in config.json) as its quantization_config."""
    path = folder / QUANTIZE_CONFIG
    if quantization_config(raw) is not None or not path.is_file():
        return raw
    try:
        q = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlashMoeError(f"cannot read {path}: {exc}") from None
    return {**raw, "quantization_config": {"quant_method": "gptq", **q}}


def gptq_scheme(raw: dict, where: str) -> GptqScheme | None:
    """config.json's GPTQ quantization_config as a scheme (None for another checkpoint); one clear line for what
    flashmoe does not read."""
    q = quantization_config(raw)
    if q is None or q.get("quant_method") != "gptq":
        return None
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise FlashMoeError(f"{where}: GPTQ checkpoint_format {fmt!r} is not read (flashmoe reads 'gptq' and "
                            "'gptq_v2'); convert the GPTQ or the original release instead")
    bits, group = q.get("bits"), q.get("group_size", -1)
    _check_width(bits, group, where)
    return GptqScheme(bits, group, bool(q.get("desc_act", False)), bool(q.get("sym", True)), fmt == "gptq",
                      _dynamic_rules(q.get("dynamic"), where))


def _check_width(bits, group, where: str) -> None:
    if bits not in READ_BITS:
        raise FlashMoeError(f"{where}: GPTQ at {bits!r} bits is not read (flashmoe reads 2, 4 and 8); convert the "
                            "original release instead")
    if type(group) is not int or not (group == -1 or group > 0):
        raise FlashMoeError(f"{where}: GPTQ group_size {group!r} is not a positive integer or -1")


def _dynamic_rules(dynamic, where: str) -> tuple:
    """GPTQModel's `dynamic` ({pattern: overrides}; "-:pattern" leaves a module unquantized, "+:" or no prefix
    overrides its bits, group_size, sym, desc_act; other keys say how it was quantized, not how it is stored) as
    GptqScheme.dynamic."""
    if not dynamic:
        return ()
    if not isinstance(dynamic, dict):
        raise FlashMoeError(f"{where}: GPTQ dynamic is {type(dynamic).__name__}, not an object of rules")
    fields = {"bits": "bits", "group_size": "group_size", "sym": "symmetric", "desc_act": "desc_act"}
    rules = []
    for key, overrides in dynamic.items():
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        try:
            re.compile(pattern)
        except re.error as exc:
            raise FlashMoeError(f"{where}: GPTQ dynamic rule {key!r} is not a regular expression ({exc})") from None
        if key.startswith("-:"):
            rules.append((pattern, None))
            continue
        if not isinstance(overrides, dict):
            raise FlashMoeError(f"{where}: GPTQ dynamic rule {key!r} holds {overrides!r}, not an object of settings")
        kept = {fields[k]: (bool(v) if k in ("sym", "desc_act") else v) for k, v in overrides.items() if k in fields}
        if "bits" in kept or "group_size" in kept:
            _check_width(kept.get("bits", READ_BITS[-1]), kept.get("group_size", -1), f"{where}, dynamic rule {key!r}")
        rules.append((pattern, tuple(kept.items())))
    return tuple(rules)


def affine_from_zeros(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, group: int
                      ) -> QuantizedTensor:
    """Codes [out, in] with integer zeros and scales [groups, out] (w = (q - zero) * scale) as flashmoe's affine
    matrix: scale as stored, bias = -zero * scale in the scales' dtype (exact for a power-of-two zero)."""
    s = scales.t().contiguous()
    bias = (-(zeros.t().float() * s.float())).to(s.dtype)
    return QuantizedTensor(pack(codes, bits), s, bias.contiguous(), bits, group)


def weights_from_zeros(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor
                       ) -> torch.Tensor:
    """The float [out, in] weight of codes [out, in] with zeros and scales [groups, out], input i in group groups[i],
    in the scales' dtype."""
    z, s = zeros.t(), scales.float().t()
    return ((codes.float() - z[:, groups]) * s[:, groups]).to(scales.dtype)


@dataclass
class GptqTensor:
    """One GPTQ weight's parts (TensorInfos inside the files) and the checkpoint's scheme; [out, in] = shape."""
    qweight: object
    qzeros: object
    scales: object
    g_idx: object | None
    scheme: GptqScheme
    shape: tuple[int, int]

    @property
    def group(self) -> int:
        return self.shape[1] if self.scheme.group_size == -1 else self.scheme.group_size

    @property
    def parts(self) -> tuple:
        return self.qweight, self.qzeros, self.scales, self.g_idx

    def repackable(self) -> bool:
        s = self.scheme
        return (not s.desc_act and s.bits in REPACKED_BITS and self.scales.dtype in EXACT_SCALES
                and self.shape[1] % self.group == 0)

    def codes(self, qweight: torch.Tensor) -> torch.Tensor:
        """uint8 codes [out, in]: the words unpacked along the input, then transposed into rows."""
        return unpack_words(qweight.t().contiguous(), self.scheme.bits, self.shape[1])

    def zeros(self, qzeros: torch.Tensor) -> torch.Tensor:
        """float [groups, out], the stored offset undone."""
        z = unpack_words(qzeros, self.scheme.bits, self.shape[0]).float()
        return z + 1 if self.scheme.v1 else z

    def quantized(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None) -> QuantizedTensor:
        """A weight in input order as flashmoe's affine (the order, and a symmetric scheme's zeros, checked here)."""
        bits, cols = self.scheme.bits, self.shape[1]
        middle = 1 << (bits - 1)
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(cols) // self.group):
            raise FlashMoeError(f"GPTQ tensor {self.qweight.source_name}: its g_idx is not the input order, though "
                                "config.json says desc_act false: the checkpoint does not match its config")
        zeros = self.zeros(qzeros)
        if self.scheme.symmetric and not torch.all(zeros == middle):
            raise FlashMoeError(f"GPTQ tensor {self.qweight.source_name}: its zeros are not {middle}, though "
                                "config.json says sym true: the checkpoint does not match its config")
        return affine_from_zeros(self.codes(qweight), zeros, scales, bits, self.group)

    def dequantize(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor | None) -> torch.Tensor:
        """The float [out, in] weight, in the scales' dtype: any zeros, any input order."""
        groups = g_idx.long() if g_idx is not None else torch.arange(self.shape[1]) // self.group
        return weights_from_zeros(self.codes(qweight), self.zeros(qzeros), scales, groups)


def check_parts(name: str, parts: dict, scheme: GptqScheme) -> tuple[int, int]:
    """The [out, in] shape a GPTQ weight's parts hold, or one clear line on what does not fit."""
    qweight, qzeros, scales, g_idx = (parts.get(p) for p in PARTS)
    missing = [p for p in PARTS[:3] if parts.get(p) is None]
    if missing:
        raise FlashMoeError(f"GPTQ tensor {name}.qweight has no {name}.{missing[0]} beside it: the checkpoint is "
                            "incomplete")
    per_word = 32 // scheme.bits
    cols, rows = qweight.shape[0] * per_word, qweight.shape[1]
    group = cols if scheme.group_size == -1 else scheme.group_size
    groups = -(-cols // group)
    if (qweight.dtype != "I32" or qzeros.dtype != "I32" or len(qweight.shape) != 2
            or scales.shape != (groups, rows) or qzeros.shape != (groups, -(-rows // per_word))
            or (g_idx is not None and g_idx.shape != (cols,))):
        raise FlashMoeError(f"GPTQ tensor {name}: qweight {qweight.dtype}{list(qweight.shape)}, qzeros "
                            f"{qzeros.dtype}{list(qzeros.shape)}, scales {list(scales.shape)} do not hold a weight at "
                            f"{scheme.bits} bits in groups of {scheme.group_size}: config.json's quantization_config "
                            "does not match the file")
    return rows, cols
