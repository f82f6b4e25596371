#!/usr/bin/env bash
# One device call (~9 min), issue 15: does batching pay at the 397B geometry when tokens share experts as a trained
# model's concurrent requests do? 4 layers of Qwen3.5-397B-A17B (512 experts of 1024, K=10, 4-bit group 64, every
# expert in VRAM, bf16 residents), sequences routed by the router (uniform) and by their own calibrated traces.
#   run(command="bash benchmarks/device/batch_trace.sh", carry=["scratch/tfslim", "scratch/whl-fla"])
# First the GPU tests of routing by traces (a batch graph, whole-step graphs) and of resident_mm.
# Outputs under $OUT: tests.log, batch-router.txt, batch-calibrated.txt.
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
t0=$(date +%s)
timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_resident_mm.py 2>&1 \
    | tee "$OUT/tests.log" | tail -2
timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/test_gpu.py -k "traced or batch_of_decode" \
    2>&1 | tee -a "$OUT/tests.log" | tail -2
cd benchmarks && mkdir -p /root/s397
[ -f /root/s397/store/manifest.json ] || timeout 200 python3 -c "
from pathlib import Path; from serve import random_store
print(random_store(Path('/root/s397'), '397b', 4, 512, 4, 64))" 2>&1 | tail -1
for trace in calibrated router; do
    left=$(( 570 - ($(date +%s) - t0) ))
    [ $left -lt 40 ] && break
    timeout $left python3 batch_decode.py /root/s397/store --device cuda --counts 1,8,16 --tokens 96 --server-graphs \
        --trace $trace > "$OUT/batch-$trace.txt" 2>&1
    echo "$trace:"; grep '^| [0-9]' "$OUT/batch-$trace.txt" | tail -3
done
echo "== end $(( $(date +%s) - t0 ))s"
