#!/usr/bin/env bash
# The bundled default model: mobilemoe-tiny through all four stages, and its dense twin
# (mobilemoe-tiny-dense, same active parameters) on the same tokens, for each pre-training length
# in EPOCHS (passes over the corpus), all at once on one GPU. The MoE run whose INT4 model has the
# lowest held-out loss (text + chat) is exported as bf16 to OUT/default-model.
#
#   train/default_model.sh OUT [EPOCHS...]        e.g. train/default_model.sh runs/default 4 12
#
# Needs data/corpus (python -m train.corpus). Every run ends by TIME_LIMIT seconds (default 440).
set -u
OUT=${1:?usage: train/default_model.sh OUT [EPOCHS...]}
shift
EPOCHS=${*:-8}
PY=${PYTHON:-python3}
LIMIT=${TIME_LIMIT:-440}
mkdir -p "$OUT"

# moe_impl=dense: every expert on every token, combined by the routing weights; equal results
# (tests/test_model.py), and for 16 experts of width 96 far fewer kernel launches than "grouped".
SETS=(all.moe_impl=dense all.progress=false all.log_every=10 all.eval_every=100 all.ckpt_every=500
      all.batch_size=32 all.lr=2e-3
      pretrain.seq_len=1024 pretrain.max_tokens=0 pretrain.warmup_steps=100
      midtrain.seq_len=1024 midtrain.epochs=1 midtrain.batch_size=16 midtrain.warmup_steps=10
      sft.seq_len=512 sft.epochs=2 sft.lr=1e-3
      qat.seq_len=512 qat.epochs=1 qat.lr=1e-4 qat.warmup_steps=10
      ${EXTRA_SETS:-})  # EXTRA_SETS="all.max_steps=2 ...": a quick check of this script

args() {  # args MODEL EPOCHS
  local a=(--model "$1" --out "$OUT/$1-e$2" --set "pretrain.epochs=$2")
  for s in "${SETS[@]}"; do a+=(--set "$s"); done
  printf '%s\n' "${a[@]}"
}

for e in $EPOCHS; do
  for m in mobilemoe-tiny mobilemoe-tiny-dense; do
    mapfile -t a < <(args "$m" "$e")
    OMP_NUM_THREADS=2 timeout -s INT "$LIMIT" "$PY" -m train.pipeline "${a[@]}" > "$OUT/$m-e$e.log" 2>&1 &
  done
done
wait

best=$("$PY" - "$OUT" $EPOCHS <<'EOF'
import json, sys
from pathlib import Path
out, scores = Path(sys.argv[1]), {}
for e in sys.argv[2:]:
    rep = out / f"mobilemoe-tiny-e{e}" / "report.json"
    if rep.is_file():
        r = json.loads(rep.read_text())
        scores[e] = r["heldout_text"]["qat_int4"] + r["heldout_chat"]["qat_int4"]
print(min(scores, key=scores.get) if scores else "")
EOF
)
if [ -z "$best" ]; then echo "no MoE run finished" >&2; exit 1; fi
echo "best pre-training length: $best epochs" | tee "$OUT/best.txt"
mapfile -t a < <(args mobilemoe-tiny "$best")
"$PY" -m train.pipeline "${a[@]}" --resume --export "$OUT/default-model" \
    --compare-with "$OUT/mobilemoe-tiny-dense-e$best" 2>&1 | tee "$OUT/export.log"
