#!/usr/bin/env bash
# resident_mm (a decode batch's rows over quantized residents on the tensor cores), in two device calls of ~8 min:
#   run(command="bash benchmarks/device/batch_rows.sh sweep", carry=["scratch/tfslim", "scratch/whl-fla"])
#     its GPU tests and the quantized residents', then its tiles swept against bf16 and dot4 at 8-64 rows
#     (resident_gemv.py --rows)
#   run(command="bash benchmarks/device/batch_rows.sh decode", ...)
#     batched decode through the engine over bf16 residents and over int4 ones (batch_decode.py, 4 layers of 397B)
# Outputs under $OUT: tests.log, rows.txt; batch-bf16.txt, batch-int4.txt.
set -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (the device copy may have no .git)
source benchmarks/device/setup.sh
t0=$(date +%s)
if [ "${1:-sweep}" = sweep ]; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=line tests/test_resident_mm.py tests/test_affine.py 2>&1 \
        | tee "$OUT/tests.log" | tail -3
    timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=line -m gpu tests/test_quantized_residents.py 2>&1 \
        | tee -a "$OUT/tests.log" | tail -3
    echo "== rows sweep $(( $(date +%s) - t0 ))s"
    cd benchmarks && timeout $(( 560 - ($(date +%s) - t0) )) python3 resident_gemv.py --rows --bits 4 > "$OUT/rows.txt" 2>&1
    grep '^|' "$OUT/rows.txt" | tail -32
else
    cd benchmarks && mkdir -p /root/b
    [ -f /root/b/store/manifest.json ] || timeout 120 python3 -c "
from pathlib import Path; from serve import random_store
print(random_store(Path('/root/b'), '397b', 4, 64, 4, 32))" 2>&1 | tail -1
    for fmt in int4 bf16; do
        left=$(( 560 - ($(date +%s) - t0) ))
        extra=$([ $fmt = int4 ] && echo "--resident-format int4")
        timeout $left python3 batch_decode.py /root/b/store --device cuda --counts 1,8,16 --tokens 64 --server-graphs \
            $extra > "$OUT/batch-$fmt.txt" 2>&1
        grep '^|' "$OUT/batch-$fmt.txt" | tail -4
    done
fi
echo "== end $(( $(date +%s) - t0 ))s"
