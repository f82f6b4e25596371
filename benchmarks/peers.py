"""flashmoe and llama.cpp side by side: one model, one machine, the same memory budgets, ratios per row (issue 12).

    python benchmarks/peers.py --llama-src benchmarks/peers/llama-src.tgz --root /root/peers --geometry 35b \
        --bits 8 --regimes vram,ram,cpu,beyond-ram --out benchmarks/RESULTS.md --json /root/out/peers.json
    python benchmarks/peers.py --llama-src benchmarks/peers/llama-src.tgz --root /tmp/peers --geometry tiny \
        --regimes cpu

Steps, each skipped when its output is already under --root: build llama.cpp from the trimmed source tarball
(benchmarks/peers/llama-src.sh; CUDA when nvcc and a GPU exist), write one random-weight HF checkpoint of the
geometry with transformers (flashmoe.tiny), convert it for both engines at the same bits (llama.cpp Q8_0 / Q4_0
through convert_hf_to_gguf.py and llama-quantize; flashmoe affine 8 / 4-bit, --group-size), then per regime:

  vram        llama.cpp -ngl 99                flashmoe: every expert in the VRAM cache
  ram         llama.cpp -ngl 99 -ncmoe 99      flashmoe: a small VRAM cache (--vram-cache-gb), every expert in the
              (experts on CPU threads)         pinned RAM cache
  cpu         llama.cpp -ngl 0 -dev none -t N  flashmoe: device cpu, every expert in the RAM cache, N torch threads
  beyond-ram  both in a cgroup v2 with memory.max below the model (--cgroup-gb), page cache dropped first:
              llama.cpp -ngl 99 -ncmoe 99 -lm mmap; flashmoe with a small VRAM cache, no RAM cache, buffered reads
              and (a second row) O_DIRECT, and (a third) O_DIRECT into its own pinned RAM cache of half the room the
              cgroup leaves

pp512: one prefill of 512 tokens; tg128: 128 decode steps; both median of --reps after a warm-up (llama-bench's own
samples for llama.cpp). Each engine runs each regime in its own process: peak RSS from getrusage, peak VRAM from
nvidia-smi (the GPU's memory in use less what it was before). Greedy check: both engines' first tokens for the same
prompt ids (llama-greedy-ids, built from the tarball): how many lead alike, and at how many positions flashmoe, fed
llama.cpp's tokens, picks the same next one. The vocabulary is the tiny checkpoint's (512 tokens, not 248k): the
head is nearly free in both engines, so rows compare layers.

Sizes (64 GB disk, 128 GB RAM on the device): 35b with 8 layers is a 13.5 GB bf16 checkpoint (about 40 GB of RAM
while transformers builds it in fp32), a 7.2 GB Q8_0 GGUF and an 8 GB store at 8 bits; 397b is 13 GB per layer in
bf16, so 2 layers by default (at 4 bits a bf16 GGUF is made, then deleted, on the way to Q4_0: about 60 GB at the
peak). The device runs a command for 10 minutes at most: --prepare-only first (the CUDA build alone took 349 s; it
runs beside the checkpoint's writing and conversion), repeated if cut short (each step resumes or is skipped), then
the measurements.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import publish, timed_decode
from gpu_regimes import drop_page_cache

# llama.cpp's x86 flags without -march=native and without AMX, whose kernels died of SIGILL/SIGSEGV on the 2-core
# development VM that advertises it (RESULTS.md)
PORTABLE_CPU = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
                "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
LLAMA_BINARIES = ("llama-bench", "llama-quantize", "llama-greedy-ids")
SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
              "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim", "num_experts",
              "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
GREEDY_PROMPT = list(range(100, 116))
PROMPT_TOKENS, GEN_TOKENS = 512, 128
# convert_hf_to_gguf.py refuses a BPE tokenizer whose pre-tokenizer hash it does not know (ours is trained on a few
# lines); the tiny tokenizer's pre-tokenizer is byte-level with GPT-2's split regex, so say "gpt-2". The benchmark
# feeds token ids to both engines, so llama.cpp's text tokenizer is never used for a measurement.
CONVERT_GGUF = """
import runpy, sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def geometries() -> dict[str, dict]:
    from flashmoe.synthetic import QWEN3_5_35B, QWEN3_5_397B

    tiny = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=256, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32, num_experts=16,
                num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=128)
    return {"tiny": tiny, "35b": {k: QWEN3_5_35B[k] for k in SHAPE_KEYS},
            "397b": {k: QWEN3_5_397B[k] for k in SHAPE_KEYS}}


DEFAULT_LAYERS = {"tiny": 4, "35b": 8, "397b": 2}


