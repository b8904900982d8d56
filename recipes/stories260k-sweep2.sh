#!/usr/bin/env bash
# Sweep 2 on stories260K (CPU): closing the gap between the nested checkpoint and dedicated 2-bit QAT
# (docs/results/qat-stories260K-sweep2.json). One change per screening run against the recipe.
#
# Screening runs: 128 training sequences, the full recipe otherwise (W2A2 stage included), no held-out
# evaluation. Selection metrics, never the held-out tail: the last block's validation MSE per target
# (losses.json: 16 validation windows of the training part, fed by the quantized prefix at that target)
# and the PPL on the first 40k tokens of the training part (`qat.eval --data-part train`, RUN/sel/).
# Finalists: the full recipe (256 sequences) with qat.run's held-out evaluation (RUN/eval/).
#
# References: the committed table's runs scored on the selection text, e.g.
#   python -m qat.eval runs/stories260K/bitbybit/checkpoint --data $DATA --data-part train --max-tokens 40000 \
#     --ctx 512 --act-bits 2 --no-fp --threads 1 --out runs/sweep2/ref-sel/bitbybit   (also no-split, no-progressive, direct-w2)
# Usage (from the repository root; each mode runs its lines two at a time):
#   bash recipes/stories260k-sweep2.sh screen|final|results|clip
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=runs/sweep2
DATA=../shared/data/tinystories-val/tinystories_val.txt
BASE="$PY -m qat.run --model runs/stories260K-hf --recipe recipes/stories260k.toml --restart --threads 1"

sel() {  # selection PPL on the training part (first 40k tokens)
  $PY -m qat.eval "$1/checkpoint" --data $DATA --data-part train --max-tokens 40000 --ctx 512 \
    --act-bits 2 --no-fp --threads 1 --out "$1/sel" > "$1/sel.log" 2>&1
}
screen() {  # NAME FLAGS...: a 128-sequence screening run + its selection PPL
  local name=$1; shift
  $BASE --n-train 128 --no-eval --run-dir $OUT/$name "$@" > /dev/null 2>&1 && sel $OUT/$name
}
final() {  # NAME FLAGS...: the full recipe with held-out evaluation + selection PPL
  local name=$1; shift
  $BASE --run-dir $OUT/$name "$@" > /dev/null 2>&1 && sel $OUT/$name
}
export -f sel screen final
export PY OUT DATA BASE

