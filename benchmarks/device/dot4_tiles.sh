#!/usr/bin/env bash
# One device call (~9.5 min) for the resident matrices now that dot4 is the default: the GPU tests of what is new
# (K splits, activations rounded inside the kernel, the resident format chosen by free VRAM and residents quantized
# as they are read, the routers' top-k,
# cpu_share's batches in their graph), int8 residents against
# bf16 and int4 in a decode step and in a batch of 8 (whether int8 could be the GPU default for quantized stores),
# activations rounded inside every dot4 kernel (FLASHMOE_GPU_DOT4=fused) against quantize_rows launches,
# then the dot4 tile / K-split / in-kernel rounding sweep over every resident shape of a 397B step in CUDA graphs,
# with whatever time is left (its rows print as they come: a cut-short sweep keeps them).
#   run(command="bash benchmarks/device/dot4_tiles.sh", carry=["scratch/tfslim", "scratch/whl-fla", "scratch/whl-sm"])
# Outputs under $OUT: tests.log, profile-{float,int8,int4,int4-fused}.txt, batch-{float,int8}.txt, gemv4.txt.
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
t0=$(date +%s)
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_residents.py tests/test_dot4_gemv.py \
    tests/test_quantized_residents.py -m gpu 2>&1 \
    | tee "$OUT/tests.log" | tail -3
# the routers' packed top-k on the GPU; cpu_share's batches through their graph
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py tests/test_gpu.py \
    -k "route or cpu_share" 2>&1 | tee -a "$OUT/tests.log" | tail -3
cd benchmarks
for fmt in float int8 int4; do
    echo "== a decode step, residents $fmt $(( $(date +%s) - t0 ))s"
    timeout 100 python3 profile_decode.py --root /root/q --layers 4 --resident-format $fmt > "$OUT/profile-$fmt.txt" 2>&1
    grep -A5 'one graph a step' "$OUT/profile-$fmt.txt"
done
echo "== in-kernel rounding (FLASHMOE_GPU_DOT4=fused): a decode step, int4 residents $(( $(date +%s) - t0 ))s"
FLASHMOE_GPU_DOT4=fused timeout 70 python3 profile_decode.py --root /root/q --layers 4 --resident-format int4 \
    > "$OUT/profile-int4-fused.txt" 2>&1
grep -A5 'one graph a step' "$OUT/profile-int4-fused.txt"
for mode in 1 fused; do
    echo "== decode experts K=10, FLASHMOE_GPU_DOT4=$mode $(( $(date +%s) - t0 ))s"
    FLASHMOE_GPU_DOT4=$mode timeout 45 python3 kernels.py --k 10 --no-sweep 2>&1 | head -4
done
for fmt in float int8; do
    echo "== 8 sequences, residents $fmt $(( $(date +%s) - t0 ))s"
    timeout 50 python3 batch_decode.py /root/q/store-397b-4l-4b-g64-v248320 --device cuda --counts 1,8 --tokens 32 \
        --server-graphs --resident-format $fmt > "$OUT/batch-$fmt.txt" 2>&1
    grep '^|' "$OUT/batch-$fmt.txt" | tail -4
done
left=$(( 570 - ($(date +%s) - t0) ))
echo "== resident GEMV sweep, 4-bit, ${left}s left $(( $(date +%s) - t0 ))s"
timeout $left python3 resident_gemv.py --dot4 --bits 4 > "$OUT/gemv4.txt" 2>&1
grep '^|' "$OUT/gemv4.txt" | tail -14
echo "== end $(( $(date +%s) - t0 ))s"