def layer_types(layers: int) -> list[str]:
    """The real models' pattern, every 4th layer attention and the rest DeltaNet; with fewer than 4 layers the last
    is attention anyway: llama.cpp cannot make a context without a KV cache or without a recurrent state (both
    fail in GGML_ASSERT(buffer)), hence at least 2 layers."""
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    return types


@dataclass(frozen=True)
class Regime:
    needs_cuda: bool
    llama_args: tuple[str, ...]  # llama-bench placement flags
    flashmoe: tuple[dict, ...]   # flashmoe.load placements, one row each; "all": every expert, "small": --vram-cache-gb
    warm: bool = True            # flashmoe: warm_cache() before measuring
    cgroup: bool = False


REGIMES = {
    "vram": Regime(True, ("-ngl", "99"), (dict(device="cuda", vram_cache_gb="all", cache_gb=0),)),
    # the second row shares the RAM-held experts between the CPU and the GPU's PCIe reads (cpu_share.py, off by
    # default), as llama.cpp's -ncmoe computes them all on the CPU
    "ram": Regime(True, ("-ngl", "99", "-ncmoe", "99"), (dict(device="cuda", vram_cache_gb="small", cache_gb="all"),
                                                         dict(device="cuda", vram_cache_gb="small", cache_gb="all",
                                                              cpu_share="auto"))),
    # -dev none: with a CUDA build, -ngl 0 alone still sends prompt-sized matmuls to the GPU (op offload)
    "cpu": Regime(False, ("-ngl", "0", "-dev", "none"), (dict(device="cpu", cache_gb="all"),)),
    "beyond-ram": Regime(True, ("-ngl", "99", "-ncmoe", "99", "-lm", "mmap"),
                         (dict(device="cuda", vram_cache_gb="small", cache_gb=0, direct_io=False),
                          dict(device="cuda", vram_cache_gb="small", cache_gb=0, direct_io=True),
                          # flashmoe's own pinned RAM cache in half of what the cgroup leaves, read into with O_DIRECT
                          # (in a 16G cgroup at 397B it beat the page cache 1.38x: RESULTS.md, seventeenth session)
                          dict(device="cuda", vram_cache_gb="small", cache_gb="half-room", direct_io=True)),
                         warm=False, cgroup=True),
}


def say(msg: str) -> None:
    print(f"[peers] {msg}", flush=True)


def run_logged(cmd: list, log: Path, env: dict | None = None) -> None:
    """Run a setup step with its output in `log`; on failure stop with the log's tail."""
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {shlex.join(map(str, cmd))}\n{log.read_text()[-3000:]}")


# ---- machine ----------------------------------------------------------------------------------
def nvidia_smi(query: str) -> str | None:
    """One value of the first GPU from nvidia-smi (the parent never touches CUDA: its context would count as VRAM)."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def machine() -> str:
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{nvidia_smi('name') or 'no GPU'}, {os.cpu_count()} CPU cores, {ram_gib:.0f} GiB RAM"


class VramPeak:
    """Peak GPU memory in use while a child runs, less what was in use before (GB): nvidia-smi's own 200 ms loop in
    one process (not one process per sample, which would take CPU from the CPU-bound engines)."""

    def __init__(self, watch: bool):
        used = nvidia_smi("memory.used") if watch else None
        self.baseline, self.peak_gb = (float(used), 0.0) if used else (None, None)

    def __enter__(self) -> "VramPeak":
        if self.baseline is not None:
            self._smi = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-i", "0", "-lms", "200"], stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._smi.stdout:
            if line.strip().isdigit():
                self.peak_gb = max(self.peak_gb, (float(line) - self.baseline) * 2**20 / 1e9)

    def __exit__(self, *exc) -> None:
        if self.baseline is not None:
            self._smi.terminate()
            self._thread.join()
            self._smi.wait()


# Linux carries a process's peak RSS across exec, so a child of this process (torch imported) would report at least
# our own; the child of a small wrapper starts clean, and the wrapper writes its children's peak (KiB) to a file.
PEAK_RSS_WRAPPER = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc if rc >= 0 else 128 - rc)
"""


def run_measured(cmd: list, log: Path, cgroup: Path | None, watch_vram: bool) -> dict:
    """Run one engine's benchmark process: its stdout, exit status, peak RSS and peak VRAM (and the cgroup's peak,
    page cache included, when it runs in one)."""
    rss_file = log.with_suffix(".peak-rss")
    rss_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", PEAK_RSS_WRAPPER, rss_file, *cmd]
    if cgroup:  # join the cgroup first; the wrapper and the command inherit it
        cmd = ["bash", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec {shlex.join(map(str, cmd))}"]
    with open(log, "w") as err, VramPeak(watch_vram) as vram:
        p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err, text=True)
    peak = {"peak_rss_gb": int(rss_file.read_text()) * 1024 / 1e9 if rss_file.exists() else None,
            "peak_vram_gb": vram.peak_gb}
    if cgroup and (cgroup / "memory.peak").exists():
        peak["cgroup_peak_gb"] = int((cgroup / "memory.peak").read_text()) / 1e9
    return {"stdout": p.stdout, "rc": p.returncode, **peak}


