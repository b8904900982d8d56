#!/usr/bin/env bash
# The kernels' GPU job for the device machine (H200), from the repo root: bash scripts/gpu_kernels_job.sh PHASE
#   tune    GPU correctness tests, then `kernels.bench --tune` of the GEMV (M = 1, 2) of W2 and W4 on
#           the two headline shapes (writes kernels/triton_table.json; copied to $OUT)
#   bench1  the benchmark of the committed code, first four shapes (docs/results/kernels-h200.json)
#   bench2  the other four shapes and W3/W8/W4A4 (--append, onto bench1's file), with the compiler report
#   bench   bench1 then bench2 in one command
#   final   --tune of M = 1, 2 (W2, W4) on the two headline shapes, then `all` with that table
#   all     what a short lease allows in one command: the GPU tests of the headline shapes, act-quant, split channels and
#           graphs/compile (at most TEST_S seconds), then the benchmark of W2A16/W4A16/W2A2/act-quant on every
#           shape (headline shapes first) at M = 1, 2, 4, 8, 16, 64, 1024, saved after each shape
# Logs and results land in $OUT (at most 8 files come back).
set -uo pipefail
export PYTHONUNBUFFERED=1
case "${1:-}" in -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee -a "$OUT/gpu.txt"
SHAPES_A=4096x4096,4096x11008,11008x4096,4096x14336
SHAPES_B=14336x4096,8192x8192,8192x28672,28672x8192
case "${1:-}" in
  tune)
    python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -x -q 2>&1 | tee "$OUT/gpu_tests.log"
    python3 -m kernels.bench --tune --tune-budget "${TUNE_BUDGET:-200}" --shapes 8192x8192,4096x14336 \
        --kernels w2a16,w4a16 --ms 1,2 --out "$OUT/tuned.json" 2>&1 | tee "$OUT/tune.log"
    cp kernels/triton_table.json "$OUT/"
    ;;
  bench1)
    python3 -m kernels.bench --kernels w2a16,w4a16,w2a2,actquant2 --shapes $SHAPES_A 2>&1 | tee "$OUT/bench1.log"
    cp docs/results/kernels-h200.json "$OUT/"
    ;;
  bench2)
    python3 -m kernels.bench --kernels w2a16,w4a16,w2a2,actquant2 --shapes $SHAPES_B --append \
        --sass "$OUT/sass.json" 2>&1 | tee "$OUT/bench2.log"
    python3 -m kernels.bench --kernels w3a16,w8a16,w4a4 --ms 1,16,1024 --append 2>&1 | tee -a "$OUT/bench2.log"
    cp docs/results/kernels-h200.json "$OUT/"
    ;;
  bench)
    bash "$0" bench1 && bash "$0" bench2
    ;;
  final)
    python3 -m kernels.bench --tune --tune-budget "${TUNE_BUDGET:-100}" --shapes 8192x8192,4096x14336 \
        --kernels w2a16 --ms 1,2 --out "$OUT/tuned.json" 2>&1 | grep -v "^w2a16 " | tee "$OUT/tune.log"
    cp kernels/triton_table.json "$OUT/"
    TEST_S=${TEST_S:-90} bash "$0" all
    ;;
  all)
    timeout "${TEST_S:-80}" python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -x -q \
        -k "((8192-8192 or 4096-14336) and every_shape) or actquant_bit_exact or split_channels or cuda_graph" 2>&1 | tee "$OUT/gpu_tests.log"
    python3 -m kernels.bench --kernels w2a16,w4a16,w2a2,actquant2 --ms 1,2,4,8,16,64,1024 \
        --shapes 8192x8192,4096x14336,4096x4096,4096x11008,11008x4096,14336x4096,8192x28672,28672x8192 \
        --out "$OUT/kernels-h200.json" --sass "$OUT/sass.json" 2>&1 | tee "$OUT/bench.log"
    ;;
  *) echo "usage: $0 tune|bench1|bench2|bench|all|final" >&2; exit 2 ;;
esac
echo "phase ${1} done in ${SECONDS}s" | tee -a "$OUT/gpu.txt"
