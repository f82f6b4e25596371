"""Qwen3-Next and Qwen3.5-MoE: hybrid Gated DeltaNet / gated full attention decoder with a sparse MoE.

The math follows transformers' modeling_qwen3_next.py and modeling_qwen3_5_moe.py. The two families
differ only in how the DeltaNet input projection is laid out; the converter stores both in Qwen3.5's
split layout (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a), so one implementation serves both.
Routed experts are not here: the engine fetches them and calls kernels.moe with this file's router output.
Sequences are single (batch 1); tensors are [T, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig, config_value, rope_settings
from ..errors import FlashMoeError
from ..kernels import by_address, cpu_native, fused
from ..kernels.gated_delta import gated_delta_rule
from ..kernels.linear import cat_rows, linear
from ..kernels.moe import swiglu_mlp
from ..layers.attention import Attention, AttentionSpec, KVCache, rope_inv_freq
from ..layers.resident import ResidentWeights
from ..layers.state import SequenceState
from . import ResidentItem, end_shapes


def resident_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every resident tensor of a store and its shape, under the store's names (the DeltaNet input projection split
    as Qwen3.5 has it, whatever the family); lm_head only when the embeddings are untied. The converter plans from
    this and the store checks its files against it."""
    h, nv = cfg.hidden_size, cfg.linear_num_value_heads
    kd = cfg.linear_key_head_dim * cfg.linear_num_key_heads
    vd = cfg.linear_value_head_dim * nv
    shapes = end_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.layer_types[i] == "full_attention":
            a, nh, nkv, hd = p + "self_attn.", cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            shapes.update({a + "q_proj.weight": (nh * hd * 2, h),  # each head's queries, then its output gate
                           a + "k_proj.weight": (nkv * hd, h), a + "v_proj.weight": (nkv * hd, h),
                           a + "o_proj.weight": (h, nh * hd), a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
        else:
            a = p + "linear_attn."
            shapes.update({a + "in_proj_qkv.weight": (2 * kd + vd, h), a + "in_proj_z.weight": (vd, h),
                           a + "in_proj_b.weight": (nv, h), a + "in_proj_a.weight": (nv, h),
                           a + "conv1d.weight": (2 * kd + vd, 1, cfg.linear_conv_kernel_dim),
                           a + "dt_bias": (nv,), a + "A_log": (nv,), a + "norm.weight": (cfg.linear_value_head_dim,),
                           a + "out_proj.weight": (h, vd)})
        m = p + "mlp."
        if cfg.is_moe_layer(i):
            si = cfg.shared_expert_intermediate_size
            shapes.update({m + "gate.weight": (cfg.num_experts, h), m + "shared_expert.gate_proj.weight": (si, h),
                           m + "shared_expert.up_proj.weight": (si, h), m + "shared_expert.down_proj.weight": (h, si),
                           m + "shared_expert_gate.weight": (1, h)})
        else:
            di = cfg.intermediate_size
            shapes.update({m + "gate_proj.weight": (di, h), m + "up_proj.weight": (di, h), m + "down_proj.weight": (h, di)})
    return shapes


ARCHITECTURES = {  # architectures[0] -> checkpoint layout: they differ only in the DeltaNet input projection
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",  # the multimodal checkpoint: its text_config
    "Qwen3NextForCausalLM": "qwen3_next",
}


def config_from_hf(arch: str, raw: dict) -> ModelConfig:
    family = ARCHITECTURES[arch]
    t = raw.get("text_config", raw) if arch == "Qwen3_5MoeForConditionalGeneration" else raw
    outer = raw

    def get(key: str, kind: type, default=KeyError, source: dict = t):
        return config_value(source, key, kind, default)

    layers = get("num_hidden_layers", int)
    rope, rope_type = rope_settings(t)
    if rope_type not in ("default", "mrope"):
        raise FlashMoeError(f"rope type {rope_type!r} is not supported yet (only the default RoPE)")
    layer_types = t.get("layer_types")
    if layer_types is None:
        interval = get("full_attention_interval", int, 4)
        layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    elif not (isinstance(layer_types, list) and len(layer_types) == layers
              and set(layer_types) <= {"linear_attention", "full_attention"}):
        raise FlashMoeError(f"config.json: layer_types must list {layers} of 'linear_attention' or "
                            "'full_attention'")
    dense = []
    if family == "qwen3_next":
        step = get("decoder_sparse_step", int, 1)
        only = set(get("mlp_only_layers", list, []))
        dense = [i for i in range(layers) if i in only or (i + 1) % step != 0]
    eos = outer.get("eos_token_id", t.get("eos_token_id"))
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
    if not (isinstance(eos, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in eos)):
        raise FlashMoeError(f"config.json: eos_token_id is {eos!r}, not an id or a list of ids")
    tie = outer.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=get("vocab_size", int),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads", int),
        head_dim=get("head_dim", int, None) or hidden // max(heads, 1),
        rms_norm_eps=get("rms_norm_eps", float, 1e-6),
        rope_theta=get("rope_theta", float, get("rope_theta", float, 10000.0), rope),
        partial_rotary_factor=get("partial_rotary_factor", float, get("partial_rotary_factor", float, 0.25), rope),
        layer_types=list(layer_types),
        linear_conv_kernel_dim=get("linear_conv_kernel_dim", int, 4),
        linear_key_head_dim=get("linear_key_head_dim", int),
        linear_value_head_dim=get("linear_value_head_dim", int),
        linear_num_key_heads=get("linear_num_key_heads", int),
        linear_num_value_heads=get("linear_num_value_heads", int),
        num_experts=get("num_experts", int),
        num_experts_per_tok=get("num_experts_per_tok", int),
        moe_intermediate_size=get("moe_intermediate_size", int),
        shared_expert_intermediate_size=get("shared_expert_intermediate_size", int),
        # Qwen3.5's router always renormalises its top-K weights
        norm_topk_prob=get("norm_topk_prob", bool, True),
        tie_word_embeddings=bool(tie),
        max_position_embeddings=get("max_position_embeddings", int, 32768),
        hidden_act=get("hidden_act", str, "silu"),
        dense_layers=dense,
        intermediate_size=get("intermediate_size", int, None) or 0,
        eos_token_id=list(eos),
    )


def resident_sources(cfg: ModelConfig) -> list[ResidentItem]:
    """Qwen3-Next interleaves q, k, v, z per key-head group (and b, a); the store keeps them in Qwen3.5's split
    layout, so one DeltaNet implementation serves both. Every other resident tensor is stored as it is."""
    if cfg.family != "qwen3_next":
        return []
    nk, nv, hk, hv, hidden = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                              cfg.linear_value_head_dim, cfg.hidden_size)
    r = nv // nk

    def split(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rows only, so it serves a quantized matrix's codes, scales and biases alike."""
        qkvz, ba = ts
        cols = qkvz.shape[-1]
        w = qkvz.reshape(nk, 2 * hk + 2 * r * hv, cols)
        q, k, v, z = torch.split(w, [hk, hk, r * hv, r * hv], dim=1)
        qkv = torch.cat([q.reshape(-1, cols), k.reshape(-1, cols), v.reshape(-1, cols)])
        b, a = torch.split(ba.reshape(nk, 2 * r, ba.shape[-1]), [r, r], dim=1)
        return [qkv.contiguous(), z.reshape(-1, cols).contiguous(), b.reshape(-1, ba.shape[-1]).contiguous(),
                a.reshape(-1, ba.shape[-1]).contiguous()]

    items = []
    for i, kind in enumerate(cfg.layer_types):
        if kind == "linear_attention":
            p = f"model.layers.{i}.linear_attn."
            items.append(ResidentItem(
                {p + "in_proj_qkvz.weight": (nk * (2 * hk + 2 * r * hv), hidden), p + "in_proj_ba.weight": (2 * nv, hidden)},
                [p + "in_proj_qkv.weight", p + "in_proj_z.weight", p + "in_proj_b.weight", p + "in_proj_a.weight"],
                split))
    return items


# mlx-lm's sanitize() (models/qwen3_5.py, qwen3_next.py) stores these zero-centred norms as 1 + w
MLX_SHIFTED_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                     ".q_norm.weight", ".k_norm.weight")