def log_tail(log: Path) -> str:
    """The end of a failed run's log, on one line (for the table's notes)."""
    return " ".join(log.read_text()[-300:].split())


def cgroup_unavailable() -> str | None:
    """Why no memory-limited cgroup can be made here, or None."""
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    if not controllers.exists() or "memory" not in controllers.read_text().split():
        return "no cgroup v2 memory controller at /sys/fs/cgroup"
    if not os.access("/sys/fs/cgroup", os.W_OK):
        return "/sys/fs/cgroup is not writable"
    return None


def fresh_cgroup(name: str, memory_gb: float) -> Path:
    """An empty cgroup v2 child with memory.max (page cache included) at memory_gb."""
    group = Path("/sys/fs/cgroup") / name
    if group.exists():
        group.rmdir()
    group.mkdir()
    (group / "memory.max").write_text(str(int(memory_gb * 1e9)))
    return group


# ---- llama.cpp --------------------------------------------------------------------------------
def build_llama(tgz: Path, root: Path, cuda_arch: str, want_cuda: bool = True, extra: str = "") -> dict:
    """Unpack and build llama.cpp once per --root (with CUDA where there is a GPU and a GPU regime asks for it: a
    CPU-only build takes a fraction of the time); the build's flags and seconds are kept beside it. extra: more cmake
    flags, after ours (a later -D wins)."""
    src, build = root / "llama.cpp", root / "llama.cpp" / ("build" if want_cuda else "build-cpu")
    marker = build / "peers-build.json"
    if marker.exists() and all((build / "bin" / b).exists() for b in LLAMA_BINARIES):
        info = json.loads(marker.read_text())
        if info.get("extra", "") == extra:
            say(f"llama.cpp already built ({'CUDA' if info['cuda'] else 'CPU'}, took {info['seconds']:.0f} s)")
            return {**info, "reused": True}
        say(f"llama.cpp was built with other flags ({info.get('extra') or 'none extra'}): building again")
    if not src.exists():
        subprocess.run(["tar", "xzf", tgz, "-C", root], check=True)
    nvcc = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if Path(p).exists()), None)
    cuda = want_cuda and nvcc is not None and nvidia_smi("name") is not None
    flags = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]
    flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"] if cuda \
        else ["-DGGML_CUDA=OFF"]
    flags += shlex.split(extra)
    commands = [["cmake", "-S", src, "-B", build, *flags],
                ["cmake", "--build", build, f"-j{os.cpu_count()}", "--target", *LLAMA_BINARIES]]
    say(f"building llama.cpp ({'CUDA ' + cuda_arch if cuda else 'CPU only'}), logs in {root}/logs/build*.log")
    t0 = time.perf_counter()
    for i, cmd in enumerate(commands):
        run_logged(cmd, root / "logs" / f"build{i}.log")
    info = {"cuda": cuda, "seconds": time.perf_counter() - t0, "jobs": os.cpu_count(), "extra": extra,
            "commands": [shlex.join(map(str, c)) for c in commands]}
    marker.write_text(json.dumps(info, indent=1))
    say(f"built llama.cpp in {info['seconds']:.0f} s")
    return {**info, "reused": False}


def folder_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def need_space(root: Path, gb: float, what: str) -> None:
    """Stop with one line where the disk cannot take the next file (llama-quantize on a full disk says only
    'basic_ios::clear: iostream error'; a 64 GB device disk holds the 397B geometry's files with ~5 GB to spare)."""
    free = shutil.disk_usage(root).free / 1e9
    if free < gb * 1.05:
        raise SystemExit(f"peers: {what} needs about {gb:.1f} GB under {root}, which has {free:.1f} GB free: free some "
                         f"space there (other stores, old GGUFs) or pass another --root")


def convert_gguf(src: Path, ckpt: Path, out: Path, bits: int, log_dir: Path, built=None) -> None:
    """Q8_0 straight from convert_hf_to_gguf.py; Q4_0 (which it cannot write) through bf16 and llama-quantize, after
    `built` (the build's future, when it runs beside this) is done. Written under another name and renamed at the end,
    so a run cut short never leaves a GGUF that looks done."""
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    ckpt_gb = folder_gb(ckpt)  # bf16: Q8_0 is about half of it, a bf16 GGUF all of it and its Q4_0 0.28 more
    need_space(out.parent, ckpt_gb * (0.55 if bits == 8 else 1.3), "converting for llama.cpp")
    first, partial = out.with_suffix(".first.gguf"), out.with_suffix(".partial.gguf")
    run_logged([sys.executable, "-c", CONVERT_GGUF, src, ckpt, "--outfile", first,
                "--outtype", "q8_0" if bits == 8 else "bf16", "--no-mtp"], log_dir / "convert-gguf.log", env)
    if bits == 4:
        if built is not None:
            built.result()
        quantize = next(q for q in (src / "build/bin/llama-quantize", src / "build-cpu/bin/llama-quantize") if q.exists())
        run_logged([quantize, first, partial, "Q4_0"], log_dir / "quantize.log")
        first.unlink()
        first = partial
    first.rename(out)


