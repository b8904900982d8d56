#!/usr/bin/env bash
# Every run behind docs/RESULTS.md's stories260K table, then the table itself
# (docs/results/qat-stories260K.json). CPU only; run from the repository root.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=runs/stories260K
RUN="$PY -m qat.run --model runs/stories260K-hf --recipe recipes/stories260k.toml --restart"
[ -f runs/stories260K-hf/config.json ] || $PY -m qat.convert ../shared/data/stories260K/stories260K.bin \
    ../shared/data/stories260K/tok512.bin runs/stories260K-hf
$RUN --run-dir $OUT/rtn --method rtn
$RUN --run-dir $OUT/bitbybit
$RUN --run-dir $OUT/no-split --no-split
$RUN --run-dir $OUT/no-progressive --no-progressive --epochs-per-stage 5   # 2 stages x 5 = 5 stages x 2 epochs
$RUN --run-dir $OUT/direct-w2 --method direct --bits 2 --epochs-per-stage 5  # [w2], [w2, w2a2]: 10 epochs
for b in 8 4 3; do
  $RUN --run-dir $OUT/direct-w$b --method direct --bits $b --act-bits 16 --epochs-per-stage 10
done
# Measurements behind the method's choices (not rows of the table):
$RUN --run-dir $OUT/rtn-split --method rtn --split              # splitting alone, no training
$RUN --run-dir $OUT/bitbybit-fp-input --block-input fp          # blocks fed the teacher's activations
$RUN --run-dir $OUT/bitbybit-equal-weights --loss-weights w8a16=1,w4a16=1
$RUN --run-dir $OUT/bitbybit-w8x30 --loss-weights w8a16=30,w4a16=3
$PY -m qat.results --model stories260K --out docs/results/qat-stories260K.json \
    $OUT/rtn $OUT/direct-w8 $OUT/direct-w4 $OUT/direct-w3 $OUT/direct-w2 $OUT/bitbybit $OUT/no-split $OUT/no-progressive