def from_mlx(name: str, t: torch.Tensor) -> torch.Tensor:
    """A float tensor of an mlx-lm checkpoint as the HF checkpoint has it: mlx-lm moved the conv1d weight's kernel
    axis last-but-one ([C, K, 1]) and added 1 to the zero-centred norms (in float32 here: exact)."""
    if name.endswith("conv1d.weight") and t.dim() == 3 and t.shape[-1] == 1:
        return t.transpose(1, 2).contiguous()
    if name.endswith(MLX_SHIFTED_NORMS) and t.dim() == 1:
        return t.float() - 1.0
    return t


# llama.cpp's names (gguf-py's tensor map) -> the HF checkpoint's: whole-model, then per layer (blk.N. -> model.layers.N.)
GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
              "output_norm.weight": "model.norm.weight"}
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight", "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight", "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight", "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight", "ssm_a": "linear_attn.A_log", "ssm_dt.bias": "linear_attn.dt_bias",
    # Qwen3-Next: llama.cpp splits in_proj_qkvz into attn_qkv and attn_gate (Qwen3.5's layout) but keeps b and a
    # interleaved by key-head group; the two store tensors are cut from the one
    "ssm_ba.weight": ("linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"),
    "ffn_gate_inp.weight": "mlp.gate.weight", "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight", "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


