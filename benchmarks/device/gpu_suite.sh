#!/usr/bin/env bash
# One device call (~8 min): every GPU test (`pytest -m gpu`), the ones written since their last GPU run among them
# (routing by a set of traces in batch graphs, resident_mm's K splits, GPT-OSS's MXFP4 release, the prefix cache's
# queued copies, the CPU share's batch graph), then resident_mm's own tests (they run on the GPU when there is one):
#   run(command="bash benchmarks/device/gpu_suite.sh", carry=["scratch/tfslim", "scratch/whl-fla", "scratch/whl-sm"])
# Outputs under $OUT: gpu-tests.log (failures with their short tracebacks).
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
timeout 480 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/ --continue-on-collection-errors 2>&1 \
    | tee "$OUT/gpu-tests.log" | grep -E "passed|failed|error|FAILED|ERROR" | tail -25
timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_resident_mm.py 2>&1 \
    | tee -a "$OUT/gpu-tests.log" | tail -2
