#!/usr/bin/env bash
# One device call (~9 min) for the resident matrices now that dot4 is the default: the GPU tests of what is new
# (K splits, the resident format chosen by free VRAM), the dot4 tile and K-split sweep over every resident shape of a
# 397B step in CUDA graphs, then int8 residents against bf16 in a decode step and in a batch of 8 (whether int8
# could be the GPU default for quantized stores).
#   run(command="bash benchmarks/device/dot4_tiles.sh", carry=["scratch/tfslim", "scratch/whl-fla", "scratch/whl-sm"])
# Outputs under $OUT: tests.log, gemv4.md / gemv8.md, profile-{float,int8,int4}.txt, batch-{float,int8}.txt.
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
t0=$(date +%s)
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_residents.py tests/test_dot4_gemv.py -m gpu 2>&1 \
    | tee "$OUT/tests.log" | tail -3
cd benchmarks
for bits in 4 8; do
    echo "== resident GEMV sweep, $bits-bit $(( $(date +%s) - t0 ))s"
    timeout 150 python3 resident_gemv.py --dot4 --bits $bits --out "$OUT/gemv$bits.md" 2>&1 | grep '^|' | tail -14
done
for fmt in float int8 int4; do
    echo "== a decode step, residents $fmt $(( $(date +%s) - t0 ))s"
    timeout 70 python3 profile_decode.py --root /root/q --layers 4 --resident-format $fmt > "$OUT/profile-$fmt.txt" 2>&1
    grep -A4 'one graph a step' "$OUT/profile-$fmt.txt"
done
for fmt in float int8; do
    echo "== 8 sequences, residents $fmt $(( $(date +%s) - t0 ))s"
    timeout 60 python3 batch_decode.py /root/q/store-397b-4l-4b-g64-v248320 --device cuda --counts 1,8 --tokens 48 \
        --server-graphs --resident-format $fmt > "$OUT/batch-$fmt.txt" 2>&1
    grep '^|' "$OUT/batch-$fmt.txt" | tail -4
done
echo "== end $(( $(date +%s) - t0 ))s"