SCREEN=(
  "base"
  "direct-w2 --method direct --bits 2 --epochs-per-stage 5"
  "noprog --no-progressive --epochs-per-stage 5"
  "nosplit --no-split"
  "lw3-1 --loss-weights w8a16=3,w4a16=1"
  "lw10-3-2x2 --loss-weights w8a16=10,w4a16=3,w2a16=2,w2a2=2"
  "lr2e-3 --lr 2e-3"
  "bs4 --batch-size 4"
  "split5-15 --split-ratio-first 0.05 --split-ratio-last 0.15"
  "se11233 --stage-epochs 1,1,2,3,3"
  "se01144 --stage-epochs 0,1,1,4,4"
  "se11125 --stage-epochs 1,1,1,2,5"
  "se11233-a2x3 --stage-epochs 1,1,2,3,3 --loss-weights w8a16=10,w4a16=3,w2a2=3"
  "lw3-1-se11233 --loss-weights w8a16=3,w4a16=1 --stage-epochs 1,1,2,3,3"
  "noprog-lw3-1 --no-progressive --epochs-per-stage 5 --loss-weights w8a16=3,w4a16=1"
  "lf-5-5-4 --lock-bits 2 --stage-epochs 5,5,4"
  "lf-3-3-4 --lock-bits 2 --stage-epochs 3,3,4"
  "lf-2-4-4 --lock-bits 2 --stage-epochs 2,4,4"
  "lf-3-3-4-w8x30 --lock-bits 2 --stage-epochs 3,3,4 --loss-weights w8a16=30,w4a16=3"
  "lk3-4-4-2 --lock-bits 3 --stage-epochs 4,4,2"
  "lk4-4-4-2 --lock-bits 4 --stage-epochs 4,4,2"
  "lk4-w4x10 --lock-bits 4 --stage-epochs 4,4,2 --loss-weights w8a16=10,w4a16=10"
  "lk4-3-5-2 --lock-bits 4 --stage-epochs 3,5,2"
  "lk4-w4x10-444 --lock-bits 4 --stage-epochs 4,4,4 --loss-weights w4a16=10"
  "lk4-w4x5 --lock-bits 4 --stage-epochs 4,4,2 --loss-weights w4a16=5"
  "lk4-w4x30 --lock-bits 4 --stage-epochs 4,4,2 --loss-weights w4a16=30"
  "lk4-w4x10-split5-15 --lock-bits 4 --stage-epochs 4,4,2 --loss-weights w4a16=10 --split-ratio-first 0.05 --split-ratio-last 0.15"
  "lk4-w4x10-a2x3 --lock-bits 4 --stage-epochs 4,4,2 --loss-weights w4a16=10,w2a2=3"
  "lf-2-4-8 --lock-bits 2 --stage-epochs 2,4,8"
  "lf-2-4-12 --lock-bits 2 --stage-epochs 2,4,12"
  "lf-5-5-8 --lock-bits 2 --stage-epochs 5,5,8"
)
FINAL=(
  "F-lk4-w4x10 --lock-bits 4 --stage-epochs 4,4,2 --loss-weights w8a16=10,w4a16=10"
  "F-lk4 --lock-bits 4 --stage-epochs 4,4,2"
  "F-lk4-w4x10-nosplit --lock-bits 4 --stage-epochs 4,4,2 --loss-weights w8a16=10,w4a16=10 --no-split"
  "F-noprog-w4x10 --no-progressive --epochs-per-stage 5 --loss-weights w8a16=10,w4a16=10"
  "F-lk2 --lock-bits 2 --stage-epochs 2,4,4"
  "F-lk2-248 --lock-bits 2 --stage-epochs 2,4,8"
  "F-lk2-248-nosplit --lock-bits 2 --stage-epochs 2,4,8 --no-split"
  "F-lk4-w4x10-444-s515 --lock-bits 4 --stage-epochs 4,4,4 --loss-weights w4a16=10 --split-ratio-first 0.05 --split-ratio-last 0.15"
  "F-lk2-5512 --lock-bits 2 --stage-epochs 5,5,12"
  "F-base-seed1 --seed 1"
  "F-lk2-248-seed1 --lock-bits 2 --stage-epochs 2,4,8 --seed 1"
  "F-lk2-2412 --lock-bits 2 --stage-epochs 2,4,12"
  "F-lk4-w4x10-444-s515-seed1 --lock-bits 4 --stage-epochs 4,4,4 --loss-weights w4a16=10 --split-ratio-first 0.05 --split-ratio-last 0.15 --seed 1"
  "F-lk4-w4x10-444-nosplit --lock-bits 4 --stage-epochs 4,4,4 --loss-weights w4a16=10 --no-split"
)

case "${1:-screen}" in
  screen) printf '%s\n' "${SCREEN[@]}" | xargs -P 2 -I{} bash -c 'screen {}' ;;
  final) printf '%s\n' "${FINAL[@]}" | xargs -P 2 -I{} bash -c 'final {}' ;;
  results) $PY - $OUT docs/results/qat-stories260K-sweep2.json <<'PY'
import json, sys
from pathlib import Path
out_dir, dest = Path(sys.argv[1]), Path(sys.argv[2])
targets = ["w8a16", "w4a16", "w3a16", "w2a16", "w2a2"]
def ppl(d, sub):
    f = sorted((d / sub).glob("*.json"))
    if not f:
        return None, None
    t = json.loads(f[0].read_text())
    rows = {f"w{r['w_bits']}a{r['a_bits']}": round(r["ppl"], 4) for r in t["rows"] if r["method"] != "fp"}
    return rows, {k: t[k] for k in ("data", "data_part", "ctx", "stride", "tokens_scored")}
