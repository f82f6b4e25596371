"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B): a plain decoder of GQA attention with per-head
RMSNorm on queries and keys, and a sparse MoE of SwiGLU experts under a softmax top-K router, no shared expert.
Layers listed in mlp_only_layers (or off decoder_sparse_step) are dense SwiGLU MLPs instead.

The math follows transformers' modeling_qwen3_moe.py. mixtral.py reuses this Model with its own names. Routed
experts are not here: the engine fetches them and calls the expert kernels with this file's router output.
Sequences are single (batch 1); tensors are [T, hidden].
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, config_value, rope_settings
from ..errors import FlashMoeError
from ..kernels import fused
from ..kernels.linear import cat_rows, linear
from ..kernels.moe import swiglu_mlp
from ..layers.attention import Attention, AttentionSpec, KVCache, rope_inv_freq
from ..layers.resident import ResidentWeights
from ..layers.state import SequenceState
from . import ResidentItem, end_shapes

ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe"}
ZERO_CENTRED_NORMS = False  # RMSNorm weights store an offset from 1 (else the scale itself)
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # a routed expert's gate, up and down, as the checkpoint names them
MLP = "mlp."  # where a layer's MoE block (router, experts) or dense MLP lives
QK_NORM = "plain"


def config_fields(arch: str, family: str, raw: dict) -> dict:
    """The ModelConfig fields a plain attention + MoE decoder's config.json gives (Qwen3-MoE's and Mixtral's keys)."""
    def get(key: str, kind: type, default=KeyError):
        return config_value(raw, key, kind, default)

    layers, hidden, heads = get("num_hidden_layers", int), get("hidden_size", int), get("num_attention_heads", int)
    rope, rope_type = rope_settings(raw)
    if rope_type != "default":
        raise FlashMoeError(f"{arch}: rope type {rope_type!r} is not supported yet (only the default RoPE)")
    if get("attention_bias", bool, False):
        raise FlashMoeError(f"{arch}: attention_bias is true; flashmoe runs this family's attention without biases")
    eos = raw.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
    if not (isinstance(eos, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in eos)):
        raise FlashMoeError(f"config.json: eos_token_id is {eos!r}, not an id or a list of ids")
    return dict(
        architecture=arch, family=family, vocab_size=get("vocab_size", int), hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads", int, heads),
        head_dim=get("head_dim", int, None) or hidden // max(heads, 1), rms_norm_eps=get("rms_norm_eps", float, 1e-6),
        rope_theta=config_value(rope, "rope_theta", float, get("rope_theta", float, 10000.0)),
        layer_types=["full_attention"] * layers,
        # transformers 5 writes num_local_experts where the released Qwen3 configs say num_experts
        num_experts=get("num_experts", int, None) or get("num_local_experts", int),
        num_experts_per_tok=get("num_experts_per_tok", int),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=get("max_position_embeddings", int, 32768), hidden_act=get("hidden_act", str, "silu"),
        eos_token_id=list(eos),
    )


def config_from_hf(arch: str, raw: dict) -> ModelConfig:
    def get(key: str, kind: type, default=KeyError):
        return config_value(raw, key, kind, default)

    f = config_fields(arch, ARCHITECTURES[arch], raw)
    if get("use_sliding_window", bool, False):
        raise FlashMoeError(f"{arch}: use_sliding_window is true; flashmoe runs Qwen3-MoE with full attention only")
    step, only = get("decoder_sparse_step", int, 1), set(get("mlp_only_layers", list, []))
    layers = f["num_hidden_layers"]
    return ModelConfig(
        **f, moe_intermediate_size=get("moe_intermediate_size", int), norm_topk_prob=get("norm_topk_prob", bool, False),
        dense_layers=[i for i in range(layers) if i in only or (i + 1) % step != 0],
        intermediate_size=get("intermediate_size", int, 0),
    )


