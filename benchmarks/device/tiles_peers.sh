#!/usr/bin/env bash
# One device call (~9.5 min): issue 17's "every expert in VRAM" row at the 397B geometry with resident_tile's swept
# tiles and activations rounded inside the kernels (the new defaults), llama.cpp built and the model converted in the
# same call, two rounds taking turns; then a 2-layer decode step profiled by default and with FLASHMOE_GPU_DOT4=rows.
#   run(command="bash benchmarks/device/tiles_peers.sh", carry=["scratch/tfslim", "scratch/whl-fla",
#       "benchmarks/peers/llama-src.tgz"])   (benchmarks/peers/llama-src.sh makes the tarball)
# Outputs under $OUT: peers.md, peers.json, profile-{fused,rows}.txt.
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
t0=$(date +%s)
timeout 470 python3 benchmarks/peers.py --llama-src benchmarks/peers/llama-src.tgz --root /root/w --geometry 397b \
    --layers 2 --bits 4 --regimes vram --reps 2 --rounds 2 --resident-format int4 --out "$OUT/peers.md" \
    --json "$OUT/peers.json" > "$OUT/peers.log" 2>&1
tail -12 "$OUT/peers.log"
cd benchmarks
for mode in fused rows; do
    left=$(( 570 - ($(date +%s) - t0) ))
    [ $left -lt 20 ] && break
    echo "== a 2-layer step, vocab 512, int4 residents, FLASHMOE_GPU_DOT4=$mode, ${left}s left"
    FLASHMOE_GPU_DOT4=$mode timeout $left python3 profile_decode.py --root /root/q --layers 2 --vocab 512 \
        --resident-format int4 > "$OUT/profile-$mode.txt" 2>&1
    grep -A6 'one graph a step' "$OUT/profile-$mode.txt"
done
echo "== end $(( $(date +%s) - t0 ))s"
