#!/usr/bin/env bash
# Every run behind docs/RESULTS.md's teacher-56m table, then the table itself
# (docs/results/qat-teacher-56m.json). Needs one or more CUDA GPUs; run from the repository root:
#   DATA=../shared/data bash recipes/teacher-56m-table.sh
# DATA holds teacher-56m/ and gutenberg-sample/. Every run uses recipes/teacher-56m.toml (2 epochs
# per precision stage) and is evaluated on heldout.txt at context 1024. Runs resume from their last
# finished block if the script is started again. Three lanes run side by side: lane A on GPU 0,
# lanes B and C on GPU 1 (on GPU 0 after lane A when there is one GPU); a lane's runs go one by
# one. A run with 5 quantized input streams holds about 75 GB of GPU memory.
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
      --run-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1; then
    echo "$(date +%T) done $name"
  else
    echo "$(date +%T) FAILED $name: see $OUT/$name.log"
  fi
}
lane_a() { run bitbybit 0; run no-progressive 0 --no-progressive; }
lane_b() { run no-split "$1" --no-split; }
lane_c() {
  run direct-w2 "$1" --method direct --bits 2  # stages [w2], [w2, w2a2]
  for b in 8 4 3; do run "direct-w$b" "$1" --method direct --bits "$b" --act-bits 16; done
  run rtn "$1" --method rtn
}
if [ "$NGPU" -ge 2 ]; then
  lane_a & lane_b 1 & lane_c 1 & wait
else
  { lane_a; lane_b 0; } & lane_c 0 & wait
fi
finished=()
for name in rtn direct-w8 direct-w4 direct-w3 direct-w2 bitbybit no-split no-progressive; do
  if [ -f "$OUT/$name/summary.json" ]; then finished+=("$OUT/$name"); else echo "missing from the table: $name"; fi
done
$PY -m qat.results --model teacher-56m --out docs/results/qat-teacher-56m.json "${finished[@]}"