def _tiled_to_grouped(t: torch.Tensor, dim: int, nk: int, r: int, width: int) -> torch.Tensor:
    """llama.cpp's Qwen3.5 converter tiles the value heads ([r][nk] instead of HF's [nk][r], each `width` wide)
    so ggml can broadcast them; this puts them back along `dim`."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], r, nk, width, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


def gguf_rows_only(cfg: ModelConfig, name: str) -> bool:
    """Whether from_gguf only moves whole rows of this matrix (so it may stay quantized): all but Qwen3.5's out_proj
    when its value heads were tiled (that one's columns move) and conv1d (a vector per channel, never quantized)."""
    tiled = cfg.family == "qwen3_5_moe" and cfg.linear_num_value_heads != cfg.linear_num_key_heads
    return not ((tiled and name.endswith("out_proj.weight")) or name.endswith("conv1d.weight"))


def from_gguf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor of llama.cpp's GGUF as the HF checkpoint has it (name: the HF name). Its converter
    (conversion/qwen.py) stored the zero-centred norms as 1 + w, A_log as -exp(A_log), conv1d squeezed to [C, K] and,
    for Qwen3.5, the value heads tiled; each is undone here (in float32: the norms' -1 is exact)."""
    if name.endswith(MLX_SHIFTED_NORMS) and t.dim() == 1:
        return t.float() - 1.0
    if name.endswith("shared_expert_gate.weight") and t.dim() == 1:
        return t.unsqueeze(0)
    if ".linear_attn." not in name:
        return t
    nk, nv, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_value_head_dim
    if name.endswith("A_log"):
        t = torch.log(-t.float())
    if name.endswith(("in_proj_b.weight", "in_proj_a.weight")) and t.shape[0] == 2 * nv:  # Qwen3-Next's ssm_ba
        ba = t.reshape(nk, 2, nv // nk, *t.shape[1:])
        t = ba[:, 0 if name.endswith("in_proj_b.weight") else 1].reshape(nv, *t.shape[1:])
    if cfg.family == "qwen3_5_moe" and nv != nk:
        r, qk_rows = nv // nk, 2 * cfg.linear_key_head_dim * nk
        if name.endswith(("A_log", "dt_bias", "in_proj_a.weight", "in_proj_b.weight")):
            t = _tiled_to_grouped(t, 0, nk, r, 1)
        elif name.endswith("in_proj_z.weight"):
            t = _tiled_to_grouped(t, 0, nk, r, hv)
        elif name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
            t = torch.cat([t[:qk_rows], _tiled_to_grouped(t[qk_rows:], 0, nk, r, hv)])
        elif name.endswith("out_proj.weight"):
            t = _tiled_to_grouped(t, 1, nk, r, hv)
    if name.endswith("conv1d.weight") and t.dim() == 2:
        t = t.unsqueeze(1)
    return t


def config_from_gguf(metadata: dict, names: tuple[str, ...]) -> dict:
    """config.json of a Qwen3-Next GGUF (`qwen3next`; transformers maps Qwen3.5's but not this one), from the keys
    llama.cpp's converter writes (conversion/qwen.py, Qwen3NextModel.set_gguf_parameters)."""
    arch = metadata["general.architecture"]

    def key(name: str):
        return metadata[f"{arch}.{name}"]

    head_dim, value_heads = key("attention.key_length"), key("ssm.time_step_rank")
    layers = key("block_count") - metadata.get(f"{arch}.nextn_predict_layers", 0)
    recurrent = metadata.get(f"{arch}.attention.recurrent_layers") or [
        (i + 1) % key("full_attention_interval") != 0 for i in range(layers)]
    return {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "hidden_size": key("embedding_length"), "num_hidden_layers": layers,
        "num_attention_heads": key("attention.head_count"), "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": head_dim, "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": key("context_length"),
        "rope_parameters": {"rope_type": "default", "rope_theta": key("rope.freq_base"),
                            "partial_rotary_factor": key("rope.dimension_count") / head_dim},
        "layer_types": ["linear_attention" if r else "full_attention" for r in recurrent[:layers]],
        "linear_conv_kernel_dim": key("ssm.conv_kernel"), "linear_key_head_dim": key("ssm.state_size"),
        "linear_num_key_heads": key("ssm.group_count"), "linear_num_value_heads": value_heads,
        "linear_value_head_dim": key("ssm.inner_size") // value_heads,
        "num_experts": key("expert_count"), "num_experts_per_tok": key("expert_used_count"),
        "moe_intermediate_size": key("expert_feed_forward_length"),
        "shared_expert_intermediate_size": key("expert_shared_feed_forward_length"),
        "intermediate_size": metadata.get(f"{arch}.feed_forward_length", 0), "norm_topk_prob": True,
        "vocab_size": metadata["tokenizer.ggml.tokens"], "tie_word_embeddings": "output.weight" not in names,
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"), "hidden_act": "silu",
    }


ZERO_CENTRED_NORMS = True  # RMSNorm weights store an offset from 1 (else the scale itself)
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expert_prefix(layer: int) -> str:
    """The checkpoint's routed experts of a layer: PREFIX{e}.gate_proj.weight ... or fused PREFIXgate_up_proj."""
    return f"model.layers.{layer}.mlp.experts."


def describe(cfg: ModelConfig) -> list[tuple[str, str]]:
    full = cfg.layer_types.count("full_attention")
    return [("layers", f"{cfg.num_hidden_layers} ({full} full attention, {cfg.num_hidden_layers - full} Gated DeltaNet)"),
            ("experts", f"{cfg.num_experts} per layer, K={cfg.num_experts_per_tok}, "
                        f"shared expert {cfg.shared_expert_intermediate_size}")]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm: the stored weight is an offset from 1 (one launch on CUDA)."""
    return fused.rms_norm(x, weight, eps)


@dataclass
class DeltaNetState:
    conv: torch.Tensor | None = None  # last (kernel - 1) inputs of the causal conv, [channels, kernel - 1]
    recurrent: torch.Tensor | None = None  # [1, value_heads, key_dim, value_dim], float32

    def addresses(self) -> tuple[int, int, int]:
        """Its row of a batch's device table (_delta_tokens from a table)."""
        return self.recurrent.data_ptr(), self.conv.data_ptr(), 0

    def blank(self) -> "DeltaNetState":
        return DeltaNetState(torch.zeros_like(self.conv), torch.zeros_like(self.recurrent))


class Qwen3NextModel(ResidentWeights):
    """Resident weights (a name -> tensor dict, store names) and the math of every layer but the routed experts."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__(weights)
        self.cfg = cfg
        spec = AttentionSpec(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
                             qk_norm="zero_centred", output_gate=True)
        self.attention = Attention(spec, rope_inv_freq(cfg.rope_theta, cfg.rotary_dim, self.device))
        for layer in range(cfg.num_hidden_layers):
            self._fuse_projections(layer)

    def _fuse_projections(self, layer: int) -> None:
        """Matrices that read the same input become one, so a decode step reads each input's weights in one
        matrix-vector product instead of two to four (small ones run far below HBM bandwidth: a 512-row router
        alone took 11 us on an H100, 10x its bytes). Split back by `_split_sizes`."""
        p = f"model.layers.{layer}."
        groups = {p + "self_attn.qkv_proj.fused": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                  p + "linear_attn.in_proj.fused": ["linear_attn.in_proj_qkv", "linear_attn.in_proj_z",
                                                     "linear_attn.in_proj_b", "linear_attn.in_proj_a"],
                  # the router first: its logits are then the rows' first E columns
                  p + "mlp.moe_in.fused": ["mlp.gate", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                           "mlp.shared_expert_gate"],
                  p + "mlp.gate_up.fused": ["mlp.gate_proj", "mlp.up_proj"]}
        for fused_name, parts in groups.items():
            names = [p + part + ".weight" for part in parts]
            if all(n in self.w for n in names):
                self.w[fused_name] = cat_rows([self.w.pop(n) for n in names])

    def new_state(self) -> SequenceState:
        layers = [KVCache() if t == "full_attention" else DeltaNetState() for t in self.cfg.layer_types]
        return SequenceState(layers=layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x, self.w["model.norm.weight"], self.cfg.rms_norm_eps)
        return linear(x, self.lm_head).float()

    # ---- token mixing: full attention or Gated DeltaNet, with the residual ---------------------
    def mix(self, layer: int, x: torch.Tensor, state: SequenceState, static: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token mixing plus the residual, then the channel-mixing input norm (the add and the norm in one launch):
        returns (x, normed x). static: one decode token with no host values (for a CUDA graph): full attention reads
        its position from state.position_t and attends over the KV cache's whole capacity under a mask (the cache
        must hold a free slot at that position); its `length` is the caller's to advance."""
        return self.mix_many(layer, x, [state], [(0, x.shape[0])], state.position_t if static else None)

    def mix_many(self, layer: int, x: torch.Tensor, states: list[SequenceState] | None, bounds: list[tuple[int, int]],
                 positions: torch.Tensor | None = None, table: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """mix() for several sequences, rows bounds[i] of x each: everything per token (norms, the input and output
        projections) once over all rows, the attention or DeltaNet recurrence per sequence. positions: one decode
        token each, static as in mix(), at these device positions (a batch's CUDA graph); table: instead of states,
        this layer's caches' addresses() stacked on the device [B, 3] (a graph for any set of sequences)."""
        p = f"model.layers.{layer}."
        eps = self.cfg.rms_norm_eps
        h = rms_norm(x, self.w[p + "input_layernorm.weight"], eps)
        caches = None if table is not None else [s.layers[layer] for s in states]
        if self.cfg.layer_types[layer] != "full_attention":
            h = self._delta_net(p + "linear_attn.", h, caches, bounds, table)
        elif positions is not None:
            h = self.attention.attend_many_at(self.w, p + "self_attn.", h, caches, positions, table)
        else:
            h = self.attention.attend_many(self.w, p + "self_attn.", h, caches, [s.position for s in states], bounds)
        return fused.rms_norm(h, self.w[p + "post_attention_layernorm.weight"], eps, residual=x)

    def _delta_net(self, p: str, h: torch.Tensor, states: list[DeltaNetState] | None, bounds: list[tuple[int, int]],
                   table: torch.Tensor | None = None) -> torch.Tensor:
        """Gated DeltaNet over sequences' rows bounds[i] of h: the projections once over all rows, the convolution
        and the recurrence per sequence (a GPU batch's decode tokens, or the states' table: _delta_tokens)."""
        proj = linear(h, self.w[p + "in_proj.fused"])
        if table is not None or (len(states) > 1 and h.is_cuda and len(bounds) == h.shape[0]
                                 and all(s.recurrent is not None for s in states)):
            return linear(self._delta_tokens(p, proj, h, states, table), self.w[p + "out_proj.weight"])
        outs = [self._delta_rule(p, proj[a:b], h, state) for (a, b), state in zip(bounds, states)]
        return linear(outs[0] if len(outs) == 1 else torch.cat(outs), self.w[p + "out_proj.weight"])

    def _delta_tokens(self, p: str, proj: torch.Tensor, like: torch.Tensor, states: list[DeltaNetState] | None,
                      table: torch.Tensor | None = None) -> torch.Tensor:
        """_delta_rule for one decode token of each of several sequences (row i of proj is states[i]'s): their
        conv windows and recurrent states gathered, each kernel once for all, the states written back (a multi-tensor
        copy each); on a GPU the per-sequence way was ~10 small launches a sequence a layer. table: instead of
        states, their addresses() stacked on the device [B, 3] (gathered and written back by address)."""
        cfg, w = self.cfg, self.w
        n, nk, nv = proj.shape[0], cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        channels = 2 * nk * dk + nv * dv
        mixed, z, b, a = proj.split([channels, nv * dv, nv, nv], dim=-1)
        conv_w = w[p + "conv1d.weight"]
        if table is not None:
            conv = by_address.gather(table[:, 1], (channels, conv_w.shape[-1] - 1), like.dtype)
            recurrent = by_address.gather(table[:, 0], (nv, dk, dv), torch.float32)
        else:
            conv, recurrent = torch.stack([s.conv for s in states]), torch.cat([s.recurrent for s in states])
        mixed = fused.conv_step(mixed, conv, conv_w)
        q, k, v = torch.split(mixed, [nk * dk, nk * dk, nv * dv], dim=-1)
        g, beta = fused.delta_gates(a, b, w[p + "A_log"], w[p + "dt_bias"])
        out, final = gated_delta_rule(q.reshape(n, 1, nk, dk), k.reshape(n, 1, nk, dk), v.reshape(n, 1, nv, dv),
                                      g[:, None], beta[:, None], recurrent)
        if table is not None:
            by_address.scatter(conv, table[:, 1])
            by_address.scatter(final.float(), table[:, 0])
        else:
            torch._foreach_copy_([s.conv for s in states], list(conv.unbind(0)))
            torch._foreach_copy_([s.recurrent for s in states], list(final.float().split(1)))
        out = fused.rms_norm(out[:, 0], w[p + "norm.weight"], cfg.rms_norm_eps, zero_centred=False,
                             gate=z.reshape(n, nv, dv))
        return out.reshape(n, nv * dv)

    def _delta_rule(self, p: str, proj: torch.Tensor, like: torch.Tensor, state: DeltaNetState) -> torch.Tensor:
        """One sequence's T rows of the input projection through its convolution and recurrent state (updated in
        place) -> [T, value heads x value dim], before the output projection; `like`: the layer input's dtype and
        device."""
        cfg, w, h = self.cfg, self.w, like
        t = proj.shape[0]
        nk, nv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        channels = 2 * nk * dk + nv * dv
        conv_w = w[p + "conv1d.weight"]  # [channels, 1, kernel]
        kernel = conv_w.shape[-1]
        if state.conv is None:
            state.conv = h.new_zeros(channels, kernel - 1)
        if t == 1 and h.device.type == "cpu":  # one call from the input projection to the output one (our kernels)
            if state.recurrent is None:
                state.recurrent = torch.zeros(1, nv, dk, dv)
            out = cpu_native.delta_decode(proj, state.conv, conv_w, w[p + "A_log"], w[p + "dt_bias"], state.recurrent,
                                          w[p + "norm.weight"], cfg.rms_norm_eps, nk, nv, dk, dv)
            if out is not None:
                return out
        mixed, z, b, a = proj.split([channels, nv * dv, nv, nv], dim=-1)

        # causal depthwise conv over [previous kernel-1 inputs, new inputs]; zeros before the first token
        if t == 1:  # decode: the window's dot product, the SiLU and the state shift at once
            mixed = fused.conv_step(mixed[0], state.conv, conv_w)[None]
        else:
            full = torch.cat([state.conv, mixed.transpose(0, 1)], dim=1)
            state.conv.copy_(full[:, -(kernel - 1):])  # in place: a captured CUDA graph keeps these addresses
            # a depthwise conv in float32: in bf16 torch's CPU conv runs a loop per channel (80 ms for 8192 channels
            # of 36 tokens); float32's is 3x faster than a multiply-add per tap (8192 channels of 512 tokens on the
            # 2-core VM: 5-8 ms against 17-23), the same sums
            acc = F.conv1d(full.float()[None], conv_w.float(), groups=channels)[0]
            mixed = F.silu(acc).to(h.dtype).transpose(0, 1)  # [T, channels]

        q, k, v = torch.split(mixed, [nk * dk, nk * dk, nv * dv], dim=-1)
        q, k, v = q.view(1, t, nk, dk), k.view(1, t, nk, dk), v.view(1, t, nv, dv)
        g, beta = fused.delta_gates(a, b, w[p + "A_log"], w[p + "dt_bias"])
        out, final = gated_delta_rule(q, k, v, g[None], beta[None], state.recurrent)
        if state.recurrent is None:
            state.recurrent = final.float().clone()
        else:
            state.recurrent.copy_(final)
        # the output norm has plain weights and a SiLU gate
        out = fused.rms_norm(out[0], w[p + "norm.weight"], cfg.rms_norm_eps, zero_centred=False, gate=z.view(t, nv, dv))
        return out.reshape(t, nv * dv)

    # ---- channel mixing: router, shared expert, dense MLP ---------------------------------------
    def kv_cache(self, state: SequenceState, layer: int) -> KVCache | None:
        """The layer's growing KV cache in `state`, or None for a layer without one."""
        return state.layers[layer] if self.cfg.layer_types[layer] == "full_attention" else None

    def moe_projections(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Everything that reads the MoE input, in one product: [T, router logits | shared gate | shared up |
        the shared expert's gate logit]."""
        return linear(h, self.w[f"model.layers.{layer}.mlp.moe_in.fused"])

    def route(self, layer: int, projections: torch.Tensor, top_k: int, slot_table: torch.Tensor | None = None,
              counts: torch.Tensor | None = None):
        """Softmax router -> (expert ids [T, K] ascending, their weights [T, K] float32, and their slots in
        `slot_table` [experts] if given, counted into `counts` by tier). With an unnormalised router and K
        overridden, the kept experts share the mass the default K had."""
        cfg = self.cfg
        return fused.route(projections[:, : cfg.num_experts], top_k, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                           slot_table, counts)

    def shared_expert(self, layer: int, projections: torch.Tensor) -> torch.Tensor:
        y, gate_logit = self.shared_expert_parts(layer, projections)
        return torch.sigmoid(gate_logit) * y

    def shared_expert_parts(self, layer: int, projections: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared expert's output before its sigmoid gate, and the gate's logit [T, 1] (so a kernel that sums the
        layer's end can apply it)."""
        e, si = self.cfg.num_experts, self.cfg.shared_expert_intermediate_size
        gate, up = projections[:, e : e + si], projections[:, e + si : e + 2 * si]
        y = linear(F.silu(gate) * up, self.w[f"model.layers.{layer}.mlp.shared_expert.down_proj.weight"])
        return y, projections[:, -1:]

    def dense_mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp."
        return swiglu_mlp(h, self.w[p + "gate_up.fused"], self.w[p + "down_proj.weight"])


Model = Qwen3NextModel