runs, settings = [], {}
for d in sorted(p for p in out_dir.iterdir() if (p / "summary.json").is_file()):
    blocks = json.loads((d / "losses.json").read_text())
    last = blocks[-1]["val"][-1]
    sel, sel_setting = ppl(d, "sel")
    heldout, ho_setting = ppl(d, "eval")
    settings.update({"selection_ppl": sel_setting} if sel_setting else {})
    settings.update({"heldout_ppl": ho_setting} if ho_setting else {})
    info = json.loads((d / "checkpoint" / "bitbybit_run.json").read_text())
    recipe = json.loads((d / "recipe.json").read_text())
    runs.append({"run": d.name, "kind": "final" if recipe["n_train"] == 256 else "screen",
                 "command": info["command"].replace("--low-first", "--lock-bits 2"),
                 "train_seconds": round(info["train_seconds"], 1),
                 "selection_val_mse_last_block": {t: round(last[t], 5) for t in targets if t in last},
                 "selection_ppl_train_part": sel, "heldout_ppl": heldout})
# the committed table's runs (docs/results/qat-stories260K.json, full recipe), scored on the same selection text
table = json.loads(Path("docs/results/qat-stories260K.json").read_text())
refs = []
for e in table["runs"]:
    name = Path(e["run_dir"]).name
    sel, _ = ppl(out_dir / "ref-sel" / name, ".")
    if sel is None:
        continue
    held = {f"w{r['w_bits']}a{r['a_bits']}": r["ppl"] for r in table["rows"] if r["run_dir"] == e["run_dir"]
            and r["method"] != "fp"}
    refs.append({"run": e["run_dir"], "kind": "reference (docs/results/qat-stories260K.json)",
                 "command": e["command"], "train_seconds": e["train_seconds"],
                 "selection_ppl_train_part": sel, "heldout_ppl": held})
runs = refs + runs
doc = {"model": "stories260K", "fp_ppl": {"selection_ppl_train_part": 4.0583, "heldout": 5.8496},
       "settings": settings, "runs": runs,
       "note": ("lf-* runs were made with --low-first, the earlier name of --lock-bits 2 (same stages). "
                "train_seconds of this sweep's runs: two runs side by side on the shared 2-core machine "
                "(one thread each, other users' load too), so slower than the table's references."),
       "selection": ("screening runs (kind screen, 128 sequences) were compared on selection_val_mse_last_block "
                     "and selection_ppl_train_part only; heldout_ppl exists for the full-recipe finalists (F-*)")}
dest.write_text(json.dumps(doc, indent=2) + "\n")
for r in runs:
    s, h = r["selection_ppl_train_part"] or {}, r["heldout_ppl"] or {}
    print(f"{r['run']:24s} sel " + " ".join(f"{s.get(t, float('nan')):8.3f}" for t in targets)
          + (" | heldout " + " ".join(f"{h.get(t, float('nan')):8.3f}" for t in targets) if h else "")
          + f" | {r['train_seconds']} s")
PY
  ;;
  clip)  # would a clipped master range (LWC-style) help? weight-reconstruction error of RTN, no training
    $PY - <<'PY'
import torch
from transformers import AutoModelForCausalLM
from kernels.grid import dequantize, pad_columns, quantize_weight
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained("runs/stories260K-hf", dtype=torch.float32)
factors, err = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7), {}
for name, mod in model.named_modules():
    if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
        w = mod.weight.detach()
        g = pad_columns(w, 32).reshape(w.shape[0], -1, 32)
        for c in factors:  # clip each group's range to c * [min, max], then the format's own grid
            lo, hi = g.amin(-1, keepdim=True) * c, g.amax(-1, keepdim=True) * c
            qw = quantize_weight(torch.maximum(torch.minimum(g, hi), lo).reshape(w.shape[0], -1), 32, 8)
            for b in (8, 4, 3, 2):
                err[c, b] = err.get((c, b), 0) + (dequantize(qw, b)[:, :w.shape[1]] - w).pow(2).sum().item()
ref = sum(p.pow(2).sum().item() for n, p in model.named_parameters() if "proj" in n)
print("relative squared weight error, sum over the decoder's linear layers")
for b in (8, 4, 3, 2):
    print(f"W{b}: " + "  ".join(f"clip {c}: {err[c, b] / ref:.2e}" for c in factors))
PY
  ;;
  *) echo "usage: $0 screen|final|results|clip" >&2; exit 2 ;;
esac
