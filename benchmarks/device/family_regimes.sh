#!/usr/bin/env bash
# One device call per geometry (~6-9 min), issue 11: all experts in VRAM and 20% in VRAM (+ pinned RAM) against the
# bound, with the whole-step graphs, dot4 and int4/bf16 residents of today, at a family's real geometry:
#   run(command="bash benchmarks/device/family_regimes.sh deepseek-v3 40", carry=["scratch/tfslim", "scratch/whl-fla"])
#   run(command="bash benchmarks/device/family_regimes.sh gpt-oss-120b 20", ...)
#   run(command="bash benchmarks/device/family_regimes.sh 397b 20", ...)
# (geometry as gpu_regimes.py's GEOMETRIES, then GB of 4-bit experts: DeepSeek-V3's MoE layers are 6.3 GB each, so 40
# gives 6 of them after its 3 dense layers). Outputs under $OUT: regimes.md, regimes.json.
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
geometry=${1:-deepseek-v3}
gb=${2:-20}
cd benchmarks
timeout 560 python3 gpu_regimes.py --root /root/fam --geometry "$geometry" --expert-gb "$gb" --tokens 32 \
    --regimes vram,ram --json "$OUT/regimes.json" --out "$OUT/regimes.md" 2>&1 | grep -v '^{' \
    | grep -E '^\||failed|Error|wrote' | tail -8
