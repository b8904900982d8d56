#!/usr/bin/env bash
# Every run behind docs/RESULTS.md's teacher-56m table, then the table itself
# (docs/results/qat-teacher-56m.json). Needs one or more CUDA GPUs; run from the repository root:
#   DATA=../shared/data bash recipes/teacher-56m-table.sh
# Environment: RUNS (run directory root, default runs/teacher-56m), QAT_FLAGS (extra qat.run flags
# for every run, e.g. "--n-train 1024" for the reduced table of docs/RESULTS.md), NESTED_FLAGS (the
# schedule of the nested runs, bitbybit and no-split; default "--lock-bits 2 --stage-epochs 2,2,4":
# {2} -> {2, W2A2} -> {8,4,3} with the 2-bit codes held, chosen on stories260K's training part).
# DATA holds teacher-56m/ and gutenberg-sample/. Every run uses recipes/teacher-56m.toml (2 epochs
# per precision stage) and is evaluated on heldout.txt at context 1024. Runs resume from their last
# finished block if the script is started again. Two lanes run side by side, each one run at a time:
# lane 1 (bitbybit, no-split) on GPU 0, lane 2 (direct QAT, RTN, no-progressive) on GPU 1, or both
# on GPU 0 when there is one GPU. A run with 5 quantized input streams holds about 60 GB of GPU memory.
set -euo pipefail
PY=${PYTHON:-python3}
DATA=${DATA:-../shared/data}
OUT=${RUNS:-runs/teacher-56m}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "teacher-56m-table.sh: no CUDA GPU" >&2; exit 1; }
mkdir -p "$OUT"
run() {  # run NAME GPU [qat.run flags]
  local name=$1 gpu=$2; shift 2
  echo "$(date +%T) start $name on GPU $gpu"
  if CUDA_VISIBLE_DEVICES=$gpu $PY -m qat.run --model "$DATA/teacher-56m" --recipe recipes/teacher-56m.toml \
      --calib-data "$DATA/gutenberg-sample/calib-large.txt" --eval-data "$DATA/gutenberg-sample/heldout.txt" \
      --run-dir "$OUT/$name" ${QAT_FLAGS:-} "$@" > "$OUT/$name.log" 2>&1; then
    echo "$(date +%T) done $name"
  else
    echo "$(date +%T) FAILED $name: see $OUT/$name.log"
  fi
}
NESTED_FLAGS=${NESTED_FLAGS---lock-bits 2 --stage-epochs 2,2,4}
lane_1() { run bitbybit "$1" $NESTED_FLAGS; run no-split "$1" $NESTED_FLAGS --no-split; }
lane_2() {
  run direct-w2 "$1" --method direct --bits 2  # stages [w2], [w2, w2a2]
  for b in 8 4 3; do run "direct-w$b" "$1" --method direct --bits "$b" --act-bits 16; done
  run rtn "$1" --method rtn
  run no-progressive "$1" --no-progressive
}
lane_1 0 & lane_2 $((NGPU > 1 ? 1 : 0)) & wait
finished=()
for name in rtn direct-w8 direct-w4 direct-w3 direct-w2 bitbybit no-split no-progressive; do
  if [ -f "$OUT/$name/summary.json" ]; then finished+=("$OUT/$name"); else echo "missing from the table: $name"; fi
done
$PY -m qat.results --model teacher-56m --out docs/results/qat-teacher-56m.json "${finished[@]}"
