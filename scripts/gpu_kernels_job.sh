#!/usr/bin/env bash
# The kernels' GPU job for the device machine (H200), from the repo root: bash scripts/gpu_kernels_job.sh PHASE
#   tune   GPU correctness tests, then --tune of the decode paths on the two headline shapes (writes
#          kernels/triton_table.json, copied to $OUT) and a quick benchmark of those shapes with the SASS report
#   bench  the full benchmark of the committed code (docs/results/kernels-h200.json, copied to $OUT)
# Logs and results land in $OUT (at most 8 files come back).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
case "${1:-}" in
  tune)
    python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -x -q 2>&1 | tee "$OUT/gpu_tests.log"
    python3 -m kernels.bench --tune --tune-budget "${TUNE_BUDGET:-240}" --shapes 8192x8192,4096x14336 \
        --kernels w2a16 --ms 1,2,4 --out "$OUT/tuned.json" 2>&1 | tee "$OUT/tune.log"
    python3 -m kernels.bench --shapes 8192x8192,4096x14336 --kernels w2a16,w4a16,w2a2,actquant2 \
        --ms 1,2,4,8,16,64,1024,4096 --out "$OUT/quick.json" --sass "$OUT/sass.json" 2>&1 | tee "$OUT/bench_quick.log"
    cp kernels/triton_table.json "$OUT/"
    ;;
  bench)
    python3 -m kernels.bench --kernels w2a16,w4a16,w2a2,actquant2 --sass "$OUT/sass.json" 2>&1 | tee "$OUT/bench.log"
    python3 -m kernels.bench --kernels w3a16,w8a16,w4a4 --ms 1,16,1024 --append 2>&1 | tee -a "$OUT/bench.log"
    cp docs/results/kernels-h200.json "$OUT/"
    ;;
  *) echo "usage: $0 tune|bench" >&2; exit 2 ;;
esac
