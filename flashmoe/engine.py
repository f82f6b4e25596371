"""Prefill and decode over a store: per layer, token mixing, then the router, then only the chosen experts.

For a prompt, each layer's router runs over all tokens at once, every needed expert is fetched once,
and all the tokens that chose it go through it together. The shared expert is computed while the
routed experts are being read, so I/O overlaps compute.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import placement, residents
from .distributed import Pipeline, local_device_index
from .errors import FlashMoeError
from .eviction import POLICIES
from .expert_cache import PinningFailed
from .experts import DEFAULT_CACHE_POLICY, ExpertFetcher, check_fits
from .memory import default_cache_bytes, default_pinned_cache_bytes, ram_available
from .kernels.affine import AffineMatrix
from .kernels.cpu_int4 import RESIDENT_FORMATS, KernelForm, compress_matrix
from .kernels.cpu_native import NativeExperts
from .kernels.linear import held_bytes
from .kernels.moe import ExpertMath
from .models import family_of
from .prefix_cache import PrefixCache
from .quant import QuantizedTensor
from .replay import RoutingRecorder, TraceRouting, replaying
from .cpu_share import CpuShare
from .decode_graphs import DecodeGraphs
from .routed import ExpertTimes, RoutedExperts
from .sampling import TokenConstraint
from .sequence import Sequence
from .store import Store

TIMERS = ("attention_ms", "routing_ms", "expert_io_ms", "expert_compute_ms")


def default_vram_cache_bytes(store: Store, device: torch.device) -> int:
    """What VRAM is free after the resident weights, less 4 GB for activations and the KV cache; never more
    than the store's experts."""
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, min(store.expert_bytes, int(free * 0.9) - (4 << 30)))


# a quantized store on the CPU: resident projections quantized to 8 bits at load (llama.cpp's Q8_0 does the same).
# benchmarks/cpu_paths.py, 35B-A3B geometry, 16 Xeon cores: 22.9 tok/s vs 15.8 in bf16 and 7.2 before (RESULTS.md)
DEFAULT_CPU_RESIDENT_FORMAT = "int8"


def _gpu_resident_format(store: Store, gpus: list[torch.device], dtype: torch.dtype, asked: str | None) -> str:
    """The resident format on these GPUs: `asked` if it fits their free VRAM (else one line), or residents.choose's
    when none was asked for."""
    free = residents.free_vram(gpus)
    sizes = residents.gpu_bytes(store, dtype.itemsize)
    where = ", ".join(map(str, gpus))
    chosen = asked or residents.choose(sizes, free)
    residents.check(sizes, chosen or "int4", free, where)
    if asked is None and chosen != "float":
        print(f"flashmoe: resident weights quantized to {chosen} at load ({sizes[chosen] / 1e9:.1f} GB; in {dtype} "
              f"they would take {sizes['float'] / 1e9:.1f} of the {free / 1e9:.1f} GB free on {where}); "
              f"--resident-format float keeps them exact", file=sys.stderr)
    return chosen


def _on(device: torch.device):
    """The block runs with `device` current: Triton launches on the current GPU, whatever its tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass
class Stage:
    """One device's part of the model: a block of layers (placement.py), their resident weights (the family's model
    over them), the fetcher of their experts (its VRAM tier; the RAM tier is shared) and its decode graphs."""

    device: torch.device
    layers: range
    model: object
    fetcher: ExpertFetcher
    routed: RoutedExperts
    graphs: DecodeGraphs | None


def _resident(t, device: str, dtype: torch.dtype):
    """A resident tensor as a family's model takes it: codes the store keeps as an AffineMatrix on `device`; the
    rest as the store's load left it."""
    if isinstance(t, QuantizedTensor):
        t = QuantizedTensor(*(None if x is None else x.to(device) for x in (t.packed, t.scales, t.biases)), t.bits,
                            t.group_size)
        return AffineMatrix(t, dtype)
    return t


def _quantize_as_read(home, bits: int, dtype: torch.dtype, keep_float: tuple[str, ...]):
    """Store.load_resident's `each` for residents quantized on a GPU: a float matrix (not the embedding, a lookup
    table kept in float, nor a family's FLOAT_MATRICES) onto its GPU quantized, a slice at a time, as it is read, so
    neither RAM nor the GPU ever holds the float residents all at once (a 397B model's: 19.6 GB in bf16, 7.5 at
    int4); the rest to its device. Rows split alike whether quantized before or after a family fuses them."""
    def each(name: str, t: torch.Tensor):
        device = torch.device(home(name))
        if residents.quantized_at_load(name, t.dim(), t.is_floating_point(), keep_float):
            with _on(device):  # rows the group does not divide: t as it is (settle() moves it)
                return AffineMatrix.quantized(t, bits, dtype, residents.GROUP, device=device)
        return t.to(device)
    return each


