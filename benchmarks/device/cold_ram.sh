#!/usr/bin/env bash
# One device call (~9 min), issue 14: in a cgroup of memory.max=16G, which caches RAM better for experts read from
# the disk: the kernel's page cache (buffered reads) or flashmoe's own pinned RAM cache (O_DIRECT, reuse-frequency,
# 10 GB)? K=4 at the 397B geometry, calibrated trace then uniform, each against its bound from the bytes that reached
# the disk during the timed tokens. A ~35 GB store (9 layers) is written first where /root/g has none (~2 min).
#   run(command="bash benchmarks/device/cold_ram.sh", carry=["scratch/tfslim", "scratch/whl-fla"])
# 128 tokens: past the cold start (a 64-token window counted its first misses). Outputs under $OUT: regimes.md (the
# tables), k4-calibrated.json, k4-uniform.json.
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
t0=$(date +%s)
cd benchmarks
for trace in calibrated uniform; do
    left=$(( 570 - ($(date +%s) - t0) ))
    echo "== K=4, $trace trace, ${left}s left"
    timeout $left python3 gpu_regimes.py --root /root/g --expert-gb 35 --tokens 128 --k 4 --trace $trace \
        --regimes cold-cgroup,cold-ram-cgroup --json "$OUT/k4-$trace.json" --out "$OUT/regimes.md" 2>&1 \
        | grep -v '^{' | grep -E '^\||failed|Error' | tail -8
done
echo "== end $(( $(date +%s) - t0 ))s"