def resident_shapes(cfg: ModelConfig, qk_norm: bool = True, mlp: str = MLP) -> dict[str, tuple[int, ...]]:
    """Every resident tensor of a store and its shape, named as the checkpoint names them."""
    h, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    shapes = end_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + mlp
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       a + "q_proj.weight": (nh * hd, h), a + "k_proj.weight": (nkv * hd, h),
                       a + "v_proj.weight": (nkv * hd, h), a + "o_proj.weight": (h, nh * hd)})
        if qk_norm:
            shapes.update({a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
        if cfg.is_moe_layer(i):
            shapes[m + "gate.weight"] = (cfg.num_experts, h)
        else:
            di = cfg.intermediate_size
            shapes.update({m + "gate_proj.weight": (di, h), m + "up_proj.weight": (di, h), m + "down_proj.weight": (h, di)})
    return shapes


def resident_sources(cfg: ModelConfig) -> list[ResidentItem]:
    return []  # every resident tensor is stored as the checkpoint has it


def expert_prefix(layer: int) -> str:
    """The checkpoint's routed experts of a layer: PREFIX{e}.gate_proj.weight ... (or fused PREFIXgate_up_proj)."""
    return f"model.layers.{layer}.{MLP}experts."


def attention_layers(cfg: ModelConfig, more: str = "") -> tuple[str, str]:
    """`flashmoe info`'s line for layers that are all full attention: their heads and sizes, then `more`."""
    return ("layers", f"{cfg.num_hidden_layers} full attention ({cfg.num_attention_heads} query / "
                      f"{cfg.num_key_value_heads} key-value heads of {cfg.head_dim}){more}")


def describe(cfg: ModelConfig) -> list[tuple[str, str]]:
    dense = f", {len(cfg.dense_layers)} of them dense" if cfg.dense_layers else ""
    return [attention_layers(cfg, dense),
            ("experts", f"{cfg.num_experts} per layer, K={cfg.num_experts_per_tok}, no shared expert")]


# llama.cpp's names (gguf-py's tensor map) -> the HF checkpoint's: whole-model, then per layer (blk.N. -> model.layers.N.)
GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
              "output_norm.weight": "model.norm.weight"}


def gguf_layer_names(mlp: str = MLP) -> dict[str, str]:
    return {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
            "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
            "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
            "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
            "ffn_gate_inp.weight": mlp + "gate.weight", "ffn_gate.weight": mlp + "gate_proj.weight",
            "ffn_up.weight": mlp + "up_proj.weight", "ffn_down.weight": mlp + "down_proj.weight"}


GGUF_LAYER_NAMES = gguf_layer_names()


def from_gguf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return t  # llama.cpp's Qwen3-MoE converter changes no tensor (NEOX RoPE: q and k are not permuted)


def gguf_rows_only(cfg: ModelConfig, name: str) -> bool:
    return True


def gguf_keys(metadata: dict):
    """key(name[, default]): the GGUF's `<architecture>.<name>` value; a KeyError naming it when absent without one."""
    arch = metadata["general.architecture"]

    def key(name: str, default=KeyError):
        value = metadata.get(f"{arch}.{name}", default)
        if value is KeyError:
            raise KeyError(f"{arch}.{name}")
        return value

    return key


def gguf_config_fields(metadata: dict, names: tuple[str, ...]) -> dict:
    """config.json keys of a plain attention + MoE GGUF, from the keys llama.cpp's converter writes."""
    key = gguf_keys(metadata)

    layers, heads = key("block_count"), key("attention.head_count")
    rope = {"rope_type": key("rope.scaling.type", "default"), "rope_theta": key("rope.freq_base", 10000.0)}
    vocab = metadata["tokenizer.ggml.tokens"]
    return {
        "hidden_size": key("embedding_length"), "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", key("embedding_length") // heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"), "max_position_embeddings": key("context_length"),
        "rope_parameters": {**rope, "rope_type": "default" if rope["rope_type"] in ("none", "linear") and
                            key("rope.scaling.factor", 1.0) == 1.0 else rope["rope_type"]},
        "num_experts_per_tok": key("expert_used_count"),
        "vocab_size": vocab if isinstance(vocab, int) else len(vocab), "tie_word_embeddings": "output.weight" not in names,
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"), "hidden_act": "silu",
    }


def config_from_gguf(metadata: dict, names: tuple[str, ...]) -> dict:
    """config.json of a Qwen3-MoE GGUF (`qwen3moe`: transformers 5 maps none). llama.cpp always renormalises this
    family's top-K weights, so the file does not say norm_topk_prob: the released checkpoints set it too. (Its
    converter refuses dense layers, so such a file has none.)"""
    arch = metadata["general.architecture"]
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **gguf_config_fields(metadata, names),
        "num_experts": metadata[f"{arch}.expert_count"],
        "moe_intermediate_size": metadata[f"{arch}.expert_feed_forward_length"],
        "intermediate_size": metadata.get(f"{arch}.feed_forward_length", 0), "norm_topk_prob": True,
    }