class Model:
    def __init__(self, store: Store, device: str, dtype: torch.dtype, experts_per_token: int | None,
                 cache_bytes: int | None, vram_cache_bytes: int | None, io_threads: int, direct_io: bool,
                 verify_reads: bool,
                 use_cuda_graphs: bool = True, zero_copy: bool = True, cache_policy: str = DEFAULT_CACHE_POLICY,
                 resident_format: str = "float", devices: list[torch.device] | None = None,
                 pipeline: Pipeline | None = None, cpu_share: float | str = 0.0):
        """devices: several GPUs (or, for tests, several CPU parts) to spread the layers over (placement.py); `device`
        is then the first. pipeline: this process is one rank of several (distributed.py), holding one block."""
        self.store = store
        self.config = store.config
        self.device = torch.device(device)
        cfg = self.config
        if experts_per_token is not None and not 1 <= experts_per_token <= cfg.num_experts:
            raise FlashMoeError(f"experts_per_token must be between 1 and {cfg.num_experts}, not {experts_per_token}")
        self.experts_per_token = experts_per_token or cfg.num_experts_per_tok
        family = family_of(cfg.architecture)
        self.pipeline = pipeline
        devices = devices or [self.device]
        on_gpu = self.device.type == "cuda"
        capacity = [torch.cuda.mem_get_info(d)[0] if on_gpu else 1.0 for d in devices]
        if pipeline is not None:  # every rank plans alike, from what each has free
            ranks = pipeline.gather((str(self.device), capacity[0]))
            devices, capacity = [torch.device(d) for d, _ in ranks], [c for _, c in ranks]
        blocks = placement.plan(cfg, devices, store.expert_blob_bytes, store.resident_bytes, capacity)
        mine = range(len(blocks)) if pipeline is None else [pipeline.rank]
        last = len(blocks) - 1
        tied = cfg.tie_word_embeddings and len(blocks) > 1  # the last block's head is the first one's embedding

        def home(name: str) -> str | None:  # where a resident tensor goes; None: another rank holds it
            i = placement.block_of(name, blocks)
            if i in mine:
                return str(blocks[i].device)
            return str(blocks[last].device) if tied and last in mine and name.startswith(placement.EMBEDDING) else None

        gpu_bits = residents.BITS.get(resident_format) if on_gpu else None  # read by kernels/affine.py's kernels
        staged = gpu_bits is not None  # quantized on a GPU as they are read (_quantize_as_read)
        each = _quantize_as_read(home, gpu_bits, dtype, getattr(family, "FLOAT_MATRICES", ())) if staged else None
        loaded = store.load_resident(dtype, float32=getattr(family, "FLOAT32_RESIDENTS", ()), device_of=home,
                                     each=each)
        weights = {name: _resident(t, home(name), dtype) for name, t in loaded.items()}
        del loaded
        parts = {i: {} for i in mine}
        for name, t in weights.items():
            parts.get(placement.block_of(name, blocks), parts.get(last))[name] = t
        if tied and 0 in mine and last in mine:
            parts[last][placement.EMBEDDING + "weight"] = weights[placement.EMBEDDING + "weight"].to(blocks[last].device)
        del weights  # the parts hold them: a matrix compressed below is freed as it is replaced
        self.resident_format = resident_format
        models = {}
        for i in mine:
            with _on(blocks[i].device):
                models[i] = family.Model(cfg, parts.pop(i))
                if not on_gpu and (resident_format != "float" or store.resident_quantized):
                    models[i].compress_matrices(lambda w: compress_matrix(w, resident_format))
                elif staged:
                    device = blocks[i].device
                    models[i].compress_matrices(
                        lambda w: AffineMatrix.quantized(w, gpu_bits, dtype, residents.GROUP, device=device))
                    models[i].settle()
        if staged:
            torch.cuda.empty_cache()  # quantize's temporaries back to the driver, for the VRAM expert cache
        moe_layers_of = [sum(cfg.is_moe_layer(i) for i in b.layers) for b in blocks]
        if on_gpu and vram_cache_bytes is None:
            vram_budgets = [default_vram_cache_bytes(store, d) for d in devices]
        else:  # a total given: each device's share follows its layers' experts
            vram_budgets = [int((vram_cache_bytes or 0) * n / max(1, sum(moe_layers_of))) for n in moe_layers_of]
        batch = min(cfg.num_experts, max(32, 2 * self.experts_per_token))
        # on the CPU, RAM slots hold each expert in the form the kernels read: the blob as stored for ours, else
        # torch's int4 layout (prepared as it lands)
        form_args = (store.layout, cfg.hidden_size, cfg.moe_intermediate_size, store.quantization["bits"],
                     store.quantization["group_size"], ExpertMath.of(cfg))
        kernel_form = None
        if not on_gpu:
            kernel_form = NativeExperts.for_store(*form_args) or KernelForm.for_store(*form_args)
        pinned_default = cache_bytes is None and on_gpu
        if pinned_default:  # this process's blocks: the experts, and how many their VRAM holds
            blob = store.expert_blob_bytes
            experts = [moe_layers_of[i] * cfg.num_experts for i in mine]
            in_vram = sum(min(vram_budgets[i] // blob, n) for i, n in zip(mine, experts))
            cache_bytes = default_pinned_cache_bytes(sum(experts) * blob, in_vram * blob)
        elif cache_bytes is None:
            slot = store.expert_blob_bytes if kernel_form is None else kernel_form.slot_bytes
            cache_bytes = default_cache_bytes(len(cfg.moe_layers) * cfg.num_experts * slot)
        # on a GPU, the CPU's kernels for its share of the experts held in pinned RAM (cpu_share.py)
        share_form = None
        if on_gpu and use_cuda_graphs and cpu_share != 0:
            share_form = NativeExperts.for_store(*form_args)
            if share_form is None:
                raise FlashMoeError("cpu_share needs the CPU expert kernels (a C compiler, and experts stored "
                                    "2/4/8-bit affine); pass cpu_share=0")
        self.stages: list[Stage] = []  # this process's blocks: all of them, or its rank's one
        for i in mine:
            block, vram_bytes = blocks[i], vram_budgets[i]
            with _on(block.device):
                model = models[i]
                host = self.stages[0].fetcher if self.stages else None

                def fetcher_with(ram_bytes: int) -> ExpertFetcher:
                    return ExpertFetcher(store, block.device, ram_bytes, vram_bytes, batch, io_threads, direct_io,
                                         verify_reads, zero_copy, cache_policy, kernel_form,
                                         [i for i in block.layers if cfg.is_moe_layer(i)], host)

                try:
                    fetcher = fetcher_with(cache_bytes)
                except PinningFailed as exc:  # the default RAM tier could not be pinned: the page cache serves
                    if not (pinned_default and cache_bytes and host is None):
                        raise
                    print(f"flashmoe: {str(exc).partition(';')[0]}; going on without a RAM expert cache (the page "
                          "cache serves); pass cache_gb (--cache-gb) to size one", file=sys.stderr)
                    cache_bytes = 0
                    fetcher = fetcher_with(0)
                routed = RoutedExperts(store, fetcher, block.device)
                share = None
                if share_form is not None and fetcher.ram_slab is not None and fetcher.zero_copy:
                    share = CpuShare(share_form, fetcher.ram_slab, cfg.hidden_size,
                                     None if cpu_share == "auto" else float(cpu_share))
                graphs = DecodeGraphs(model, routed, self.experts_per_token, share) if on_gpu and use_cuda_graphs else None
            self.stages.append(Stage(block.device, block.layers, model, fetcher, routed, graphs))
        self._stage_of = [next((s for s in self.stages if layer in s.layers), None)
                          for layer in range(cfg.num_hidden_layers)]
        # the first device's parts, under the names a one-device model has always had
        self.model, self.fetcher, self.routed, self.graphs = (self.stages[0].model, self.stages[0].fetcher,
                                                              self.stages[0].routed, self.stages[0].graphs)
        self.trace_routing: list[TraceRouting] = []
        self._closed = False
        self._tokenizer = None
        self._eos_token_ids = self._read_eos_token_ids()
        self._timers = dict.fromkeys(TIMERS, 0.0)
        self._expert_times = ExpertTimes()
        # (start, end) CUDA events around each forward's layers, when a benchmark asks (a list): the GPU timeline of
        # the layers alone, without the per-token work before and after them (embedding, head, sampling, host)
        self.layer_events: list | None = None
        # a one-device decode step with every expert resident as one graph from token to logits (decode_graphs.py);
        # off: a graph per layer (the layers' own timing needs that, and benchmarks compare the two)
        self.whole_step_graphs = True
        # a sequence decoding alone replays a whole-step graph of its own, captured at its first steps (the fastest
        # steady decode, for generate and chat); False (the server: sequences come and go) steps it through the batch
        # graphs of its batch size like any set, a bucket of one, so no request captures a graph
        self.graph_per_sequence = True
        self._tokens = {"tokens": 0, "prompt_tokens": 0, "generated_tokens": 0, "prefill_ms": 0.0, "decode_ms": 0.0}
        self.prefix_cache: PrefixCache | None = None  # load(prefix_cache_gb=...): states kept for the next turn

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", experts_per_token: int | None = None,
             cache_gb: float | None = None, vram_cache_gb: float | None = None, dtype: torch.dtype | None = None,
             io_threads: int = 8, direct_io: bool = False, verify_reads: bool = False,
             cuda_graphs: bool = True, zero_copy: bool = True, cache_policy: str = DEFAULT_CACHE_POLICY,
             resident_format: str | None = None, devices: str | list[str] | None = None,
             distributed: bool = False, prefix_cache_gb: float = 0.0, cpu_share: float | str = 0.0) -> "Model":
        """Open a store. cache_gb: RAM expert cache (pinned on a GPU machine; default on the CPU every expert when
        they take at most half of the free RAM, else an eighth of RAM: memory.default_cache_bytes; on a GPU every
        expert, pinned, when the VRAM cache cannot hold them all and they take at most half of the free RAM, else
        none, the page cache serving as the RAM tier: memory.default_pinned_cache_bytes). vram_cache_gb: VRAM expert
        cache (default:
        the VRAM left after the resident weights, less 4 GB). direct_io: read experts with O_DIRECT, bypassing
        the page cache. cuda_graphs: replay the fixed part of each layer's decode step as CUDA graphs.
        zero_copy: once every expert is in VRAM or the pinned RAM cache, decode reads the RAM ones over PCIe from
        inside the expert kernels (whole-layer graphs, no copies) instead of copying them into the VRAM cache.
        cache_policy: which cached expert gives up its slot, in both tiers: "reuse-frequency" (default),
        "frequency-lru", "lru" or "decayed-lfu" (eviction.py; benchmarks/cache_sim.py compares them). resident_format: how the resident
        projections are kept: "float" (as `dtype`), "bf16" (CPU), or quantized at load to "int8" / "int4" (group 32;
        on the CPU read by our kernels, default DEFAULT_CPU_RESIDENT_FORMAT for a quantized store, "float" for an
        exact one; on a GPU by kernels/affine.py's, each quantized onto it as it is read; default there: the first
        of float, int8, int4 that takes at most half of the free VRAM, said on stderr when not float
        (residents.py); a format that does not fit is refused in one line before anything loads).
        devices: several GPUs ("cuda:0,cuda:1" or a list) to spread the layers over, each holding a block of layers and
        its experts (placement.py), instead of `device`; vram_cache_gb is then the total over them. distributed: this
        process is one rank of a torch.distributed group (torchrun's environment; distributed.py) and holds one block
        of layers on `device` ("cuda" is the GPU of its local rank); every rank runs the same calls.
        prefix_cache_gb: RAM for sequence states kept at the ends of prompts and replies (prefix_cache.py), so a
        `generate` whose tokens begin with a kept state's prefills only the rest (a chat's next turn); 0: none.
        cpu_share (GPU): while experts are read from pinned RAM (zero_copy), the share of them the CPU computes
        instead, at the same time as the GPU reads the rest (cpu_share.py): 0 (default) leaves the CPU out, a
        number up to 1 fixes the share, "auto" follows the measured times of both (and shares only while that is
        faster). A lone sequence's steps share; a batch's graph reads every RAM-held expert over PCIe. On the H200
        machine auto made one sequence's decode 1.24x at the 397B geometry and 0.98x at 35B-A3B's (RESULTS.md:
        the two paths share the host's memory bandwidth, and a shared layer costs a sync); off by default until
        its batches are measured."""
        if distributed and devices is not None:
            raise FlashMoeError("distributed runs one block per process: give each rank one device, not devices")
        if devices is not None:
            parsed = placement.parse_devices(devices)
            device = str(parsed[0])
            for d in parsed:  # each checked as a lone device would be
                if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
                    raise FlashMoeError(f"device {str(d)!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
        if cache_policy not in POLICIES:
            raise FlashMoeError(f"unknown cache policy {cache_policy!r}; choose one of {', '.join(POLICIES)}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise FlashMoeError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), not {device!r}")
        on_gpu = device.startswith("cuda")
        if on_gpu and not torch.cuda.is_available():
            raise FlashMoeError(f"device {device!r} asked for, but torch sees no CUDA GPU")
        if on_gpu and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
            raise FlashMoeError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
        if prefix_cache_gb and distributed:
            raise FlashMoeError("the prefix cache is not built for distributed runs yet; pass prefix_cache_gb=0")
        for name, value in (("cache_gb", cache_gb), ("vram_cache_gb", vram_cache_gb), ("prefix_cache_gb", prefix_cache_gb)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise FlashMoeError(f"{name} must be >= 0, not {value} (a finite number of GB)")
        if vram_cache_gb is not None and not on_gpu:
            raise FlashMoeError("vram_cache_gb needs device='cuda'")
        if cpu_share != "auto" and not (isinstance(cpu_share, (int, float)) and math.isfinite(cpu_share)
                                        and 0 <= cpu_share <= 1):
            raise FlashMoeError(f"cpu_share must be between 0 and 1, or 'auto' (follow measured times), not "
                                f"{cpu_share!r}")
        if cpu_share and not on_gpu:
            raise FlashMoeError("cpu_share is for device='cuda' (on the CPU it computes every expert already)")
        if cpu_share and not (zero_copy and cuda_graphs):
            raise FlashMoeError("cpu_share shares the experts the GPU reads from pinned RAM in its decode graphs: "
                                "it needs zero_copy and cuda_graphs")
        if cpu_share and not cache_gb:
            raise FlashMoeError("cpu_share computes experts held in the pinned RAM cache: give cache_gb (the RAM for "
                                "them) too")
        if resident_format is not None and resident_format not in RESIDENT_FORMATS:
            raise FlashMoeError(f"unknown resident format {resident_format!r}; choose one of {', '.join(RESIDENT_FORMATS)}")
        if resident_format == "bf16" and on_gpu:
            raise FlashMoeError("resident_format bf16 is for device='cpu'; on a GPU pass dtype=torch.bfloat16 (the "
                                "default there), or int8 / int4")
        dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
        store = Store(path)
        if on_gpu and not distributed:  # a rank of several holds one block: its share is not known here
            resident_format = _gpu_resident_format(store, parsed if devices is not None else [torch.device(device)],
                                                   dtype, resident_format)
        if resident_format is None:
            resident_format = "float" if store.quantization["bits"] is None or on_gpu else DEFAULT_CPU_RESIDENT_FORMAT
        # None: memory.default_cache_bytes (CPU) / default_pinned_cache_bytes (GPU), once the experts' form is known
        cache_bytes = None if cache_gb is None else int(cache_gb * 1e9)
        vram_bytes = None if vram_cache_gb is None else int(vram_cache_gb * 1e9)
        pipeline = None
        if distributed:
            pipeline = Pipeline.join(torch.device(device).type)
            if device == "cuda":
                device = f"cuda:{local_device_index()}"
        prefix_bytes = int(prefix_cache_gb * 1e9)
        if prefix_bytes:  # a budget the machine cannot hold is refused now, not when a long chat fills it
            check_fits("RAM", "prefix_cache_gb", prefix_bytes, ram_available(), "kept sequence states")
        model = cls(store, device, dtype, experts_per_token, cache_bytes, vram_bytes, io_threads, direct_io,
                    verify_reads, cuda_graphs, zero_copy, cache_policy, resident_format,
                    None if devices is None else parsed, pipeline, cpu_share)
        if prefix_bytes:
            model.prefix_cache = PrefixCache(prefix_bytes)
        return model

    def placement(self) -> dict:
        """Where the weights live: the resident weights' bytes as held (on `device`), the experts' bytes, and what the
        VRAM and RAM caches hold as sized at load (bytes, and the share of the experts); the rest is read from the store. Over
        several devices, `blocks` says which layers and how much VRAM cache each holds, and the VRAM figures are
        their sums."""
        f, experts, blob = self.fetcher, self.store.expert_bytes, self.store.expert_blob_bytes
        slot = f.kernel_form.slot_bytes if f.kernel_form is not None else blob
        resident = sum(held_bytes(s.model) for s in self.stages)  # as kept: dtype, quantized at load or not
        out = {"device": self.device.type, "resident_bytes": resident, "expert_bytes": experts,
               "ram_cache_bytes": f.ram.cached_slots * slot,
               "ram_cache_share": min(1.0, f.ram.cached_slots * blob / experts), "ram_pinned": f.on_gpu}
        if f.vram is not None:
            vram = sum(s.fetcher.vram.cached_slots for s in self.stages) * blob
            out.update(vram_cache_bytes=vram, vram_cache_share=min(1.0, vram / experts))
        if self.pipeline is not None:
            layers = self.stages[0].layers
            out["rank"] = {"rank": self.pipeline.rank, "ranks": self.pipeline.world,
                           "layers": [layers.start, layers.stop - 1]}
        if len(self.stages) > 1:
            out["blocks"] = [{"device": str(s.device), "layers": [s.layers.start, s.layers.stop - 1],
                              "vram_cache_bytes": s.fetcher.vram.cached_slots * blob if s.fetcher.vram else 0}
                             for s in self.stages]
        return out

    @contextlib.contextmanager
    def recording_routing(self) -> Iterator[RoutingRecorder]:
        """Within the block, every forward's routing is recorded (`.trace()`: int [tokens, MoE layers, K]), the layers
        run eagerly (no CUDA graphs: the host needs each router's choice)."""
        recorder, saved = RoutingRecorder(self.config), [(s.model.route, s.graphs) for s in self.stages]
        for s, (route, _) in zip(self.stages, saved):
            s.model.route, s.graphs = recorder.wrap(route), None
        try:
            yield recorder
        finally:
            for s, (route, graphs) in zip(self.stages, saved):
                s.model.route, s.graphs = route, graphs

    def route_by_trace(self, trace) -> None:
        """From now on each token picks the experts a routing trace gives (replay.py; int [tokens, MoE layers, K],
        K replacing experts_per_token; or a set [sequences, tokens, layers, K], each sequence its own): for measuring
        caches and batches under realistic routing. Sequences made before keep their graphs, so call it before
        generating."""
        self.trace_routing = [TraceRouting(trace, self.config, s.device) for s in self.stages]
        for s, routing in zip(self.stages, self.trace_routing):
            replaying(s.model, routing)
            if s.graphs is not None:
                s.graphs.k = routing.top_k
        self.experts_per_token = self.trace_routing[0].top_k

    # ---- tokenizer ------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (transformers), with its chat template when it has one."""
        if self._tokenizer is None:
            if not (self.store.path / "tokenizer.json").is_file() and not (self.store.path / "tokenizer_config.json").is_file():
                raise FlashMoeError(f"store {self.store.path} has no tokenizer files (the checkpoint had none)")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.store.path))
        return self._tokenizer

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        """Token ids of `messages` rendered by the checkpoint's own chat template."""
        if not self.chat_template:
            raise FlashMoeError(f"the checkpoint behind {self.store.path} has no chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, **template_kwargs)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    @property
    def eos_token_ids(self) -> list[int]:
        return self._eos_token_ids

    def _read_eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from config.json and, where present, generation_config.json."""
        ids = set(self.config.eos_token_id)
        gen = self.store.path / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return sorted(ids)

    # ---- forward --------------------------------------------------------------------------
    def new_state(self):
        state = self.model.new_state()
        if self.pipeline is not None and self.pipeline.led and self.pipeline.first:
            self.pipeline.register(state)
        return state

    def follow(self) -> None:
        """A rank after the first of a served distributed model: run the forward passes rank 0 announces, each for its
        sequence, until it stops."""
        states = {}
        while True:
            op, state_id, tokens, all_logits, freed = self.pipeline.listen()
            for i in freed:
                states.pop(i, None)
            if op == "stop":
                return
            if state_id not in states:
                states[state_id] = self.model.new_state()
            self.forward(tokens, states[state_id], all_logits)

    @property
    def sync_timing(self) -> bool:
        return self.routed.sync_timing

    @sync_timing.setter
    def sync_timing(self, on: bool) -> None:
        """On a GPU, synchronize at the end of each phase so `stats` splits GPU time (slower; for benchmarks)."""
        for stage in self.stages:
            stage.routed.sync_timing = on

    @torch.inference_mode()
    def forward(self, token_ids: list[int], state, all_logits: bool = True) -> torch.Tensor:
        """Run tokens after `state` (updated in place); float32 logits, [T, vocab] or [1, vocab] for the last (on the
        last device)."""
        self._check_tokens(token_ids)
        pipe = self.pipeline
        # graphs from the second one-token step on: the first compiles every kernel eagerly
        graphed = len(token_ids) == 1 and state.decode_steps >= 1
        for routing in self.trace_routing:
            routing.begin(state.position, len(token_ids), state)
        if graphed and (logits := self._whole_step(token_ids[0], state)) is not None:
            self._forwarded(state, 1)
            return logits
        if pipe is not None and pipe.led and pipe.first:
            pipe.announce("forward", state.pipeline_id, token_ids, all_logits)
        with _on(self.device):
            if pipe is None or pipe.first:
                x = self.model.embed(torch.tensor(token_ids, dtype=torch.long, device=self.device))
            else:  # the hidden state from the rank before
                x = pipe.receive((len(token_ids), self.config.hidden_size), self.model.dtype, self.device)
        for stage in self.stages:
            with _on(stage.device):
                x = x.to(stage.device)  # the hidden state crosses to the next device: a few KB, once per block
                x = self._run_stage(stage, x, state, graphed and stage.graphs is not None, self._timers)
        self._forwarded(state, len(token_ids))
        last = self.stages[-1]
        with _on(last.device):
            if pipe is not None and not pipe.last:
                pipe.send_on(x.to(self.model.dtype))
                return pipe.share_logits(None, (len(token_ids) if all_logits else 1, self.config.vocab_size),
                                         self.device)
            logits = last.model.logits(x if all_logits else x[-1:])
            return logits if pipe is None else pipe.share_logits(logits, logits.shape, self.device)

    def _forwarded(self, state, n: int) -> None:
        """After `n` tokens of `state` went through every layer: positions, counters, the caches' clocks."""
        self._timers["expert_io_ms"] = self._expert_times.io_wait_ms
        self._timers["expert_compute_ms"] = self._expert_times.compute_ms
        state.position += n
        state.decode_steps += n == 1
        for stage in self.stages:
            stage.fetcher.tick()
        self._tokens["tokens"] += n

    @property
    def _step_graphs(self) -> bool:
        """A decode step may be one graph from token to logits (every expert resident is checked per step): not
        with several blocks or layers timed one by one."""
        return (self.whole_step_graphs and len(self.stages) == 1 and self.pipeline is None
                and self.layer_events is None and self.stages[0].graphs is not None)

    def _whole_step(self, token: int, state) -> torch.Tensor | None:
        """A decode step as one graph from token to logits (decode_graphs.py: every expert resident, one device);
        None where the layers must run one by one."""
        stage = self.stages[0]
        if not self._step_graphs:
            return None
        with _on(stage.device):
            self._position_on(stage, state)
            t0 = time.perf_counter()
            logits = stage.graphs.whole_step(token, state, stage.layers)
        if logits is not None:
            self._expert_times.compute_ms += (time.perf_counter() - t0) * 1e3  # the whole step: everything is compute
        return logits

    @staticmethod
    def _position_on(stage: Stage, state) -> None:
        """Graphs read the position from the device: one tensor per device, each graph bound to its own."""
        state.position_t = state.positions_t.get(stage.device)
        if state.position_t is None:
            state.position_t = state.positions_t[stage.device] = torch.zeros(1, dtype=torch.long, device=stage.device)
        state.position_t.fill_(state.position)

    def _run_stage(self, stage: Stage, x: torch.Tensor, state, graphed: bool, timers: dict) -> torch.Tensor:
        """The layers of one device's block."""
        clock = stage.routed._clock
        if graphed:
            self._position_on(stage, state)
        if self.layer_events is not None:
            self.layer_events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.layer_events[-1][0].record()
        model = stage.model
        if graphed:
            stage.graphs.begin_step(state)
        for layer in stage.layers:
            if graphed and stage.graphs.layer_can_use(layer):
                x = stage.graphs.step(layer, x, state, timers, self._expert_times, clock)
                continue
            t0 = clock()
            x, h = model.mix(layer, x, state)
            x = self._channel_mix(stage, layer, x, h, timers, t0)
        if graphed:
            stage.graphs.end_step()
        if self.layer_events is not None:
            self.layer_events[-1][1].record()
        return x

    def _channel_mix(self, stage: Stage, layer: int, x: torch.Tensor, h: torch.Tensor, timers: dict,
                     t0: float) -> torch.Tensor:
        """A layer's per-token half after its token mixing (x: the residual stream, h: its normed input; t0: when
        the layer began): the dense MLP, or the router, the shared expert and the routed experts."""
        model, clock = stage.model, stage.routed._clock
        if not self.config.is_moe_layer(layer):
            x = x + model.dense_mlp(layer, h)
            timers["attention_ms"] += (clock() - t0) * 1e3
            return x
        t1 = clock()
        timers["attention_ms"] += (t1 - t0) * 1e3
        projections = model.moe_projections(layer, h)
        topk_ids, topk_weights, _ = model.route(layer, projections, self.experts_per_token)
        timers["routing_ms"] += (clock() - t1) * 1e3
        return x + stage.routed(layer, h, topk_ids, topk_weights, lambda: model.shared_expert(layer, projections),
                                self._expert_times)

    def _run_stage_batch(self, stage: Stage, x: torch.Tensor, sizes: list[int], states: list, timers: dict
                         ) -> torch.Tensor:
        """The layers of one device's block for several sequences' rows of x (sizes[i] rows each, in order)."""
        bounds = list(zip(itertools.accumulate([0] + sizes[:-1]), itertools.accumulate(sizes)))
        for layer in stage.layers:
            t0 = stage.routed._clock()
            x, h = stage.model.mix_many(layer, x, states, bounds)
            x = self._channel_mix(stage, layer, x, h, timers, t0)
        return x

    def _check_tokens(self, token_ids: list[int]) -> None:
        if len(token_ids) == 0:
            raise FlashMoeError("no tokens given")
        bad = [t for t in token_ids if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise FlashMoeError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of a fresh sequence: float32 [len(token_ids), vocab]."""
        return self.forward(list(token_ids), self.new_state())

    def generate(self, token_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_token_ids: list[int] | None = None,
                 constraint: TokenConstraint | None = None, prefill_chunk: int | None = None,
                 keep_at: tuple[int, ...] = ()) -> Iterator[int | None]:
        """Yield new token ids as they are made; stops after max_new_tokens or on a stop token (which is yielded).

        stop_token_ids=None stops on the model's end-of-sequence tokens; [] never stops early. `constraint`
        (a grammar, see grammar.py) masks the logits of each step and ends generation when it is complete.
        prefill_chunk: the prompt goes through this many tokens at a time, and None is yielded after each chunk but
        the last, so a caller serving others can run them in between (the result is the same as in one pass).
        With a prefix cache (load(prefix_cache_gb=...)), the state is kept at the end of the prompt, at the end of
        the reply, and at each position in `keep_at` (a chat's end of history before the reply's header: where the
        next turn re-renders the reply differently, thinking dropped, it still starts from there).
        """
        seq = self.sequence(token_ids, max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids, constraint,
                            prefill_chunk, keep_at)
        try:
            while not seq.done:
                token = seq.advance(self.step([seq])[0])
                if token is not None:
                    yield token
                elif prefill_chunk and not seq.done:  # a caller serving others asked for its turns
                    yield None
        finally:
            seq.close()

    def sequence(self, token_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_token_ids: list[int] | None = None,
                 constraint: TokenConstraint | None = None, prefill_chunk: int | None = None,
                 keep_at: tuple[int, ...] = ()) -> Sequence:
        """A generation as steps (sequence.py), for a caller that runs several at once through step()."""
        return Sequence(self, token_ids, max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids, constraint,
                        prefill_chunk, keep_at)

    def step(self, sequences: list[Sequence]) -> list[torch.Tensor]:
        """One forward for all of `sequences` (each its next prompt chunk or its last token: Sequence.begin), their
        logits [1, vocab] in order, for each one's Sequence.advance."""
        inputs = [(seq.begin(), seq.state) for seq in sequences]
        t0 = time.perf_counter()
        rows = self.forward_batch(inputs)  # on the device: each sequence samples its row there (Sequence.advance)
        greedy = [i for i, seq in enumerate(sequences) if seq.greedy and seq.prompt_done]
        if len(greedy) > 1:  # their argmaxes in one op (on a GPU one wait), not one each
            picks = torch.cat([rows[i][-1:] for i in greedy]).argmax(-1).tolist()
            for i, token in zip(greedy, picks):
                sequences[i].picked = token
        elif rows[0].is_cuda:  # the step's time is the GPU's too (a graph's replay returns at once)
            torch.cuda.synchronize(rows[0].device)
        phase = "decode_ms" if all(seq.prompt_done for seq in sequences) else "prefill_ms"
        self._tokens[phase] += (time.perf_counter() - t0) * 1e3
        return rows

    @torch.inference_mode()
    def forward_batch(self, inputs: list[tuple[list[int], object]]) -> list[torch.Tensor]:
        """Several sequences' tokens in one pass: (tokens, state) each, every state updated as forward() would, and
        each one's float32 logits [1, vocab] of its last token. Everything per token (norms, the token mixers'
        projections, the MoE input, router, shared and routed experts) runs once over all their rows, so a weight
        several sequences need is read once; the attention and the recurrences themselves per sequence
        (the family's mix_many). On one GPU holding every expert the decode tokens
        step as one CUDA graph (_graphed_batch), else eagerly; one sequence (decoding through its own graph:
        graph_per_sequence, or sharing its experts with the CPU) and a model over several ranks take forward() one
        sequence at a time."""
        graphs = self.pipeline is None and self._batch_graphs
        alone = len(inputs) == 1 and (self._lone_graphs or len(inputs[0][0]) > 1 or not graphs)
        if alone or self.pipeline is not None:
            return [self.forward(ids, state, all_logits=False) for ids, state in inputs]
        if graphs and (rows := self._graphed_batch(inputs)) is not None:
            return rows
        return self._eager_batch(inputs)

    def _eager_batch(self, inputs: list[tuple[list[int], object]]) -> list[torch.Tensor]:
        """forward_batch without graphs: every layer eagerly over all the inputs' rows."""
        for ids, _ in inputs:
            self._check_tokens(ids)
        sizes = [len(ids) for ids, _ in inputs]
        states = [state for _, state in inputs]
        for routing in self.trace_routing:
            routing.begin_batch(list(zip(states, sizes)))
        with _on(self.device):
            x = self.model.embed(torch.tensor([t for ids, _ in inputs for t in ids], dtype=torch.long,
                                              device=self.device))
        for stage in self.stages:
            with _on(stage.device):
                x = self._run_stage_batch(stage, x.to(stage.device), sizes, states, self._timers)
        self._timers["expert_io_ms"] = self._expert_times.io_wait_ms
        self._timers["expert_compute_ms"] = self._expert_times.compute_ms
        for state, n in zip(states, sizes):
            state.position += n  # decode_steps stays: a sequence's first graphed step follows an eager one-token step
        for stage in self.stages:
            stage.fetcher.tick()
        self._tokens["tokens"] += sum(sizes)
        last_rows = torch.tensor(list(itertools.accumulate(sizes)), device=x.device) - 1
        with _on(self.stages[-1].device):
            logits = self.stages[-1].model.logits(x[last_rows])
        return list(logits.split(1))

    @property
    def batches_well(self) -> bool:
        """Whether running sequences step faster together (forward_batch) than one forward each: on the CPU (8
        streams 1.9-2.0x on the 2-core VM, RESULTS.md), and on a GPU whose every expert is resident (one graph for
        the batch); not on a GPU streaming experts, whose batched steps run eagerly (H200, 35B-A3B-shaped, 8 streams:
        505 tok/s a step each, 193 batched)."""
        return self.device.type == "cpu" or self._batch_graphs

    @property
    def _batch_graphs(self) -> bool:
        """A batch's decode step may be one graph: step graphs apply and every expert is resident. With a CPU share
        (cpu_share.py) the batch's graph reads every RAM-held expert over PCIe; a lone sequence shares them."""
        stage = self.stages[0]
        return self._step_graphs and stage.fetcher.resident_slots() is not None

    @property
    def _lone_graphs(self) -> bool:
        """A lone decoding sequence steps through its own graphs, not the batch's of one: graph_per_sequence, or
        the CPU computes a share of its RAM-held experts (per-layer graphs around the host's part)."""
        graphs = self.stages[0].graphs
        return self.graph_per_sequence or (graphs is not None and graphs.cpu_share is not None)

    def _graphed_batch(self, inputs: list[tuple[list[int], object]]) -> list[torch.Tensor] | None:
        """forward_batch where decode steps are graphs (every expert resident on one GPU): the decode tokens in one
        graph for all (DecodeGraphs.batched_step), prompt chunks eagerly beside it (together when several: a burst
        of requests at the 397B geometry spent more time in their prefills, ~17 ms each alone, than in 64 batched
        decode steps). Asked only where _batch_graphs holds; None where the step graph does not apply after all."""
        decoding = [i for i, (ids, _) in enumerate(inputs) if len(ids) == 1]
        rows: list = [None] * len(inputs)
        if len(decoding) > 1 or (decoding and not self._lone_graphs):
            stage = self.stages[0]
            tokens, states = [inputs[i][0][0] for i in decoding], [inputs[i][1] for i in decoding]
            self._check_tokens(tokens)
            for routing in self.trace_routing:
                routing.begin_batch([(state, 1) for state in states])
            with _on(stage.device):
                t0 = time.perf_counter()
                logits = stage.graphs.batched_step(tokens, states, stage.layers)
            if logits is None:
                return None
            self._expert_times.compute_ms += (time.perf_counter() - t0) * 1e3
            for i, state, row in zip(decoding, states, logits.split(1)):
                rows[i] = row
                state.position += 1
                state.decode_steps += 1
            stage.fetcher.tick()
            self._tokens["tokens"] += len(states)
        prompts = [i for i, (ids, _) in enumerate(inputs) if rows[i] is None and len(ids) > 1]
        if len(prompts) > 1:  # prompt chunks together, eagerly: each layer's launches and expert passes once for all
            for i, row in zip(prompts, self._eager_batch([inputs[i] for i in prompts])):
                rows[i] = row
        for i, (ids, state) in enumerate(inputs):
            if rows[i] is None:  # a lone prompt chunk, or a lone decoder (its own graph)
                rows[i] = self.forward(ids, state, all_logits=False)
        return rows

    def forget(self, state) -> None:
        """`state`'s sequence is done: graphs shared with others let go of it."""
        for stage in self.stages:
            if stage.graphs is not None:
                stage.graphs.forget(state)

    def _resume(self, ids: list[int]):
        """A state for `ids`: a copy of the prefix cache's longest kept prefix of them, and how many tokens it holds;
        else a new state and 0."""
        state = self.new_state()
        snap = self.prefix_cache.longest(ids) if self.prefix_cache is not None else None
        if snap is None:
            return state, 0
        state.layers = PrefixCache.restore(snap)
        state.position = len(snap.tokens)
        return state, len(snap.tokens)

    def _keep(self, tokens: list[int], state) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.put(tokens, state.layers)

    @property
    def caches_hold_every_expert(self) -> bool:
        """Whether one tier has room for every expert (every device's VRAM for its layers', or the RAM one for all:
        the tiers are inclusive, so two half-sized ones hold the same half): then warm_cache() moves the whole model
        in and no decode step waits on the disk again."""
        f = [s.fetcher for s in self.stages]
        ram = {id(x.ram): x.ram.cached_slots for x in f}  # stages may share one RAM tier
        return (all(x.vram is not None and x.vram.cached_slots >= x.every_expert for x in f)
                or sum(ram.values()) >= sum(x.every_expert for x in f))

    def warm_batches(self, max_sequences: int) -> list[int]:
        """Compile and capture, before any request, the batch graphs that up to `max_sequences` decoding sequences
        will use (one per power-of-two batch size, from one where no sequence has a graph of its own:
        _lone_graphs; DecodeGraphs.batched_step), so no request pays for them (at the 397B geometry two
        streams through the server made 187 tok/s while their batch size was new, 705 warmed). Throwaway sequences;
        the batch sizes warmed, none where batches are not graphs (the CPU, experts not all resident)."""
        sizes, first = [], 1 if self._lone_graphs else 0  # a bucket of one too
        with self._throwaway():
            while self.pipeline is None and self._batch_graphs and (n := 1 << len(sizes) + first) < 2 * max_sequences:
                # the prompts, then eager, captured and replayed batch steps
                self._run_to_end([self.sequence([i % self.config.vocab_size] * 2, 4, stop_token_ids=[])
                                  for i in range(n)])
                sizes.append(n)
        return sizes

    def warm_prompts(self, chunk: int = 512) -> None:
        """Compile and tune, before any request, the GPU kernels a prompt meets: a throwaway prompt of `chunk` tokens
        (the server's prefill chunk) and a continuation of 64 from its state, as a long prompt's next chunk or a turn
        after a prefix-cache hit runs. fla-core tunes its recurrent layers' prompt kernels apart with and without a state
        to start from: at the 397B geometry on the H200 12.8 s and 15.3 s the first time, during which every running
        stream waited (RESULTS.md). Only where the caches hold every expert (warm_cache): elsewhere a prompt reads
        most of a layer's experts from disk; nothing on the CPU, whose kernels are built at load. fla-core keeps
        its tunings on disk, so this is the slow first start of a machine, seconds after."""
        if self.device.type == "cpu" or not self.caches_hold_every_expert:
            return
        ids = [(7 * i + 11) % self.config.vocab_size for i in range(chunk + 64)]
        with self._throwaway():
            self._run_to_end([self.sequence(ids, 2, stop_token_ids=[], prefill_chunk=chunk)])

    @contextlib.contextmanager
    def _throwaway(self) -> Iterator[None]:
        """Warm-up sequences: none of their states kept in the prefix cache, their stats cleared after."""
        kept, self.prefix_cache = self.prefix_cache, None
        try:
            yield
        finally:
            self.prefix_cache = kept
            self.reset_stats()

    def _run_to_end(self, seqs: list[Sequence]) -> None:
        try:
            while not all(s.done for s in seqs):
                for seq, row in zip(seqs, self.step(seqs)):
                    seq.advance(row)
        finally:
            for seq in seqs:
                seq.close()

    def warm_cache(self, progress: Callable[[int], None] | None = None) -> None:
        """Read every expert once, layer by layer, so the caches (VRAM first, then RAM) hold as many as their
        budgets allow; the stats of the warm-up are then cleared. For a model that fits, this moves it in.
        progress(n): called with the bytes of each batch of experts once it is in."""
        blob = self.store.expert_blob_bytes
        for stage in self.stages:
            f = stage.fetcher
            with _on(stage.device):
                for layer in sorted(f.layers):
                    for i in range(0, self.config.num_experts, f.batch_experts):
                        batch = list(range(i, min(i + f.batch_experts, self.config.num_experts)))
                        with f.fetch(layer, batch) as fetch:
                            if f.on_gpu:
                                f.gpu_slots(fetch)
                            else:
                                for _ in f.arrivals(fetch):
                                    pass
                        if progress is not None:
                            progress(len(batch) * blob)
                if f.on_gpu:
                    torch.cuda.synchronize(stage.device)
        self.reset_stats()

    # ---- stats ----------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        fetchers = [s.fetcher for s in self.stages]
        for f in fetchers:
            f.take_resident_counts()
        f, t = self.fetcher, self._tokens
        shares = [s.graphs.cpu_share for s in self.stages if s.graphs is not None and s.graphs.cpu_share is not None]
        decode_steps = max(t["generated_tokens"] - 1, 0)
        out = {
            **t,
            "expert_reads": sum(f.stats.expert_reads for f in fetchers),
            "expert_bytes_read": sum(f.stats.expert_bytes_read for f in fetchers),
            "cache_hits": f.ram.stats.hits,
            "cache_misses": f.ram.stats.misses,
            "cache_evictions": f.ram.stats.evictions,
            "cache_hit_rate": f.ram.stats.hit_rate,
            "cache_bytes": len(f.ram) * self.store.expert_blob_bytes,
        }
        if self.prefix_cache is not None:
            out.update({f"prefix_{k}": v for k, v in self.prefix_cache.stats.__dict__.items()})
        if f.vram is not None:
            tiers = [f.vram for f in fetchers]
            hits, misses = sum(v.stats.hits for v in tiers), sum(v.stats.misses for v in tiers)
            out.update({
                "vram_cache_hits": hits,
                "vram_cache_misses": misses,
                "vram_cache_evictions": sum(v.stats.evictions for v in tiers),
                "vram_cache_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                "vram_cache_bytes": sum(len(v) for v in tiers) * self.store.expert_blob_bytes,
                "expert_bytes_copied": sum(f.stats.expert_bytes_copied for f in fetchers),
                # the RAM-held experts the GPU read over PCIe; those the CPU computed instead are experts_on_cpu
                "expert_bytes_zero_copy": sum(f.stats.expert_bytes_zero_copy for f in fetchers)
                - sum(s.experts_on_cpu for s in shares) * self.store.expert_blob_bytes,
            })
            if shares:
                out.update(experts_on_cpu=sum(s.experts_on_cpu for s in shares),
                           experts_over_pcie=sum(s.experts_over_pcie for s in shares),
                           tokens_shared_with_cpu=max(s.tokens_shared for s in shares),
                           cpu_share=[round(s.fraction, 3) for s in shares],
                           cpu_share_gpu_ms=round(sum(s.gpu_ms for s in shares), 3),
                           cpu_share_cpu_ms=round(sum(s.cpu_ms for s in shares), 3))
        out.update({k: round(v, 3) for k, v in self._timers.items()})
        out["decode_tokens_per_s"] = decode_steps / (t["decode_ms"] / 1e3) if t["decode_ms"] else 0.0
        return out

    def reset_stats(self) -> None:
        for stage in self.stages:
            f = stage.fetcher
            f.take_resident_counts()  # and drop them with the rest
            f.stats = type(f.stats)()
            if stage.graphs is not None and stage.graphs.cpu_share is not None:
                share = stage.graphs.cpu_share
                share.experts_on_cpu = share.experts_over_pcie = share.tokens_shared = 0
                share.gpu_ms = share.cpu_ms = 0.0
            for tier in (f.ram, f.vram):
                if tier is not None:
                    tier.stats = type(tier.stats)()
        self._timers = dict.fromkeys(TIMERS, 0.0)
        self._expert_times = ExpertTimes()
        self._tokens = dict.fromkeys(self._tokens, 0)
        if self.layer_events is not None:
            self.layer_events.clear()
        if self.prefix_cache is not None:  # what it holds stays; the counts start again
            st = self.prefix_cache.stats
            st.hits = st.misses = st.tokens_saved = 0

    def layers_gpu_ms(self) -> float:
        """Milliseconds of GPU timeline spent in the layers since layer_events was set (or the stats reset); over
        several devices, the sum of each block's time (the hops between them left out)."""
        for stage in self.stages:
            torch.cuda.synchronize(stage.device)
        return sum(start.elapsed_time(end) for start, end in self.layer_events or [])

    def close(self) -> None:
        if self.pipeline is not None and self.pipeline.led and self.pipeline.first and not self._closed:
            try:
                self.pipeline.announce("stop")  # the followers' loops end
            except RuntimeError:  # they are gone already (torchrun passes a SIGTERM to every rank)
                pass
        self._closed = True
        for stage in reversed(self.stages):  # the first owns the RAM tier and the reads: it goes last
            stage.fetcher.close()
        if self.pipeline is not None:
            self.pipeline.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