def gguf_expert_bits(src: Path, gguf_path: Path) -> tuple[float, list[str]]:
    """Bits per weight of the GGUF's routed-expert tensors, and their types."""
    sys.path.insert(0, str(src / "gguf-py"))
    from gguf import GGUFReader

    exps = [t for t in GGUFReader(gguf_path).tensors if "_exps" in t.name]
    return (8 * sum(int(t.n_bytes) for t in exps) / sum(int(t.n_elements) for t in exps),
            sorted({t.tensor_type.name for t in exps}))


def merged(rounds: list[dict]) -> dict:
    """One engine's results over --rounds: the median rate, the largest peak, each round's rates kept; a failed
    round is the answer (its error is the news)."""
    if failed := next((r for r in rounds if "error" in r), None):
        return failed
    out = dict(rounds[0])
    for key in ("pp_tok_s", "tg_tok_s"):
        if all(key in r for r in rounds):
            out[key] = statistics.median(r[key] for r in rounds)
    for key in [k for k in out if "peak" in k]:
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = max(values) if values else None
    out["rounds"] = [{k: r.get(k) for k in ("pp_tok_s", "tg_tok_s")} for r in rounds]
    return out


def llama_bench(bin_dir: Path, gguf_path: Path, regime: Regime, args, log: Path, cgroup: Path | None) -> dict:
    cmd = [bin_dir / "llama-bench", "-m", gguf_path, "-p", PROMPT_TOKENS, "-n", GEN_TOKENS, "-r", args.reps,
           "-t", args.threads, *regime.llama_args, "-o", "json"]
    dropped = drop_page_cache() if cgroup else None
    r = run_measured(cmd, log, cgroup, regime.needs_cuda)
    result = {"command": shlex.join(map(str, cmd)), "page_cache_dropped": dropped,
              **{k: v for k, v in r.items() if k != "stdout"}}
    if r["rc"] != 0:
        return {**result, "error": f"llama-bench exited {r['rc']}: {log_tail(log)}"}
    for test in json.loads(r["stdout"]):
        key = "pp_tok_s" if test["n_prompt"] else "tg_tok_s"
        result[key] = statistics.median(test["samples_ts"])
    return result


def llama_greedy(bin_dir: Path, gguf_path: Path, ngl: int, n: int) -> list[int]:
    out = subprocess.run([str(bin_dir / "llama-greedy-ids"), "-m", str(gguf_path), "-ngl", str(ngl), "-n", str(n),
                          *map(str, GREEDY_PROMPT)], capture_output=True, text=True)
    if out.returncode < 0:  # a signal leaves stderr empty: an instruction the CPU advertises faults (a VM's AMX)
        raise SystemExit(f"llama-greedy-ids died of signal {-out.returncode}. On a VM whose advertised instructions "
                         f"fault, build without them: --llama-cmake '{PORTABLE_CPU}'")
    if out.returncode != 0:
        raise SystemExit(f"llama-greedy-ids failed (exit status {out.returncode}): {out.stderr[-2000:]}")
    return [int(t) for t in out.stdout.split()]


