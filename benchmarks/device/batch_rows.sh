#!/usr/bin/env bash
# One device call (~8 min): resident_mm (a decode batch's rows over quantized residents on the tensor cores) tested
# on the GPU, its tiles swept against bf16, dot4 and the grouped kernel at 4-64 rows, then batched decode over int4
# residents against bf16 ones through the engine.
#   run(command="bash benchmarks/device/batch_rows.sh", carry=["scratch/tfslim", "scratch/whl-fla"])
# Outputs under $OUT: tests.log, rows.txt, batch-bf16.txt, batch-int4.txt.
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
t0=$(date +%s)
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_resident_mm.py tests/test_affine.py 2>&1 \
    | tee "$OUT/tests.log" | tail -3
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quantized_residents.py 2>&1 \
    | tee -a "$OUT/tests.log" | tail -3
cd benchmarks
echo "== rows sweep $(( $(date +%s) - t0 ))s"
timeout 240 python3 resident_gemv.py --rows --bits 4 > "$OUT/rows.txt" 2>&1
grep '^|' "$OUT/rows.txt" | tail -32
echo "== batched decode $(( $(date +%s) - t0 ))s"
mkdir -p /root/b
timeout 120 python3 -c "
from pathlib import Path; from serve import random_store
print(random_store(Path('/root/b'), '397b', 4, 64, 4, 32))" 2>&1 | tail -1
for fmt in bf16 int4; do
    left=$(( 560 - ($(date +%s) - t0) ))
    extra=$([ $fmt = int4 ] && echo "--resident-format int4")
    timeout $left python3 batch_decode.py /root/b/store --device cuda --counts 1,8,16 --tokens 64 --server-graphs \
        $extra > "$OUT/batch-$fmt.txt" 2>&1
    grep '^|' "$OUT/batch-$fmt.txt" | tail -4
done
echo "== end $(( $(date +%s) - t0 ))s"
