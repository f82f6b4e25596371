"""The CPU path's own kernels (cpu_native.c): products of activations with matrices in the store's affine format,
read where they lie; a layer's routed experts in one call; and the small ops around a layer (Gated DeltaNet's decode
step, RMSNorm, the conv step, DeltaNet's gates, the softmax router), one call each instead of 5-30 torch ops.

Why our own: torch's int4 kernel wants its own packed layout (a prepare per expert as it lands, and RAM slots 11%
larger at 8 bits), reads ~24 GB/s of a 16-core machine's 115 at one token, and a layer took ~50 torch ops, each an
OpenMP fork/join. Here a layer's experts are one call, one parallel region.

The C file is compiled on first use with the system's C compiler (`$CC`, else cc) for this machine
(-O3 -march=native -fopenmp) into ~/.cache/flashmoe (or $FLASHMOE_CACHE_DIR), keyed by the source, the compiler
and the CPU. Without a compiler, or with FLASHMOE_NATIVE=0, `library()` is None and the CPU path uses torch's int4
kernel (kernels/cpu_int4.py). Its OpenMP is torch's own runtime: both name libgomp.so.1, which the loader shares.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..quant import QuantizedTensor, dequantize, quantize
from ..store import BlobLayout
from .moe import PLAIN, ExpertMath

SOURCE = Path(__file__).with_name("cpu_native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# above this many rows a float GEMM over the dequantized matrix wins (the kernel is a dot per row and token): 64 on
# float activations; on int8 ones the kernel still wins at 256 (12288x2048 at 8 bits, 2 cores: 72 ms against 126 for
# dequantizing + torch's GEMM, whose dequantization alone is 80)
KERNEL_MAX_ROWS = 64
KERNEL_MAX_ROWS_INT8 = 1024
MATRIX_UNIT_ROWS = 32  # from this many rows of input a resident product goes to the matrix units, where there are
MATRIX_UNIT_MAX_WEIGHTS = 1 << 27  # ... unless its bf16 copy would exceed 256 MB (a 248k-token head: our kernel)
# round the activations to int8 per 32 inputs where the CPU has AVX-512 VNNI (2.2x the float path's weights per
# second at 4 bits on one core, 12288x2048; llama.cpp's CPU path rounds them too): FLASHMOE_CPU_ACTIVATIONS=float
# keeps them exact. Read when a matrix or a store's experts are set up.
INT8_ACTIVATIONS = os.environ.get("FLASHMOE_CPU_ACTIVATIONS", "int8") != "float"


class Matrix(ctypes.Structure):
    """fm_matrix: where a matrix's codes, scales, biases (and output bias) sit, as byte offsets from a base."""

    _fields_ = [("packed", ctypes.c_int64), ("scales", ctypes.c_int64), ("biases", ctypes.c_int64),
                ("bias", ctypes.c_int64), ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("bits", ctypes.c_int32),
                ("group", ctypes.c_int32), ("bf16", ctypes.c_int32), ("q8", ctypes.c_int32)]


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("FLASHMOE_CACHE_DIR") or Path.home() / ".cache" / "flashmoe"
    return Path(root) / "native"