# ---- flashmoe ---------------------------------------------------------------------------------
def flashmoe_child(args) -> dict:
    """One regime in this (fresh) process: load with the regime's placement, warm, time pp and tg, greedy tokens."""
    import flashmoe
    from flashmoe.memory import ram_available
    from flashmoe.store import Store

    regime = REGIMES[args.child]
    torch.set_num_threads(args.threads)
    store = Store(args.store)
    slot_bytes = store.expert_blob_bytes
    if regime.flashmoe[args.variant]["device"] == "cpu":  # CPU slots hold the int4 kernel's form: 11% more at 8 bits
        from flashmoe.kernels.cpu_int4 import KernelForm

        cfg, quant = store.config, store.quantization
        form = KernelForm.for_store(store.layout, cfg.hidden_size, cfg.moe_intermediate_size, quant["bits"],
                                    quant["group_size"])
        slot_bytes = form.slot_bytes if form is not None else slot_bytes
    everything_gb = store.expert_bytes // store.expert_blob_bytes * slot_bytes / 1e9 * 1.02 + 0.05
    # half-room: half of the RAM this process may still use (inside the regime's cgroup, what its memory.max leaves)
    sizes = {"all": everything_gb, "small": args.vram_cache_gb, "half-room": ram_available() / 2e9}
    placement = {k: round(sizes.get(v, v), 3) if isinstance(v, str) and k.endswith("_gb") else v
                 for k, v in regime.flashmoe[args.variant].items()}
    if args.resident_format:  # on the GPU quantized at load; on the CPU our int8/int4 kernels' forms
        placement["resident_format"] = args.resident_format
    t0 = time.perf_counter()
    model = flashmoe.load(args.store, io_threads=16, **placement)
    if regime.warm:
        model.warm_cache()
    load_s = time.perf_counter() - t0
    on_gpu = model.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (PROMPT_TOKENS,), generator=gen).tolist()
    seconds = []
    for _ in range(args.reps + 1):  # the first compiles kernels and fills caches: untimed, as llama-bench's warm-up
        sync()
        t = time.perf_counter()
        model.forward(prompt, model.new_state(), all_logits=False)
        sync()
        seconds.append(time.perf_counter() - t)
    pp = PROMPT_TOKENS / statistics.median(seconds[1:])
    tg = statistics.median(GEN_TOKENS / (timed_decode(model, prompt[:1], GEN_TOKENS) / 1e3) for _ in range(args.reps))
    shares = model.stats.get("cpu_share")  # where the CPU's share settled (cpu_share.py)
    greedy = list(model.generate(GREEDY_PROMPT, args.greedy_tokens, stop_token_ids=[]))
    # teacher-forced: fed llama.cpp's tokens, how often is flashmoe's next token the same (no compounding divergence)
    theirs = [int(t) for t in args.llama_greedy.split(",")]
    logits = model.logits(GREEDY_PROMPT + theirs[:-1])[len(GREEDY_PROMPT) - 1:]
    forced = sum(int(row.argmax()) == t for row, t in zip(logits, theirs))
    model.close()
    return {"placement": placement, "load_s": load_s, "pp_tok_s": pp, "tg_tok_s": tg, "greedy": greedy,
            "greedy_forced_agree": forced, "cpu_share": shares,
            "torch_max_vram_gb": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None}


def flashmoe_run(store: Path, name: str, variant: int, args, llama_greedy: list[int], log: Path,
                 cgroup: Path | None) -> dict:
    cmd = [sys.executable, Path(__file__).resolve(), "--child", name, "--variant", variant, "--store", store,
           "--threads", args.threads, "--reps", args.reps, "--vram-cache-gb", args.vram_cache_gb,
           "--greedy-tokens", args.greedy_tokens, "--llama-greedy", ",".join(map(str, llama_greedy))]
    if args.resident_format:
        cmd += ["--resident-format", args.resident_format]
    dropped = drop_page_cache() if cgroup else None
    r = run_measured(cmd, log, cgroup, REGIMES[name].needs_cuda)
    if r["rc"] != 0:
        return {"rc": r["rc"], "error": f"flashmoe exited {r['rc']}: {log_tail(log)}"}
    return {**json.loads(r["stdout"].strip().splitlines()[-1]), "page_cache_dropped": dropped,
            **{k: v for k, v in r.items() if k != "stdout"}}


# ---- report -----------------------------------------------------------------------------------
def agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def size(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 0.1 else f"{gb * 1e3:.1f} MB"


def row_text(row: dict) -> str:
    lm, fm = row["llama"], row["flashmoe"]
    ratio = lambda k: f"{fm[k] / lm[k]:.2f}x" if k in fm and k in lm else "n/a"
    mem = (f"RSS {fmt(lm.get('peak_rss_gb'), 2)} / {fmt(fm.get('peak_rss_gb'), 2)} GB, "
           f"VRAM {fmt(lm.get('peak_vram_gb'), 2)} / {fmt(fm.get('peak_vram_gb'), 2)} GB")
    if "cgroup_peak_gb" in lm or "cgroup_peak_gb" in fm:
        mem += f", cgroup {fmt(lm.get('cgroup_peak_gb'), 2)} / {fmt(fm.get('cgroup_peak_gb'), 2)} GB"
    n = len(row["llama_greedy"])
    greedy = f"{agree(row['llama_greedy'], fm['greedy'])} ({fm['greedy_forced_agree']}) of {n}" if "greedy" in fm \
        else "n/a"
    return (f"| {row['label']} | {fmt(lm.get('pp_tok_s'))} | {fmt(fm.get('pp_tok_s'))} | {ratio('pp_tok_s')} | "
            f"{fmt(lm.get('tg_tok_s'))} | {fmt(fm.get('tg_tok_s'))} | {ratio('tg_tok_s')} | {mem} | {greedy} |")


def report(args, info: dict, rows: list[dict]) -> str:
    g, b = info["geometry"], info["build"]
    text = (
        f"\n### flashmoe vs llama.cpp, {args.geometry} geometry, {g['layers']} layers, {args.bits}-bit "
        f"({datetime.date.today()})\n\n"
        f"`python {shlex.join(sys.argv)}` on {info['machine']}. llama.cpp from llama-cpp-python 0.3.36's vendored "
        f"source, built {'with CUDA' if b['cuda'] else 'CPU only'} in {b['seconds']:.0f} s with -j{b['jobs']}"
        f"{' (an earlier build, reused)' if b['reused'] else ''}.\n\n"
        f"Random weights (transformers' Qwen3_5MoeForCausalLM via flashmoe.tiny): hidden {g['hidden_size']}, "
        f"{g['layer_types'].count('full_attention')} of the {g['layers']} layers attention, the rest DeltaNet, "
        f"{g['num_experts']} experts of {g['moe_intermediate_size']}, K={g['num_experts_per_tok']}, shared expert "
        f"{g['shared_expert_intermediate_size']}, vocabulary {info['vocab_size']} (the real one is 248k: the head is "
        f"nearly free here, so the rows compare the layers). Experts: llama.cpp {'/'.join(info['gguf_types'])}, "
        f"{info['gguf_expert_bits']:.2f} bits/weight ({size(info['gguf_gb'])} file); flashmoe "
        + (f"converted from that GGUF: the same codes, its blocks repacked as they are, {info['store_expert_bits']:.2f} "
           f"bits/weight as stored ({size(info['store_gb'])} of experts); its resident matrices come from the same file "
           f"(flashmoe keeps Q8_0 / Q4_x ones quantized and turns other types into bf16).\n\n" if args.same_codes else
           f"{args.bits}-bit affine, group {args.group_size}, {info['store_expert_bits']:.2f} bits/weight as stored (an "
           f"fp16 scale and bias per group; {size(info['store_gb'])} of experts). Resident weights: llama.cpp quantizes "
           f"them too; flashmoe keeps them {args.resident_format or 'bf16'} on the GPU"
           f"{' (quantized at load, group 32)' if args.resident_format else ''}, {args.resident_format or 'int8'} on "
           f"the CPU.\n\n") +
        f"pp512: one prefill of 512 tokens; tg128: 128 decode steps; tok/s, the median of {args.reps} after a "
        f"warm-up (llama.cpp: llama-bench's samples; flashmoe: a fresh process per regime, experts warmed into the "
        f"regime's caches first, except beyond-ram)"
        f"{f', in each of {args.rounds} rounds in which the engines take turns; the table holds the medians of the rounds (each round: the JSON)' if args.rounds > 1 else ''}. Peak memory, llama.cpp / flashmoe: RSS of the process "
        f"(getrusage; llama.cpp's mmap'd pages count), VRAM (nvidia-smi, less the baseline). Greedy agree: of the "
        f"first {args.greedy_tokens} greedy tokens for prompt ids {GREEDY_PROMPT[0]}..{GREEDY_PROMPT[-1]}, how many "
        f"lead alike in llama-greedy-ids ({info['llama_greedy']}) and flashmoe; in brackets, at how many of those "
        f"positions flashmoe, fed llama.cpp's tokens, picks the same next one. Random weights leave small margins: "
        f"quantizing the resident weights differently in the two engines moves the logits enough to flip near "
        f"ties.\n\n"
        "| regime | llama.cpp pp512 | flashmoe pp512 | ratio | llama.cpp tg128 | flashmoe tg128 | ratio | "
        "peak memory (llama.cpp / flashmoe) | greedy agree |\n|---|---|---|---|---|---|---|---|---|\n")
    text += "\n".join(row_text(r) for r in rows) + "\n\nCommands:\n"
    for r in rows:
        lm, fm = r["llama"], r["flashmoe"]
        load = ", ".join(f"{k}={v!r}" for k, v in fm.get("placement", {}).items())
        errors = "".join(f"; {e['error']}" for e in (lm, fm) if "error" in e)
        text += (f"- {r['label']}: `{lm['command']}`; flashmoe `load(store, {load})`"
                 f"{' + warm_cache()' if REGIMES[r['regime']].warm else ''}{errors}\n")
    return text


# ---- main -------------------------------------------------------------------------------------
def prepare_models(args, src: Path, built=None) -> tuple[Path, Path, dict]:
    """The HF checkpoint (once per geometry), its GGUF and its flashmoe store (once per bits); `built`: the llama.cpp
    build's future, running meanwhile (only llama-quantize waits for it)."""
    from flashmoe.convert import convert
    from flashmoe.store import Store
    from flashmoe.tiny import build_tiny_checkpoint

    shape = {**geometries()[args.geometry], "num_hidden_layers": args.layers, "layer_types": layer_types(args.layers)}
    if args.k:
        shape["num_experts_per_tok"] = args.k
    name = f"{args.geometry}-L{args.layers}-K{shape['num_experts_per_tok']}"
    ckpt, gguf_path = args.root / f"ckpt-{name}", args.root / f"{name}-q{args.bits}_0.gguf"
    store = args.root / (f"store-{name}-from-q{args.bits}_0-gguf" if args.same_codes
                         else f"store-{name}-{args.bits}bit-g{args.group_size}")
    if not (ckpt / "tokenizer.json").exists() and not (args.same_codes and gguf_path.exists()):  # written last
        say(f"writing the random-weight checkpoint {ckpt}")
        t0 = time.perf_counter()
        build_tiny_checkpoint(ckpt, "qwen3_5_moe", max_shard_size="2GB", **shape)
        say(f"  {time.perf_counter() - t0:.0f} s")
    if not gguf_path.exists():
        say(f"converting for llama.cpp -> {gguf_path}")
        convert_gguf(src, ckpt, gguf_path, args.bits, args.root / "logs", built)
    if args.same_codes and ckpt.exists():  # both engines read the GGUF now: 397B's 26 GB back to the 64 GB disk
        say(f"removing {ckpt} (--same-codes: flashmoe converts llama.cpp's GGUF)")
        shutil.rmtree(ckpt)
    if not (store / "manifest.json").exists():
        say(f"converting for flashmoe -> {store}")
        need_space(args.root, gguf_path.stat().st_size / 1e9 * (1.1 if args.bits == 8 else 1.15), "flashmoe's store")
        # --same-codes: llama.cpp's own file, its Q8_0 / Q4_0 blocks repacked as they are (residents too)
        convert(gguf_path, store) if args.same_codes else convert(ckpt, store, bits=args.bits, group_size=args.group_size)
    s = Store(store)
    bits, types = gguf_expert_bits(src, gguf_path)
    expert_weights = 3 * shape["hidden_size"] * shape["moe_intermediate_size"]
    info = {"geometry": {**shape, "layers": args.layers}, "vocab_size": s.config.vocab_size,
            "gguf_gb": gguf_path.stat().st_size / 1e9, "gguf_expert_bits": bits, "gguf_types": types,
            "store_gb": s.expert_bytes / 1e9, "store_expert_bits": 8 * s.expert_blob_bytes / expert_weights}
    return gguf_path, store, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-src", type=Path, help="the tarball from benchmarks/peers/llama-src.sh (not needed once "
                    "unpacked under --root)")
    ap.add_argument("--root", type=Path, help="work folder: llama.cpp, checkpoint, GGUF, store, logs")
    ap.add_argument("--geometry", choices=["tiny", "35b", "397b"], default="35b")
    ap.add_argument("--layers", type=int, default=None, help="default: tiny 4, 35b 8, 397b 2")
    ap.add_argument("--k", type=int, default=None, help="experts per token (default: the model's: 8 / 10)")
    ap.add_argument("--bits", type=int, choices=[4, 8], default=8)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--same-codes", action="store_true", help="convert flashmoe's store from llama.cpp's GGUF (the "
                    "same expert and resident codes: the greedy check then compares the engines, not two quantizers)")
    ap.add_argument("--regimes", default="vram,ram,cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="measure each engine this many times, taking turns; "
                    "report the medians")
    ap.add_argument("--vram-cache-gb", type=float, default=0.3, help="flashmoe's VRAM cache in ram / beyond-ram")
    ap.add_argument("--resident-format", choices=["int8", "int4"], default=None,
                    help="flashmoe's resident matrices quantized at load, as llama.cpp's are (default: bf16 on the "
                         "GPU, int8 on the CPU)")
    ap.add_argument("--cgroup-gb", type=float, default=None,
                    help="beyond-ram's memory.max (default: half the GGUF, at least 3)")
    ap.add_argument("--greedy-tokens", type=int, default=8)
    ap.add_argument("--cuda-arch", default="90")
    ap.add_argument("--llama-cmake", default="", help="more cmake flags for llama.cpp's build (after ours)")
    ap.add_argument("--prepare-only", action="store_true", help="build llama.cpp and convert the model, then stop "
                    "(the device runs a command for 10 minutes at most: prepare in one, measure in the next)")
    ap.add_argument("--out", type=Path, default=None, help="append the markdown section here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", choices=list(REGIMES), help=argparse.SUPPRESS)  # internal: one flashmoe regime
    ap.add_argument("--variant", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--llama-greedy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(flashmoe_child(args)))
        return
    if not args.root:
        ap.error("--root is needed")
    regimes = args.regimes.split(",")
    if unknown := [r for r in regimes if r not in REGIMES]:
        ap.error(f"unknown regime(s) {unknown}; choose from {', '.join(REGIMES)}")
    src = args.root.resolve() / "llama.cpp"
    if not src.exists() and not (args.llama_src and args.llama_src.is_file()):  # unpacked by an earlier run: not needed
        ap.error(f"--llama-src {args.llama_src or ''} not found: make it with benchmarks/peers/llama-src.sh "
                 f"(git-ignored: carry it)")
    args.layers = args.layers or DEFAULT_LAYERS[args.geometry]
    if args.layers < 2:
        ap.error("--layers must be at least 2: llama.cpp needs a DeltaNet layer and an attention layer")
    args.root = args.root.resolve()
    (args.root / "logs").mkdir(parents=True, exist_ok=True)

    want_cuda = any(REGIMES[r].needs_cuda for r in regimes)
    if not src.exists():  # unpacked here, so the GGUF conversion (a script of the source) need not wait for the build
        subprocess.run(["tar", "xzf", args.llama_src.resolve(), "-C", args.root], check=True)
    # the build (5-6 min with CUDA) runs beside writing the checkpoint and converting it
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        built = pool.submit(build_llama, args.llama_src, args.root, args.cuda_arch, want_cuda,
                            args.llama_cmake)
        gguf_path, store, info = prepare_models(args, src, built)
        build = built.result()
    bin_dir = src / ("build" if want_cuda else "build-cpu") / "bin"
    if args.prepare_only:
        say(f"prepared under {args.root}: {json.dumps(info)}")
        return
    ngl = 99 if build["cuda"] else 0
    greedy = llama_greedy(bin_dir, gguf_path, ngl, args.greedy_tokens)
    info.update(machine=machine(), build=build, llama_greedy=f"-ngl {ngl}: {' '.join(map(str, greedy))}")
    say(f"llama.cpp greedy tokens: {greedy}")
    cgroup_gb = args.cgroup_gb or max(3.0, info["gguf_gb"] / 2)
    rows = []
    for name in regimes:
        regime = REGIMES[name]
        if regime.needs_cuda and not (build["cuda"] and torch.cuda.is_available()):
            why = "torch sees no CUDA GPU" if not torch.cuda.is_available() else "llama.cpp was built without CUDA"
            say(f"regime {name}: skipped, it needs a CUDA GPU ({why})")
            continue
        if regime.cgroup and (why := cgroup_unavailable()):
            say(f"regime {name}: skipped, it needs a memory-limited cgroup ({why})")
            continue
        limit = f", memory.max {cgroup_gb:.1f} GB" if regime.cgroup else ""
        try:
            # the engines take turns, round by round, so a machine that slows down for a while slows both
            llama_rounds, fm_rounds = [], {v: [] for v in range(len(regime.flashmoe))}
            for r in range(args.rounds):
                say(f"regime {name}{limit}, round {r + 1} of {args.rounds}: llama-bench")
                cgroup = fresh_cgroup("flashmoe-peers-llama", cgroup_gb) if regime.cgroup else None
                llama_rounds.append(llama_bench(bin_dir, gguf_path, regime, args,
                                                args.root / "logs" / f"llama-{name}-{r}.log", cgroup))
                say(f"  {json.dumps({k: v for k, v in llama_rounds[-1].items() if k != 'command'})}")
                for variant, placement in enumerate(regime.flashmoe):
                    say(f"regime {name}{limit} variant {variant}, round {r + 1}: flashmoe")
                    cgroup = fresh_cgroup(f"flashmoe-peers-{variant}", cgroup_gb) if regime.cgroup else None
                    log = args.root / "logs" / f"flashmoe-{name}-{variant}-{r}.log"
                    fm_rounds[variant].append(flashmoe_run(store, name, variant, args, greedy, log, cgroup))
                    say(f"  {json.dumps(fm_rounds[variant][-1])}")
            llama = merged(llama_rounds)
            for variant, placement in enumerate(regime.flashmoe):
                label = name + limit + (", O_DIRECT" if placement.get("direct_io") else ", buffered" if limit else "")
                label += ", CPU computes a share" if placement.get("cpu_share") else ""
                label += ", its own RAM cache" if placement.get("cache_gb") == "half-room" else ""
                rows.append({"regime": name, "label": label, "llama": llama, "flashmoe": merged(fm_rounds[variant]),
                             "llama_greedy": greedy, "cgroup_gb": cgroup_gb if regime.cgroup else None})
                if args.json:  # after every row, so a run cut short keeps what it measured
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({**info, "rows": rows}, indent=1))
        except OSError as exc:  # e.g. a cgroup that cannot be made: report, go on
            say(f"regime {name}: stopped, {exc}")
    if not rows:
        raise SystemExit("no regime could run here")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    publish(report(args, info, rows), args.out)


if __name__ == "__main__":
    main()
