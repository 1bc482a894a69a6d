#!/usr/bin/env bash
# Issue 17 on one GPU: MoE vs its dense twin at equal active parameters, one epoch of the ~52M-token
# corpus, all four stages (pretrain -> midtrain -> sft -> qat), for each SIZE and SEED; or (BUNDLED=1) the
# candidate bundled model alone (mobilemoe-small, ~45M params, bf16 ~90 MB), exported to OUT/default-model.
#
#   train/issue17_runs.sh OUT [sizes] [seeds]      e.g. train/issue17_runs.sh runs/i17 "mini 50m" "0 1"
#   BUNDLED=1 train/issue17_runs.sh OUT            the bundled-model run only
#   RUNS="mobilemoe-mini:0 mobilemoe-mini-dense:0" EXPORT="mobilemoe-mini:0" train/issue17_runs.sh OUT
#                                                   these runs side by side, those in EXPORT exported to OUT/models/
# Inside a fixed slot, give each stage a wall-clock budget: EXTRA_SETS="pretrain.max_seconds=220 ..."
# (train.loop times steps 5-25 and fixes the stage's length, so the schedule still ends where it should).
#
# Needs data/corpus (python -m train.corpus) and data/sft (python -m train.sft_data); set CORPUS/SFT
# to use others, TOKENIZER for another tokenizer.json (default: train/runs/issue17/tokenizer-8192.json).
# The MoE and the dense twin of one size and seed train at the same time on the GPU.
# Pre-training: epochs=1 (each token seen once); mid-training anneals on 5M tokens of the quality
# subset (a ~9% second look at data already seen); SFT one epoch of data/sft/train.jsonl; QAT 2M tokens.
# Every stage checkpoints every 200 steps; rerun the same command with RESUME=1 after an interruption.
# TIME_LIMIT (seconds, default 0 = none) stops each pipeline with SIGINT, e.g. inside a 10-minute slot.
set -u
OUT=${1:?usage: train/issue17_runs.sh OUT [sizes] [seeds]}
SIZES=${2:-mini 50m}
SEEDS=${3:-0}
PY=${PYTHON:-python3}
CORPUS=${CORPUS:-data/corpus}
SFT=${SFT:-data/sft}
TOKENIZER=${TOKENIZER:-train/runs/issue17/tokenizer-8192.json}  # BPE 8192 retrained on the new corpus
QA_LIMIT=${QA_LIMIT:-500}  # held-out questions for the exact-answer check
LIMIT=${TIME_LIMIT:-0}
mkdir -p "$OUT"

SETS=(all.progress=false all.log_every=20 all.eval_every=200 all.ckpt_every=200 all.eval_tokens=500000
      all.batch_size=32 all.seq_len=1024
      pretrain.epochs=1 pretrain.warmup_steps=200 pretrain.schedule=cosine pretrain.min_lr_ratio=0.1
      midtrain.epochs=0 midtrain.max_tokens=5000000 midtrain.warmup_steps=10
      sft.seq_len=512 sft.epochs=1 sft.lr=5e-4
      qat.seq_len=512 qat.epochs=0 qat.max_tokens=2000000 qat.lr=1e-4 qat.warmup_steps=10
      ${EXTRA_SETS:-})  # EXTRA_SETS="all.max_steps=5 ...": a quick check of this script

lr_of() {  # peak pre-training LR by size (smaller models take larger steps)
  case "$1" in mini*) echo 2e-3 ;; *) echo 1e-3 ;; esac
}

run() {  # run MODEL SEED DIR [extra args...]
  local model=$1 seed=$2 dir=$3; shift 3
  local a=(--model "$model" --out "$dir" --corpus "$CORPUS" --sft-data "$SFT" --qa-limit "$QA_LIMIT"
           --set "all.tokenizer=$TOKENIZER"
           --set "all.seed=$seed" --set "pretrain.lr=$(lr_of "$model")" --set "midtrain.lr=$(lr_of "$model")")
  for s in "${SETS[@]}"; do a+=(--set "$s"); done
  [ "${RESUME:-0}" = 1 ] && a+=(--resume)
  if [ "$LIMIT" -gt 0 ]; then
    OMP_NUM_THREADS=2 timeout -s INT "$LIMIT" "$PY" -m train.pipeline "${a[@]}" "$@" > "$dir.log" 2>&1
  else
    OMP_NUM_THREADS=2 "$PY" -m train.pipeline "${a[@]}" "$@" > "$dir.log" 2>&1
  fi
}

if [ -n "${RUNS:-}" ]; then  # RUNS="mobilemoe-mini:0 mobilemoe-mini-dense:0 ...": all at once on one GPU
  for r in $RUNS; do
    model=${r%%:*} seed=${r##*:}
    if [[ " ${EXPORT:-} " == *" $r "* ]]; then  # EXPORT="MODEL:SEED ...": those runs' QAT models (bf16) to OUT/models/
      run "$model" "$seed" "$OUT/$model-s$seed" --export "$OUT/models/$model-s$seed" &
    else
      run "$model" "$seed" "$OUT/$model-s$seed" &
    fi
  done
  wait
elif [ "${BUNDLED:-0}" = 1 ]; then
  run mobilemoe-small 0 "$OUT/mobilemoe-small-s0" --export "$OUT/default-model"
  echo "bundled candidate: $OUT/default-model ($(du -sh "$OUT/default-model" | cut -f1))"
  exit 0
else
  for size in $SIZES; do
    moe=mobilemoe-$size
    case "$size" in 50m) dense=mobilemoe-small-dense ;; *) dense=mobilemoe-$size-dense ;; esac
    for seed in $SEEDS; do
      run "$moe" "$seed" "$OUT/$moe-s$seed" &
      run "$dense" "$seed" "$OUT/$dense-s$seed" &
      wait
    done
  done
fi

# one table: held-out text loss after each stage, INT4 chat loss, exact answers (float and INT4)
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
rows = []
for rep in sorted(Path(sys.argv[1]).glob("*/report.json")):
    r = json.loads(rep.read_text())
    t, c, ex = r["heldout_text"], r["heldout_chat"], r.get("exact_answers", {})
    rows.append(f"| {rep.parent.name} | {t['pretrain']:.3f} | {t['midtrain']:.3f} | {t['sft']:.3f} | "
                f"{t['qat_int4']:.3f} | {c['qat_int4']:.3f} | {ex.get('sft', {}).get('rate', float('nan')):.3f} | "
                f"{ex.get('qat_int4', {}).get('rate', float('nan')):.3f} |")
print("| run | text pretrain | text midtrain | text sft | text qat INT4 | chat qat INT4 | exact sft | exact qat INT4 |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
print("\n".join(rows))
EOF
