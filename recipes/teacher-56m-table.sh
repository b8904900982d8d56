#!/usr/bin/env bash
# Every run behind docs/RESULTS.md's teacher-56m table, then the table itself
# (docs/results/qat-teacher-56m.json). Needs one or more CUDA GPUs; run from the repository root:
#   DATA=../shared/data bash recipes/teacher-56m-table.sh [RUN ...]
# RUN: any of rtn direct-w8 direct-w4 direct-w3 direct-w2 bitbybit no-split no-progressive (default: all,
# in that order). Runs whose summary.json exists are not run again; an interrupted run resumes from its
# last finished block when the script is started again.
# Environment: RUNS (run directory root, default runs/teacher-56m), LANES (runs side by side, default 2:
# the RUN list is dealt to the lanes in turn, lane i on GPU i mod the GPU count), TABLE (the results
# file, default docs/results/qat-teacher-56m.json), QAT_FLAGS (extra qat.run flags for every run, e.g.
# "--n-train 1024" for the reduced table of docs/RESULTS.md), NESTED_FLAGS (the schedule of the nested
# runs, bitbybit and no-split; default "--lock-bits 2 --stage-epochs 2,2,4": {2} -> {2, W2A2} ->
# {8,4,3} with the 2-bit codes held, chosen on stories260K's training part). DATA holds teacher-56m/
# and gutenberg-sample/. Every run uses recipes/teacher-56m.toml (2 epochs per precision stage) and is
# evaluated on heldout.txt at context 1024.
# GPU memory at 8 M tokens: about 8 GB per stored stream of hidden states (bf16), so a run with five
# quantized targets (bitbybit, no-split, no-progressive) holds about 60 GB and a direct-QAT run 25-35 GB.
set -euo pipefail
PY=${PYTHON:-python3}
DATA=${DATA:-../shared/data}
OUT=${RUNS:-runs/teacher-56m}
LANES=${LANES:-2}
TABLE=${TABLE:-docs/results/qat-teacher-56m.json}
ALL=(rtn direct-w8 direct-w4 direct-w3 direct-w2 bitbybit no-split no-progressive)
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=("${ALL[@]}")
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "teacher-56m-table.sh: no CUDA GPU" >&2; exit 1; }
NESTED_FLAGS=${NESTED_FLAGS---lock-bits 2 --stage-epochs 2,2,4}
flags_of() {  # the qat.run flags that make run NAME
  case $1 in
    rtn) echo "--method rtn" ;;
    direct-w2) echo "--method direct --bits 2" ;;  # stages [w2], [w2, w2a2]
    direct-w[348]) echo "--method direct --bits ${1#direct-w} --act-bits 16" ;;
    bitbybit) echo "$NESTED_FLAGS" ;;
    no-split) echo "$NESTED_FLAGS --no-split" ;;
    no-progressive) echo "--no-progressive" ;;
    *) echo "teacher-56m-table.sh: unknown run '$1' (one of: ${ALL[*]})" >&2; return 1 ;;
  esac
}
for name in "${NAMES[@]}"; do flags_of "$name" > /dev/null; done
mkdir -p "$OUT"
run() {  # run NAME GPU
  local name=$1 gpu=$2
  if [ -f "$OUT/$name/summary.json" ]; then echo "$(date +%T) $name is finished already"; return; fi
  echo "$(date +%T) start $name on GPU $gpu"
  # shellcheck disable=SC2046  # the flags are words
  if CUDA_VISIBLE_DEVICES=$gpu $PY -m qat.run --model "$DATA/teacher-56m" --recipe recipes/teacher-56m.toml \
      --calib-data "$DATA/gutenberg-sample/calib-large.txt" --eval-data "$DATA/gutenberg-sample/heldout.txt" \
      --run-dir "$OUT/$name" ${QAT_FLAGS:-} $(flags_of "$name") > "$OUT/$name.log" 2>&1; then
    echo "$(date +%T) done $name"
  else
    echo "$(date +%T) FAILED $name: see $OUT/$name.log"
  fi
}
lane() {  # lane K: runs K, K + LANES, ... of the list
  local k=$1 i
  for ((i = k; i < ${#NAMES[@]}; i += LANES)); do run "${NAMES[$i]}" $((k % NGPU)); done
}
for ((k = 0; k < LANES; k++)); do lane "$k" & done
wait
finished=()
for name in "${ALL[@]}"; do
  if [ -f "$OUT/$name/summary.json" ]; then finished+=("$OUT/$name"); else echo "missing from the table: $name"; fi
done
$PY -m qat.results --model teacher-56m --out "$TABLE" "${finished[@]}"