def _compile(cc: str, out: Path) -> str | None:
    """Build the library at `out` (atomically); the compiler's complaint on failure, else None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        lib = Path(tmp) / out.name
        run = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(lib), "-lm"], capture_output=True, text=True)
        if run.returncode:
            return (run.stderr.strip().splitlines() or ["failed"])[-1]
        os.replace(lib, out)
    return None


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built here on first use; None where they cannot be (said once on stderr)."""
    if os.environ.get("FLASHMOE_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        print(f"flashmoe: no C compiler ({cc}); the CPU path uses torch's kernels (slower). Install gcc, or set CC.",
              file=sys.stderr)
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_id()]).encode())
    path = _cache_dir() / f"cpu_native-{key.hexdigest()[:16]}.so"
    if not path.exists():
        try:
            error = _compile(cc, path)
        except OSError as e:
            error = str(e)
        if error:
            print(f"flashmoe: could not build the CPU kernels ({error}); using torch's (slower).", file=sys.stderr)
            return None
    lib = ctypes.CDLL(str(path))
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    mat = ctypes.POINTER(Matrix)
    lib.fm_linear.argtypes = [mat, i32, ptr, ptr, ptr, ptr, i32]
    lib.fm_linear.restype = None
    lib.fm_moe.argtypes = [mat, mat, i32, ptr, ptr, ptr, ptr, i32, ptr, f32, f32, ptr, i32, ptr, ptr, ptr, ptr, ptr,
                           i32]
    lib.fm_moe.restype = None
    lib.fm_moe_post.argtypes = lib.fm_moe.argtypes + [ptr, ctypes.c_int64]
    lib.fm_moe_post.restype = ctypes.c_int
    lib.fm_gated_delta_step.argtypes = [i32, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.fm_gated_delta_step.restype = None
    lib.fm_has_q8.restype = ctypes.c_int
    lib.fm_q8_path.argtypes = [mat]
    lib.fm_q8_path.restype = ctypes.c_int
    lib.fm_rms_norm.argtypes = [i32, i32, ptr, ptr, ptr, ptr, i32, f32, ptr, ptr, i32]
    lib.fm_conv_step.argtypes = [i32, i32, ptr, ptr, ptr, ptr]
    lib.fm_delta_gates.argtypes = [i32, i32, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.fm_route_softmax.argtypes = [i32, i32, ptr, i32, i32, i32, ptr, ptr]
    lib.fm_qk_norm_rope.argtypes = [i32, ptr, ctypes.c_int64, ptr, ptr, ptr, ptr, i32, i32, i32, i32, f32, i32, i32,
                                    ptr, ptr]
    lib.fm_delta_decode.argtypes = [i32, i32, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, f32, ptr, ptr, i32]
    lib.fm_dequant_bf16.argtypes = [mat, ptr, ptr, i32]
    for f in (lib.fm_rms_norm, lib.fm_conv_step, lib.fm_delta_gates, lib.fm_route_softmax, lib.fm_qk_norm_rope,
              lib.fm_delta_decode, lib.fm_dequant_bf16):
        f.restype = None
    return lib


@lru_cache(maxsize=None)
def matrix_units() -> bool:
    """Whether torch's bf16 matrix products (oneDNN) outrun our vector kernel here once a product has a few dozen
    rows of input: on the CPU's matrix units (Intel AMX: several times, benchmarks/cpu_prompt.py), or with AVX-512
    BF16 dot products (AMD Zen 4, 2-core VM: 1.5x at 32 rows, 2.5-3.7x at 512, RESULTS.md). FLASHMOE_CPU_AMX=0 turns
    their use off; so does FLASHMOE_CPU_ACTIVATIONS=float (bf16 rounds the activations)."""
    cpu = torch.cpu
    amx = (bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
           and bool(getattr(cpu, "_init_amx", lambda: False)()))  # in the CPU, and granted by the OS (a VM may refuse)
    bf16_dots = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    return library() is not None and os.environ.get("FLASHMOE_CPU_AMX", "1") != "0" and (amx or bf16_dots)


_scratch = threading.local()


def _bf16_scratch(numel: int) -> torch.Tensor:
    """This thread's buffer for a matrix dequantized to bf16, kept between products: a fresh 50 MB tensor each time
    cost 25 ms in first-touch page faults, the dequantization itself 4."""
    buf = getattr(_scratch, "bf16", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.bf16 = torch.empty(numel, dtype=torch.bfloat16)
    return buf[:numel]


def _bf16_product(m: Matrix, base: int | None, rows: torch.Tensor) -> torch.Tensor:
    """rows @ W^T in bf16 on the matrix units, W being matrix m (at base: an expert's slot, or None for absolute
    addresses) dequantized by our kernel into the kept buffer: float32 [rows, m.n]."""
    w = _bf16_scratch(m.n * m.k).view(m.n, m.k)
    library().fm_dequant_bf16(m, base, _ptr(w), torch.get_num_threads())
    return F.linear(rows.to(torch.bfloat16), w).float()


def int8_activations() -> bool:
    """Whether the kernels round activations to int8 here (built for a CPU with AVX-512 VNNI, and not turned off)."""
    return library() is not None and INT8_ACTIVATIONS and bool(library().fm_has_q8())


def fits(bits: int, group_size: int, k: int) -> bool:
    """Whether the kernels take a matrix of `k` inputs with these codes: their vector loops read 32 inputs a step at
    4 bits, 16 at 8, 4 at 2, never across a group."""
    step = {4: 32, 8: 16, 2: 4}.get(bits)
    return step is not None and group_size % step == 0 and k % group_size == 0


_SCALE_DTYPES = {torch.float16: 0, torch.bfloat16: 1}


def _ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's address for the C side; None (NULL) for an argument left out."""
    return None if t is None else t.data_ptr()


# ---- resident matrices ---------------------------------------------------------------------------
@dataclass
class NativeMatrix:
    """A resident [N, K] weight kept group-wise affine (quantized at load, or an MLX import's own codes), multiplied
    by fm_linear for a few rows of input and by a float GEMM over its dequantized copy for many."""

    q: QuantizedTensor
    matrix: Matrix
    max_rows: int  # more rows of input than this go through a float GEMM instead
    linear: object  # the library's fm_linear this matrix was set up for
    # one token's scratch, kept: a decode step calls each matrix once, and ~20 us of Python per call (allocations,
    # lookups) is a tenth of a layer's time on 16 cores
    _one: tuple = ()

    @classmethod
    def from_quantized(cls, q: QuantizedTensor) -> "NativeMatrix | None":
        """None when the kernels cannot take it (codes or scales they do not read, or groups that do not fit)."""
        n, k = q.shape
        if (library() is None or q.biases is None or q.scales.dtype not in _SCALE_DTYPES
                or q.packed.device.type != "cpu" or not fits(q.bits, q.group_size, k)):
            return None
        q = QuantizedTensor(q.packed.contiguous(), q.scales.contiguous(), q.biases.contiguous(), q.bits, q.group_size)
        m = Matrix(_ptr(q.packed), _ptr(q.scales), _ptr(q.biases), -1, n, k, q.bits, q.group_size,
                   _SCALE_DTYPES[q.scales.dtype], INT8_ACTIVATIONS)
        lib = library()
        return cls(q, m, KERNEL_MAX_ROWS_INT8 if lib.fm_q8_path(m) else KERNEL_MAX_ROWS, lib.fm_linear)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int) -> "NativeMatrix | None":
        if not fits(bits, group_size, weight.shape[1]):
            return None
        return cls.from_quantized(quantize(weight, bits, group_size))

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        n, k = self.matrix.n, self.matrix.k
        rows = x.reshape(-1, k)
        t = rows.shape[0]
        # a prompt: bf16 on AMX, unless exact activations were asked for (FLASHMOE_CPU_ACTIVATIONS=float)
        if self.matrix.q8 and t >= MATRIX_UNIT_ROWS and n * k <= MATRIX_UNIT_MAX_WEIGHTS and matrix_units():
            return _bf16_product(self.matrix, None, rows).to(x.dtype).view(*x.shape[:-1], n)
        if t > self.max_rows:
            return F.linear(rows.float(), dequantize(self.q)).to(x.dtype).view(*x.shape[:-1], n)
        rows = rows.float().contiguous()
        y = torch.empty(t, n)
        if t == 1:
            if not self._one:
                self._one = (torch.empty(1, k), torch.empty(1, k // self.q.group_size))
            xa, xs = self._one
        else:
            xa, xs = torch.empty_like(rows), torch.empty(t, k // self.q.group_size)
        self.linear(self.matrix, t, _ptr(rows), _ptr(y), _ptr(xa), _ptr(xs), torch.get_num_threads())
        return y if x.dtype == torch.float32 and x.dim() == 2 else y.to(x.dtype).view(*x.shape[:-1], n)


# ---- routed experts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NativeExperts:
    """A store's experts as the kernels read them: the blob as stored, so a RAM slot holds exactly what was read
    (`prepare` has nothing to do). `run` multiplies a layer's (token, expert) pairs through their slots in one call."""

    gate_up: Matrix
    down: Matrix
    blob: BlobLayout
    group_size: int
    expert_math: ExpertMath = PLAIN
    moe: object = None  # the library's fm_moe these were set up for
    _scratch: dict = field(default_factory=dict, compare=False)  # (tokens, pairs) -> scratch tensors
    _zeros: dict = field(default_factory=dict, compare=False)  # pairs -> a ctypes int32 array of zeros (token ids)

    @classmethod
    def for_store(cls, blob: BlobLayout, hidden: int, inter: int, bits: int | None, group_size: int | None,
                  expert_math: ExpertMath = PLAIN) -> "NativeExperts | None":
        """None when the kernels cannot run these experts (unquantized, MXFP4 or FP8 codes, or groups they do not
        fit): kernels/cpu_int4.py's form takes those."""
        if library() is None or bits is None or blob is None:
            return None
        seg = {s.name: s for s in blob.segments}
        matrices = []
        for name, (n, k) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
            parts = [seg.get(f"{name}.{p}") for p in ("packed", "scales", "biases")]
            if None in parts or parts[1].dtype not in ("float16", "bfloat16") or not fits(bits, group_size, k):
                return None
            bias = seg.get(f"{name}.bias")
            matrices.append(Matrix(parts[0].offset, parts[1].offset, parts[2].offset,
                                   -1 if bias is None else bias.offset, n, k, bits, group_size,
                                   int(parts[1].dtype == "bfloat16"), INT8_ACTIVATIONS))
        return cls(*matrices, blob, group_size, expert_math, library().fm_moe)

    @property
    def slot_bytes(self) -> int:
        return self.blob.blob_bytes

    def prepare(self, slot: torch.Tensor) -> None:
        """Nothing: the kernels read the blob as stored."""

    def run(self, x: torch.Tensor, slots: list[torch.Tensor], first: list[int], token: torch.Tensor,
            weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out[t] (+)= sum over pairs p of token t: weight[p] * expert(x[t]), where expert e's pairs are
        first[e]..first[e+1] and its blob is slots[e]. x [T, H] -> [T, H] float32: a new tensor, or added into `out`,
        element by element in the order one call over all the experts would have used. Where the matrix units serve
        (a long prompt's experts with MATRIX_UNIT_ROWS pairs or more: in bf16) their sums come after the others',
        so the bits then depend on how a layer's experts were split into calls."""
        t, hidden = x.shape
        x = x.float().contiguous()
        accumulate = out is not None
        if out is None:
            out = torch.empty(t, hidden)
        assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (t, hidden)
        token, weight = token.to(torch.int32).contiguous(), weight.float().contiguous()
        big = self._unit_experts(first)
        if big:  # the rest through our kernel first, then each of these on the matrix units, adding into out
            slots, first, token, weight, big = self._without(big, slots, first, token, weight)
        args, scratch = self._moe_args(x, [_ptr(s) for s in slots], first, _ptr(token), _ptr(weight), out, accumulate,
                                       torch.get_num_threads())
        self.moe(*args)  # `scratch`, token and weight keep what args point into alive until here
        for slot, tokens, weights in big:
            self._unit_expert(x, slot, tokens, weights, out)
        return out

    def _unit_experts(self, first: list[int]) -> list[int]:
        """The experts (indices into first) with enough pairs for the matrix units: a long prompt's (one of 512
        tokens gives an expert ~10-16 of them, below the break-even, so those stay on our kernel)."""
        if not (self.gate_up.q8 and first[-1] >= MATRIX_UNIT_ROWS and matrix_units()):
            return []
        return [e for e in range(len(first) - 1) if first[e + 1] - first[e] >= MATRIX_UNIT_ROWS]

    @staticmethod
    def _without(big: list[int], slots, first, token, weight):
        """run()'s arguments less the `big` experts, and those experts' (slot, tokens, weights)."""
        taken, keep_slots, keep_first, keep = [], [], [0], []
        chosen = set(big)
        for e, slot in enumerate(slots):
            pairs = slice(first[e], first[e + 1])
            if e in chosen:
                taken.append((slot, token[pairs].long(), weight[pairs]))
            else:
                keep_slots.append(slot)
                keep_first.append(keep_first[-1] + first[e + 1] - first[e])
                keep.append(torch.arange(first[e], first[e + 1]))
        rows = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
        return keep_slots, keep_first, token[rows].contiguous(), weight[rows].contiguous(), taken

    def _unit_expert(self, x: torch.Tensor, slot: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
                     out: torch.Tensor) -> None:
        """out[tokens] += weights * expert(x[tokens]) in bf16 on the matrix units, each matrix dequantized from the
        slot by our kernel into the kept buffer (the two in turn)."""
        inter = self.down.k

        def product(m: Matrix, rows: torch.Tensor) -> torch.Tensor:
            y = _bf16_product(m, _ptr(slot), rows)
            return y if m.bias < 0 else y + slot[m.bias : m.bias + 4 * m.n].view(torch.float32)

        h = product(self.gate_up, x[tokens])
        act = self.expert_math.activation(h[:, :inter], h[:, inter:])
        out.index_add_(0, tokens, product(self.down, act) * weights[:, None])

    def run_token(self, x: torch.Tensor, slot_pointers: list[int], weights: list[float]) -> torch.Tensor:
        """run() for one token [1, H] whose experts (one pair each, ascending) are in RAM at `slot_pointers` (blob
        addresses), with `weights` as floats: a decode step's call, built without torch ops (each costs
        microseconds a layer on one core while the kernels' cores wait). Same sums as run()."""
        x = x.float().contiguous()
        out = torch.empty(1, x.shape[1])
        n = len(slot_pointers)
        zeros = self._zeros.get(n)
        if zeros is None:
            zeros = self._zeros[n] = (ctypes.c_int32 * n)()
        args, _ = self._moe_args(x, slot_pointers, list(range(n + 1)), zeros, (ctypes.c_float * n)(*weights), out,
                                 False, torch.get_num_threads())  # one token's scratch is kept by the form
        self.moe(*args)
        return out

    def post(self, x: torch.Tensor, slots: list[torch.Tensor], first: list[int], weight: torch.Tensor,
             out: torch.Tensor, done: torch.Tensor, job: int, threads: int) -> None:
        """run() for one token on the library's worker thread, without waiting: out [1, H] float32 is overwritten
        with the sum, then done[1] = its nanoseconds and done[0] = job (int64, pinned: a GPU stream may wait on it,
        kernels/host_wait.py). x, out, done and the scratch (kept: one token's) must live until done[0] says so; the
        rest is copied."""
        assert x.dtype == torch.float32 and x.is_contiguous() and out.dtype == torch.float32 and out.is_contiguous()
        assert x.shape[0] == 1 and done.dtype == torch.int64 and done.numel() >= 2
        token, weight = torch.zeros(first[-1], dtype=torch.int32), weight.float().contiguous()
        args, _ = self._moe_args(x, [_ptr(s) for s in slots], first, _ptr(token), _ptr(weight), out, False, threads)
        status = library().fm_moe_post(*args, _ptr(done), job)
        if status != 0:
            raise RuntimeError(f"fm_moe_post refused the call ({status}: more than 64 pairs, or no thread)")

    def _moe_args(self, x, addresses: list[int], first, token, weight, out, accumulate: bool, threads: int):
        """fm_moe's arguments (fm_moe_post takes them and two more) for the experts' blobs at `addresses`; token
        (int32) and weight (float32) as the C side reads them: an address or a ctypes array. Returns them and the
        scratch they point into, for the caller to hold through the call (with token and weight)."""
        t, pairs = x.shape[0], first[-1]
        scratch = self._scratch.get((t, pairs)) or self._new_scratch(t, pairs)
        math = self.expert_math
        args = (self.gate_up, self.down, len(addresses), (ctypes.c_int64 * len(addresses))(*addresses),
                (ctypes.c_int32 * len(first))(*first), token, weight, t, _ptr(x), math.limit, math.alpha, _ptr(out),
                int(accumulate), *map(_ptr, scratch), threads)
        return args, scratch

    def _new_scratch(self, t: int, pairs: int) -> tuple[torch.Tensor, ...]:
        """Scratch for t tokens and their pairs; one token's is kept (a decode step's shape, every layer, every
        token: allocating it each time was ~10 of the call's ~60 us of Python)."""
        hidden, inter, g = self.gate_up.k, self.down.k, self.group_size
        tensors = (torch.empty(t, hidden), torch.empty(t, hidden // g), torch.empty(pairs, 2 * inter),
                   torch.empty(pairs, inter), torch.empty(pairs, inter // g))
        if t == 1:
            self._scratch[(t, pairs)] = tensors
        return tensors


# ---- Gated DeltaNet ------------------------------------------------------------------------------
def gated_delta_step(q, k, v, g, beta, state: torch.Tensor | None):
    """One decode token of the gated delta rule in one call (kernels/gated_delta.py's shapes: q, k [1, 1, Hk, Dk],
    v [1, 1, Hv, Dv], g and beta [1, 1, Hv], state [1, Hv, Dk, Dv] float32 or None). Returns (out [1, 1, Hv, Dv] in
    v's dtype, the final state: `state` itself, updated in place, when it is float32 and contiguous); None where the
    kernels are not built."""
    lib = library()
    if lib is None:
        return None
    hk, dk, hv, dv = k.shape[2], k.shape[3], v.shape[2], v.shape[3]
    if state is None or state.dtype != torch.float32 or not state.is_contiguous():
        state = torch.zeros(1, hv, dk, dv) if state is None else state.float().contiguous()
    q, k, v, g, beta = (x.float().contiguous() for x in (q, k, v, g, beta))
    out = torch.empty(1, 1, hv, dv)
    lib.fm_gated_delta_step(hk, hv, dk, dv, *map(_ptr, (q, k, v, g, beta, state, out)), torch.get_num_threads())
    return out.to(v.dtype), state


def delta_decode(proj, conv_state, conv_weight, a_log, dt_bias, state, norm_weight, eps, hk, hv, dk, dv):
    """One decode token of a Gated DeltaNet layer between its projections, in one call (models/qwen3_next.py's
    conv_step, delta_gates, gated_delta_step and gated rms_norm, in that order): proj [1, width] float32 is the input
    projection's row; conv_state [channels, kernel - 1] and state [1, hv, dk, dv] float32 contiguous are updated in
    place. Returns out [1, hv * dv] for the output projection; None where this cannot run it."""
    lib = library()
    if (lib is None or not _floats(proj, conv_state, state) or proj.shape[0] != 1 or not proj.is_contiguous()
            or not conv_state.is_contiguous() or not state.is_contiguous()):
        return None
    channels = 2 * hk * dk + hv * dv
    scratch = torch.empty(channels + 2 * hv + hv * dv)
    out = torch.empty(1, hv * dv)
    lib.fm_delta_decode(hk, hv, dk, dv, conv_weight.shape[-1], _ptr(proj), _ptr(conv_state),
                        _ptr(conv_weight.float().contiguous()), _ptr(a_log.float().contiguous()),
                        _ptr(dt_bias.float().contiguous()), _ptr(state), _ptr(norm_weight.float().contiguous()), eps,
                        _ptr(scratch), _ptr(out), torch.get_num_threads())
    return out


# ---- the small ops around a layer (kernels/fused.py's references, one call each) ---------------------------------
def _floats(*tensors) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors)


def rms_norm(x, weight, eps, zero_centred=True, residual=None, gate=None):
    """fused.reference_rms_norm for float32 CPU tensors, in one call; None where this cannot run it."""
    lib = library()
    if lib is None or not _floats(x, residual, gate):
        return None
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    res = None if residual is None else residual.reshape(-1, d).contiguous()
    g = None if gate is None else gate.reshape(-1, d).contiguous()
    y = torch.empty_like(x2)
    total = torch.empty_like(x2) if residual is not None else None
    lib.fm_rms_norm(x2.shape[0], d, _ptr(x2), _ptr(res), _ptr(g), _ptr(weight.float().contiguous()), int(zero_centred),
                    eps, _ptr(y), _ptr(total), torch.get_num_threads())
    y = y.view(x.shape)
    return y if residual is None else (total.view(x.shape), y)


def conv_step(mixed, conv_state, conv_weight):
    """fused.reference_conv_step for float32 CPU tensors (the state contiguous, shifted in place); None where this
    cannot run it."""
    lib = library()
    if lib is None or not _floats(mixed, conv_state) or not conv_state.is_contiguous():
        return None
    mixed = mixed.contiguous()
    out = torch.empty_like(mixed)
    weight = conv_weight.float().contiguous()
    lib.fm_conv_step(mixed.shape[0], weight.shape[-1], _ptr(mixed), _ptr(conv_state), _ptr(weight), _ptr(out))
    return out


def delta_gates(a, b, a_log, dt_bias):
    """fused.reference_delta_gates for float32 CPU tensors; None where this cannot run it."""
    lib = library()
    if lib is None or not _floats(a, b):
        return None
    a, b = a.contiguous(), b.contiguous()
    g, beta = torch.empty(a.shape), torch.empty(b.shape)
    lib.fm_delta_gates(a.numel(), a.shape[-1], _ptr(a), _ptr(b), _ptr(a_log.float().contiguous()),
                       _ptr(dt_bias.float().contiguous()), _ptr(g), _ptr(beta))
    return g, beta


def qk_norm_rope(proj, positions, q_norm, k_norm, inv_freq, heads, kv_heads, head_dim, eps, gated=True,
                 qk_norm="zero_centred"):
    """fused.reference_qk_norm_rope for float32 CPU tensors, in one call (it was 57 torch ops a layer); None where
    this cannot run it."""
    from .fused import QK_NORMS

    lib = library()
    n_freq = inv_freq.numel()
    if lib is None or not _floats(proj) or proj.stride(-1) != 1 or n_freq > 256 or 2 * n_freq > head_dim:
        return None
    t = proj.shape[0]
    q, k = torch.empty(t, heads, head_dim), torch.empty(t, kv_heads, head_dim)
    mode = QK_NORMS[qk_norm]
    norms = [None if mode == 0 else w.float().contiguous() for w in (q_norm, k_norm)]
    lib.fm_qk_norm_rope(t, _ptr(proj), proj.stride(0), _ptr(positions.to(torch.int64).contiguous()), _ptr(norms[0]),
                        _ptr(norms[1]), _ptr(inv_freq.float().contiguous()), n_freq, heads, kv_heads, head_dim, eps,
                        int(gated), mode, _ptr(q), _ptr(k))
    return q, k


def route(logits, top_k, default_k, normalize):
    """fused.reference_route (without slots) for float32 CPU logits, in one call; None where this cannot run it."""
    lib = library()
    if lib is None or not _floats(logits):
        return None
    logits = logits.contiguous()
    t, e = logits.shape
    ids, weights = torch.empty(t, top_k, dtype=torch.int64), torch.empty(t, top_k)
    lib.fm_route_softmax(t, e, _ptr(logits), top_k, default_k, int(normalize), _ptr(ids), _ptr(weights))
    return ids, weights, None