class AttentionMoEModel(ResidentWeights):
    """Resident weights (store names -> tensors) and the math of every layer but the routed experts: a decoder whose
    layers are all full attention, each followed by a MoE block (router only; no shared expert) or a dense MLP."""

    MLP = MLP
    QK_NORM = QK_NORM

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__(weights)
        self.cfg = cfg
        spec = AttentionSpec(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
                             qk_norm=self.qk_norm(cfg), sliding_window=cfg.sliding_window, bias=cfg.attention_bias)
        self.attention = Attention(spec, rope_inv_freq(cfg.rope_theta, cfg.rotary_dim, self.device))
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}."
            # matrices that read the same input become one: a decode step reads them in one matrix-vector product
            for fused_name, parts in self.fused_groups(p):
                names = [p + part for part in parts]
                if all(n in self.w for n in names):
                    self.w[fused_name] = (cat_rows if fused_name.endswith(".fused") else torch.cat)(
                        [self.w.pop(n) for n in names])

    def qk_norm(self, cfg: ModelConfig) -> str:
        return self.QK_NORM

    def fused_groups(self, p: str) -> list[tuple[str, tuple[str, ...]]]:
        """(fused name, the layer's tensors it concatenates, rows in order) for the layer under prefix p."""
        m = self.MLP
        return [(p + "self_attn.qkv_proj.fused", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                  "self_attn.v_proj.weight")),
                (p + "self_attn.qkv_proj.fused_bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                                       "self_attn.v_proj.bias")),
                (p + m + "gate_up.fused", (m + "gate_proj.weight", m + "up_proj.weight"))]

    def new_state(self) -> SequenceState:
        return SequenceState(layers=[KVCache() for _ in range(self.cfg.num_hidden_layers)])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = fused.rms_norm(x, self.w["model.norm.weight"], self.cfg.rms_norm_eps, zero_centred=False)
        return linear(x, self.lm_head).float()

    def attention_of(self, layer: int):
        return self.attention

    def mix(self, layer: int, x: torch.Tensor, state: SequenceState, static: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention plus the residual, then the MoE input norm: (x, normed x). static: one decode token with no host
        values (for a CUDA graph), as in layers.attention.Attention.attend_at."""
        return self.mix_many(layer, x, [state], [(0, x.shape[0])], state.position_t if static else None)

    def mix_many(self, layer: int, x: torch.Tensor, states: list[SequenceState] | None, bounds: list[tuple[int, int]],
                 positions: torch.Tensor | None = None, table: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """mix() for several sequences, rows bounds[i] of x each: everything per token once over all rows, the
        attention itself per sequence (Attention.attend_many). positions: one decode token each, static as in mix(),
        at these device positions (a batch's CUDA graph); table: instead of states, this layer's caches'
        addresses() stacked on the device (a graph for any set of sequences; KV caches only)."""
        p, eps = f"model.layers.{layer}.", self.cfg.rms_norm_eps
        h = fused.rms_norm(x, self.w[p + "input_layernorm.weight"], eps, zero_centred=False)
        attention = self.attention_of(layer)
        caches = None if table is not None else [s.layers[layer] for s in states]
        if positions is not None:
            h = attention.attend_many_at(self.w, p + "self_attn.", h, caches, positions, table)
        else:
            h = attention.attend_many(self.w, p + "self_attn.", h, caches, [s.position for s in states], bounds)
        return fused.rms_norm(h, self.w[p + "post_attention_layernorm.weight"], eps, zero_centred=False, residual=x)

    def kv_cache(self, state: SequenceState, layer: int) -> KVCache:
        return state.layers[layer]

    def moe_projections(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The router's logits [T, experts]: all that reads the MoE input besides the experts."""
        return linear(h, self.w[f"model.layers.{layer}.{self.MLP}gate.weight"])

    def route(self, layer: int, projections: torch.Tensor, top_k: int, slot_table: torch.Tensor | None = None,
              counts: torch.Tensor | None = None):
        """Softmax top-K, as fused.route (renormalised when the config says so)."""
        cfg = self.cfg
        return fused.route(projections, top_k, cfg.num_experts_per_tok, cfg.norm_topk_prob, slot_table, counts)

    def shared_expert(self, layer: int, projections: torch.Tensor) -> None:
        return None

    def shared_expert_parts(self, layer: int, projections: torch.Tensor) -> tuple[None, None]:
        return None, None

    def dense_mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}.{self.MLP}"
        return swiglu_mlp(h, self.w[p + "gate_up.fused"], self.w[p + "down_proj.weight"])


Model = AttentionMoEModel
