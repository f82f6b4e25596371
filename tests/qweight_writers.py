"""GPTQ and AWQ checkpoints from a tiny float one, packed as AutoGPTQ and AutoAWQ pack them (the writers of the
`-GPTQ-Int4` and `-AWQ` releases).

`pack` is AutoGPTQ 0.7.1's `QuantLinear.pack` (auto_gptq/nn_modules/qlinear/qlinear_exllama.py and qlinear_cuda_old.py,
MIT License, Copyright (c) 2023 潘其威(William)), and `find_params` its `Quantizer.find_params` without the MSE
search (auto_gptq/quantization/quantizer.py); `awq_pack` is AutoAWQ 0.2.9's `WQLinear_GEMM.from_linear`
(awq/modules/linear/gemm.py, MIT License, Copyright (c) 2023 MIT HAN Lab) and `awq_params` its
`AwqQuantizer.pseudo_quantize_tensor` with zero points (awq/quantize/quantizer.py). They are kept line for line where
they compute, so that the bytes are theirs; neither library installs here without its CUDA build and training
dependencies. GPTQ's error-compensating updates and AWQ's activation-aware scaling are left out: they choose other
codes and weights, not another layout, and each weight is first replaced by its quantized value (as both leave it)
so that packing recovers the codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from conftest import weights_elsewhere
from safetensors.torch import save_file


def quantized_linear(name: str, t: torch.Tensor) -> bool:
    """Whether a tensor is a decoder layer's Linear weight both writers quantize: not a router, and of a multiple of
    32 outputs (the tiny models' 4-output DeltaNet gates stay float: AutoGPTQ sizes qzeros as outputs // 32 * bits
    words, none for those, and AutoAWQ likewise)."""
    module = name.removesuffix(".weight")
    return (".layers." in name and name.endswith(".weight") and t.dim() == 2 and t.shape[0] % 32 == 0
            and not module.endswith(("mlp.gate", "shared_expert_gate")) and "norm" not in module)


def find_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [rows, cols]: (scale, zero), Quantizer.find_params(x, weight=True) with perchannel, no mse."""
    maxq = torch.tensor(2 ** bits - 1)
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def pack(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int) -> dict:
    """QuantLinear.pack for a Linear weight W [out, in] with scales and zeros [out, groups] (the layer's per-group
    parameters stacked as GPTQ stacks them): qweight, qzeros, scales (fp16), g_idx."""
    infeatures = W.shape[1]
    scales = scales.t().contiguous()
    zeros = zeros.t().contiguous()
    scale_zeros = zeros * scales
    half_scales = scales.clone().half()
    intweight = []
    for idx in range(infeatures):
        intweight.append(
            torch.round((W[:, idx] + scale_zeros[g_idx[idx]]) / half_scales[g_idx[idx]]).to(torch.int)[:, None])
    intweight = torch.cat(intweight, dim=1)
    intweight = intweight.t().contiguous()
    intweight = intweight.numpy().astype(np.uint32)

    i = 0
    row = 0
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    while row < qweight.shape[0]:
        for j in range(i, i + (32 // bits)):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    qweight = qweight.astype(np.int32)

    zeros -= 1
    zeros = zeros.numpy().astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    i = 0
    col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + (32 // bits)):
            qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
        i += 32 // bits
        col += 1
    qzeros = qzeros.astype(np.int32)
    return {"qweight": torch.from_numpy(qweight), "qzeros": torch.from_numpy(qzeros), "scales": half_scales,
            "g_idx": g_idx.to(torch.int32)}


def quantize_linear(w: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool, seed: int
                    ) -> tuple[dict, torch.Tensor]:
    """One Linear as GPTQ leaves it: groups over the inputs (in a random activation order with desc_act), each
    weight replaced by its quantized value, then packed; and the float weight the packed parts stand for (with the
    fp16 scales the file keeps), computed here without unpacking anything."""
    w = w.float().clone()
    out_features, in_features = w.shape
    group = in_features if group_size == -1 else group_size
    order = (torch.randperm(in_features, generator=torch.Generator().manual_seed(seed)) if desc_act
             else torch.arange(in_features))
    g_idx = torch.empty(in_features, dtype=torch.long)
    g_idx[order] = torch.arange(in_features) // group
    groups = int(g_idx.max()) + 1
    scales, zeros = torch.empty(out_features, groups), torch.empty(out_features, groups)
    reference = torch.empty_like(w)
    maxq = 2 ** bits - 1
    for g in range(groups):
        cols = (g_idx == g).nonzero()[:, 0]
        scale, zero = find_params(w[:, cols], bits, sym)
        q = torch.clamp(torch.round(w[:, cols] / scale[:, None]) + zero[:, None], 0, maxq)
        w[:, cols] = scale[:, None] * (q - zero[:, None])
        reference[:, cols] = scale.half().float()[:, None] * (q - zero[:, None])
        scales[:, g], zeros[:, g] = scale, zero
    return pack(w, scales, zeros, g_idx, bits), reference


def gptq_checkpoint(src: Path, dst: Path, reference: Path, bits: int = 4, group_size: int = 32, sym: bool = True,
                    desc_act: bool = False, checkpoint_format: str = "gptq", quantize_config_json: bool = False,
                    dynamic: dict | None = None) -> Path:
    """The tiny checkpoint at src as a GPTQ export at dst: every Linear of the decoder layers quantized but the
    routers, the embedding and head kept float; config.json's quantization_config as AutoGPTQ writes it.
    checkpoint_format "gptq_v2" stores the zeros without v1's -1. At `reference`, the float checkpoint of the weights
    the export stands for (float32), for transformers to run. quantize_config_json: the settings in
    quantize_config.json instead, as older AutoGPTQ exports keep them (config.json then has none). dynamic:
    GPTQModel's per-module rules, applied as GPTQModel applies them (the first pattern that re.match-es a module's
    name: "-:" keeps it float, else its settings override the defaults)."""
    tensors = weights_elsewhere(src, dst, reference)
    out, ref = {}, {}
    for n, (name, t) in enumerate(sorted(tensors.items())):
        module = name.removesuffix(".weight")
        own = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
        for pattern, settings in (dynamic or {}).items():
            if re.match(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern, module):
                own = None if pattern.startswith("-:") else {**own, **settings}
                break
        if not quantized_linear(name, t) or own is None:
            out[name], ref[name] = t, t.float()
            continue
        parts, ref[name] = quantize_linear(t, own["bits"], own["group_size"], own["sym"], own["desc_act"], seed=n)
        if checkpoint_format == "gptq_v2":  # zeros as they are: repack the v1 words with one added back
            from flashmoe.sources.compressed import unpack_words
            rows, width = t.shape[0], own["bits"]
            z = unpack_words(parts["qzeros"], width, rows).to(torch.int64) + 1
            words = np.zeros((z.shape[0], parts["qzeros"].shape[1]), dtype=np.uint32)
            for j in range(rows):
                words[:, j * width // 32] |= (z[:, j].numpy().astype(np.uint32) << (width * (j % (32 // width))))
            parts["qzeros"] = torch.from_numpy(words.astype(np.int32))
        for part, value in parts.items():
            out[f"{module}.{part}"] = value.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, str(reference / "model.safetensors"), metadata={"format": "pt"})
    settings = {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act,
                "static_groups": False, "sym": sym, "true_sequential": True, "model_name_or_path": None,
                "model_file_base_name": "model"}
    if quantize_config_json:
        (dst / "quantize_config.json").write_text(json.dumps(settings, indent=2))
        return dst
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {**settings, "quant_method": "gptq", "checkpoint_format": checkpoint_format,
                                  **({"dynamic": dynamic} if dynamic else {})}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def awq_params(w: torch.Tensor, group_size: int, w_bit: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pseudo_quantize_tensor with zero points: (the weight as quantized, scales [out, groups], zeros [out, groups])."""
    org_w_shape = w.shape
    w = w.reshape(-1, group_size)
    max_val = w.amax(dim=1, keepdim=True)
    min_val = w.amin(dim=1, keepdim=True)
    max_int = 2**w_bit - 1
    min_int = 0
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    zeros = zeros.view(org_w_shape[0], -1)
    scales = scales.view(org_w_shape[0], -1)
    w = w.reshape(org_w_shape)
    return w, scales, zeros


def awq_pack(weight: torch.Tensor, group_size: int, scales: torch.Tensor, zeros: torch.Tensor, w_bit: int = 4) -> dict:
    """WQLinear_GEMM.from_linear for a Linear weight [out, in], scales and zeros [groups, out] (the quantizer's,
    transposed as AutoAWQ passes them): qweight, qzeros, scales (fp16)."""
    in_features = weight.shape[1]
    scale_zeros = zeros * scales
    half_scales = scales.clone().half()
    pack_num = 32 // w_bit
    intweight = []
    for idx in range(in_features):
        intweight.append(
            torch.round((weight[:, idx] + scale_zeros[idx // group_size]) / half_scales[idx // group_size]
                        ).to(torch.int)[:, None])
    intweight = torch.cat(intweight, dim=1)
    intweight = intweight.t().contiguous()
    intweight = intweight.to(dtype=torch.int32)
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(intweight.shape[1] // pack_num):
        order_map = [0, 2, 4, 6, 1, 3, 5, 7]
        for i in range(pack_num):
            qweight_col = intweight[:, col * pack_num + order_map[i]]
            qweight[:, col] |= qweight_col << (i * w_bit)
    zeros = zeros.to(dtype=torch.int32)
    qzeros = torch.zeros((zeros.shape[0], zeros.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(zeros.shape[1] // pack_num):
        order_map = [0, 2, 4, 6, 1, 3, 5, 7]
        for i in range(pack_num):
            qzero_col = zeros[:, col * pack_num + order_map[i]]
            qzeros[:, col] |= qzero_col << (i * w_bit)
    return {"qweight": qweight, "qzeros": qzeros, "scales": half_scales}


def awq_checkpoint(src: Path, dst: Path, reference: Path, group_size: int = 32, version: str = "gemm") -> Path:
    """The tiny checkpoint at src as an AutoAWQ export at dst (every Linear of the decoder layers at 4 bits with zero
    points but the routers and those of fewer than 32 outputs), and at `reference` the float weights it stands for."""
    tensors = weights_elsewhere(src, dst, reference)
    out, ref = {}, {}
    for name, t in sorted(tensors.items()):
        module = name.removesuffix(".weight")
        if not quantized_linear(name, t):
            out[name], ref[name] = t, t.float()
            continue
        w, scales, zeros = awq_params(t.float(), group_size)
        parts = awq_pack(w, group_size, scales.t().contiguous(), zeros.t().contiguous())
        for part, value in parts.items():
            out[f"{module}.{part}"] = value.contiguous()
        groups = torch.arange(t.shape[1]) // group_size  # the float weight: codes against the fp16 scales kept
        codes = torch.clamp(torch.round(w / scales[:, groups]) + zeros[:, groups], 0, 15)
        ref[name] = (codes - zeros[:, groups]) * scales.half().float()[:, groups]
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, str(reference / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4,
                                  "version": version, "modules_to_not_convert": None}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst
