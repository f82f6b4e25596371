"""One token through single matrices and through a layer's routed experts on the CPU: our kernels (kernels/cpu_native.c)
against torch's int4 kernel (kernels/cpu_int4.py), in GB/s of the bytes each reads.

    python benchmarks/cpu_kernels.py [--threads 16] [--group 32] [--out RESULTS.md]

Matrices of the Qwen3.5-35B-A3B geometry (hidden 2048, experts of 512, DeltaNet's 12288-row input projection, a
248k-row head) at 4 and 8 bits, group --group (32; MLX's imports are 64); "layer": K=8 experts' gate_up and down,
torch's path as the engine ran it (one expert after another), ours as one call; the matrices and the layer's experts
are read again call after call, so they may sit in the CPU's caches; the "from DRAM" row cycles through 128 experts,
as a decode reads them. Best of 5 repetitions of 20 calls.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from flashmoe.convert import expert_tensors
from flashmoe.kernels import cpu_int4, cpu_native
from flashmoe.store import BlobLayout
from common import publish, section

STREAMED = 128  # distinct experts the streamed row cycles through
MATRICES = [("expert gate_up", 1024, 2048), ("expert down", 2048, 512), ("DeltaNet in_proj", 12288, 2048),
            ("head", 248320, 2048)]


def best_ms(fn, reps: int = 5, calls: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e3)
    return best


def layer_rows(bits: int, group: int, k: int = 8, hidden: int = 2048, inter: int = 512) -> list[str]:
    gen = torch.Generator().manual_seed(bits)
    tensors = expert_tensors(torch.randn(2 * inter, hidden, generator=gen), torch.randn(hidden, inter, generator=gen),
                             bits, group)
    layout = BlobLayout.for_tensors(tensors)
    blob = torch.frombuffer(bytearray(layout.pack(tensors)), dtype=torch.uint8)
    ours = cpu_native.NativeExperts.for_store(layout, hidden, inter, bits, group)
    slots = [blob.clone() for _ in range(k)]
    torch_form = cpu_int4.KernelForm.for_store(layout, hidden, inter, bits, group)
    torch_slots = []
    for _ in range(k):
        slot = torch.zeros(torch_form.slot_bytes, dtype=torch.uint8)
        slot[: layout.blob_bytes] = blob
        torch_form.prepare(slot)
        torch_slots.append(slot)
    x, weight = torch.randn(1, hidden), torch.rand(k)
    ms_ours = best_ms(lambda: ours.run(x, slots, list(range(k + 1)), torch.zeros(k, dtype=torch.long), weight))
    ms_torch = best_ms(lambda: sum(torch_form.forward(x, s) * w for s, w in zip(torch_slots, weight.tolist())))
    nbytes = k * layout.blob_bytes
    # as a decode meets them: each call K others of STREAMED experts (~0.4 GB at 8 bits), none left in a cache
    many, turn = [blob.clone() for _ in range(STREAMED)], iter(range(10 ** 9))

    def streamed() -> None:
        first = next(turn) * k % STREAMED
        ours.run(x, many[first : first + k], list(range(k + 1)), torch.zeros(k, dtype=torch.long), weight)

    ms_streamed = best_ms(streamed, calls=STREAMED // k * 4)
    return [f"| layer's {k} experts | {bits} | {ms_torch * 1e3:.0f} us ({nbytes / ms_torch / 1e6:.1f} GB/s) | "
            f"{ms_ours * 1e3:.0f} us ({nbytes / ms_ours / 1e6:.1f} GB/s) | {ms_torch / ms_ours:.2f}x |",
            f"| layer's {k} experts, {k} other of {STREAMED} each call (from DRAM) | {bits} | - | "
            f"{ms_streamed * 1e3:.0f} us ({nbytes / ms_streamed / 1e6:.1f} GB/s) | - |"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_native.library() is None:
        raise SystemExit("our CPU kernels could not be built here")
    rows = []
    for bits in (4, 8):
        for name, n, k in MATRICES:
            w = torch.randn(n, k) * 0.02
            ours = cpu_native.NativeMatrix.from_float(w, bits, args.group)
            theirs = cpu_int4.PackedMatrix.from_float(w, bits, args.group)
            x = torch.randn(1, k)
            nbytes = n * k * (bits / 8 + 4 / args.group)  # codes + fp16 scale and bias per group (ours)
            ms_ours, ms_torch = best_ms(lambda: ours(x)), best_ms(lambda: theirs(x))
            rows.append(f"| {name} {n}x{k} | {bits} | {ms_torch * 1e3:.0f} us ({nbytes / ms_torch / 1e6:.1f} GB/s) | "
                        f"{ms_ours * 1e3:.0f} us ({nbytes / ms_ours / 1e6:.1f} GB/s) | {ms_torch / ms_ours:.2f}x |")
            print(rows[-1], flush=True)
        rows += layer_rows(bits, args.group)
        print(rows[-1], flush=True)
    cpu = (f"{platform.processor() or platform.machine()}, {args.threads} threads, "
           f"{torch.backends.cpu.get_cpu_capability()}, group {args.group}")
    text = section("CPU kernels, one token: ours vs torch's int4", cpu,
                   "x [1, K] float32 times each matrix; GB/s of codes, scales and biases read.",
                   ["matrix", "bits", "torch int4", "ours", "speed-up"], rows)
    publish(text, args.out)


if __name__ == "__main__":
    main()
