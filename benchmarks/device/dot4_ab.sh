#!/usr/bin/env bash
# One device call (~8 min) that decides FLASHMOE_GPU_DOT4 (kernels/dot4_gemv.py): its GPU tests, then the integer
# dot products against the float kernels, the same runs with and without the variable.
#   run(command="bash benchmarks/device/dot4_ab.sh", carry=["scratch/tfslim", "scratch/whl-fla", "scratch/whl-sm"])
# Outputs under $OUT: tests.log, gemv.md (resident matrices, 1 and 8 rows), kernels-*.txt (decode experts at the 397B
# geometry, K=10 and a batch of 8 tokens' 80 pairs), profile-*.txt (a whole decode step, 4 layers, the 248k head).
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
t0=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_dot4_gemv.py tests/test_quantized_residents.py \
    tests/test_mxfp4.py -m gpu 2>&1 | tee "$OUT/tests.log" | tail -5
cd benchmarks
echo "== resident GEMV $(( $(date +%s) - t0 ))s"
timeout 100 python3 resident_gemv.py --dot4 --out "$OUT/gemv.md" 2>&1 | grep '^|' | tail -14
for dot4 in 0 1; do
    echo "== decode experts, FLASHMOE_GPU_DOT4=$dot4 $(( $(date +%s) - t0 ))s"
    for k in 10 80; do
        FLASHMOE_GPU_DOT4=$dot4 timeout 45 python3 kernels.py --k $k --no-sweep > "$OUT/kernels-k$k-$dot4.txt" 2>&1
        head -4 "$OUT/kernels-k$k-$dot4.txt"
    done
    echo "== a decode step, FLASHMOE_GPU_DOT4=$dot4 $(( $(date +%s) - t0 ))s"
    FLASHMOE_GPU_DOT4=$dot4 timeout 80 python3 profile_decode.py --root /root/q --layers 4 --resident-format int4 \
        > "$OUT/profile-$dot4.txt" 2>&1
    grep 'one graph a step' "$OUT/profile-$dot4.txt"
done
echo "== end $(( $(date +%s) - t0 ))s"
