#!/usr/bin/env bash
# One device call (~9 min) for issue 14's targets at the Qwen3.5-397B geometry: decode in a cgroup of memory.max=16G
# with experts read from the disk (page cache dropped first), routed by a uniform trace and by the calibrated one,
# at K=4 and K=10, and the RAM regime (20% of the experts in VRAM) with the calibrated trace; each against its bound
# from the reads that happened. A ~35 GB store (9 layers) is written first (~2 min on the device's disk).
#   run(command="bash benchmarks/device/offload_trace.sh", carry=["scratch/tfslim", "scratch/whl-fla"])
# Outputs under $OUT: regimes.md (the tables), k4-uniform.json, k4-calibrated.json, k10-*.json.
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
t0=$(date +%s)
cd benchmarks
for k in 4 10; do
    for trace in uniform calibrated; do
        regimes=cold-cgroup
        [ "$trace" = calibrated ] && regimes=ram,cold-cgroup
        echo "== K=$k, $trace trace: $regimes $(( $(date +%s) - t0 ))s"
        timeout 200 python3 gpu_regimes.py --root /root/g --expert-gb 35 --tokens 64 --k $k --trace $trace \
            --regimes $regimes --json "$OUT/k$k-$trace.json" --out "$OUT/regimes.md" 2>&1 | grep -v '^{' | tail -4
    done
done
echo "== end $(( $(date +%s) - t0 ))s"
