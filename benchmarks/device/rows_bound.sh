#!/usr/bin/env bash
# One device call (~8 min) after the swept tiles became the default: the dot4 GPU tests under the new defaults
# (8-row tiles, activations rounded inside the kernels), the resident shapes at 1/4/8/16
# rows against the grouped tensor-core kernel and bf16 (which a decode batch should take), and issue 14's cold regime
# at K=4 again with the bound priced from the bytes that reached the disk.
#   run(command="bash benchmarks/device/rows_bound.sh", carry=["scratch/tfslim", "scratch/whl-fla"])
# Outputs under $OUT: tests.log, gemv4.txt, k4-*.json, regimes.md.
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
t0=$(date +%s)
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_dot4_gemv.py tests/test_quantized_residents.py tests/test_errors.py \
    -m gpu 2>&1 | tee "$OUT/tests.log" | tail -3
cd benchmarks
echo "== resident shapes at 1/4/8/16 rows $(( $(date +%s) - t0 ))s"
timeout 130 python3 resident_gemv.py --dot4 --bits 4 > "$OUT/gemv4.txt" 2>&1
grep '^|' "$OUT/gemv4.txt" | tail -24
for trace in uniform calibrated; do
    left=$(( 570 - ($(date +%s) - t0) ))
    echo "== K=4, $trace trace, cold-cgroup, ${left}s left"
    timeout $left python3 gpu_regimes.py --root /root/g --expert-gb 35 --tokens 64 --k 4 --trace $trace \
        --regimes cold-cgroup --json "$OUT/k4-$trace.json" --out "$OUT/regimes.md" 2>&1 | grep -v '^{' | tail -3
done
echo "== end $(( $(date +%s) - t0 ))s"
