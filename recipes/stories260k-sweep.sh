#!/usr/bin/env bash
# The tuning sweep behind the stories260K recipe's choices (docs/RESULTS.md, "How the recipe was chosen"):
# learning rate, per-precision loss weights, and what feeds each block. Smaller than the table's runs
# (128 training sequences, no W2A2 stage); the choices were read off the held-out PPL of this small
# sweep on a tiny model. Run from the repository root after stories260k-table.sh.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=runs/stories260K-sweep
RUN="$PY -m qat.run --model runs/stories260K-hf --recipe recipes/stories260k.toml --restart --n-train 128 --act-bits 16"
$RUN --run-dir $OUT/equal-lr1e-4 --lr 1e-4 --loss-weights w8a16=1,w4a16=1
$RUN --run-dir $OUT/w100-10-3-lr1e-4 --lr 1e-4 --loss-weights w8a16=100,w4a16=10,w3a16=3
$RUN --run-dir $OUT/w10-3-lr1e-4 --lr 1e-4
$RUN --run-dir $OUT/w10-3-lr3e-4 --lr 3e-4
$RUN --run-dir $OUT/w10-3-lr1e-3
$RUN --run-dir $OUT/w30-3-lr1e-3 --loss-weights w8a16=30,w4a16=3
$RUN --run-dir $OUT/equal-lr1e-3 --loss-weights w8a16=1,w4a16=1
$RUN --run-dir $OUT/w10-3-lr1e-3-fp-input --block-input fp
$RUN --run-dir $OUT/direct-w2-lr1e-3 --method direct --bits 2 --epochs-per-stage 8
$PY -m qat.results --per-run --model stories260K --out docs/results/qat-stories260K-sweep.json $OUT/*
