#!/usr/bin/env bash
# Issue 17 on one GPU, one device call: MoE vs dense twins at EQUAL pre-training tokens, all runs side by side.
#
#   R="mini/mobilemoe-mini:0 mini/mobilemoe-mini-dense:0 50m/mobilemoe-50m:0 50m/mobilemoe-small-dense:0 ..." \
#   S=250 D=570 Q=300 IN=/path/with/corpus.tar.xz+whl OUT=... bash train/runs/issue17/gpu_pairs.sh
#
# From a checkout of this branch (the cwd), IN holding corpus.tar.xz (data/corpus/{train,heldout}.jsonl) and
# whl/ (tokenizers, safetensors, torchao, tqdm wheels for the device's Python). Steps, timed from the start:
#  1. wheels, corpus, SFT data (train.sft_data), every stage's data tokenized once into one shared cache
#     (train.pipeline --prepare-data; the chat data goes on during 2); meanwhile gmm_check.py picks each
#     MoE's impl (grouped or dense).
#  2. calibration: every run at once for 30 pre-training steps; equal_tokens.py gives each GROUP the tokens
#     its slowest run (the MoE) trains in S seconds at that shared rate.
#  3. the real runs, all at once, all four stages; pre-training capped at the group's tokens (max_tokens:
#     the MoE and its twin see the same tokens, the cosine schedule fitted to them), mid-training, SFT and
#     QAT at fixed token budgets (M, F, Z); report.json with held-out losses and exact answers (Q questions).
#  4. multiple choice (python_modules, python_docstrings, 100 each) after every stage, on the GPU.
# Everything that finished by D seconds goes to OUT/reports.tgz, with a table (OUT/table.md).
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
IN=${IN:?IN: the folder with corpus.tar.xz and whl/}; OUT=${OUT:?}; R=${R:?R: GROUP/MODEL:SEED ...}
S=${S:-230}; D=${D:-570}; Q=${Q:-300}; M=${M:-1000000}; F=${F:-1500000}; Z=${Z:-500000}
CAL=${CAL:-30}; STEP=${STEP:-32768}; MCL=${MCL:-100}; DEV=${DEV:-cuda}  # a quick CPU check: smaller ones
W=${W:-/tmp/i17}; CACHE=$W/cache; TOK=train/runs/issue17/tokenizer-8192.json
rm -rf "$W/cal" "$W/runs"; mkdir -p "$W" "$OUT"  # a warm machine keeps /tmp: earlier runs would refuse to start
if [ -d "$IN/whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$IN"/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
mkdir -p data && tar -C data -xJf "$IN/corpus.tar.xz" || exit 4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch; print(torch.__version__)"

SETS=(all.progress=false all.log_every=10 all.eval_every=100 all.ckpt_every=1000000 all.eval_tokens=200000
      all.batch_size=16 all.grad_accum=2 all.seq_len=1024 "all.tokenizer=$TOK" "all.cache_dir=$CACHE"
      pretrain.epochs=0 pretrain.warmup_steps=30 pretrain.schedule=cosine pretrain.min_lr_ratio=0.1
      midtrain.epochs=0 midtrain.max_tokens=$M midtrain.warmup_steps=10
      sft.seq_len=512 sft.epochs=0 sft.max_tokens=$F sft.lr=5e-4
      qat.seq_len=512 qat.epochs=0 qat.max_tokens=$Z qat.lr=1e-4 qat.warmup_steps=10
      midtrain.max_seconds=50 sft.max_seconds=60 qat.max_seconds=35 ${X:-})  # guards: rarely reached
args() {  # args MODEL SEED OUTDIR: the pipeline's arguments for one run
  local lr=1e-3; case "$1" in *mini*) lr=2e-3 ;; esac
  local a=(--model "$1" --out "$3" --corpus data/corpus --sft-data data/sft --set "all.seed=$2"
           --set "pretrain.lr=$lr" --set "midtrain.lr=$lr")
  for s in "${SETS[@]}"; do a+=(--set "$s"); done
  case "$1" in  # each MoE with the impl its check picked (batches of 32 in two micro-batches of 16: memory)
    mobilemoe-50m) a+=(--set "all.moe_impl=${IMPL_50M:-dense}") ;;
    mobilemoe-mini) a+=(--set "all.moe_impl=${IMPL_MINI:-dense}") ;;
  esac
  echo "${a[@]}"
}

# 1. data (CPU) while the GPU checks the MoE impls
( python3 -m train.sft_data --corpus data/corpus --out data/sft > "$OUT/prep.log" 2>&1 &&
  python3 -m train.pipeline $(args mobilemoe-mini 0 "$W/prep") --stages sft,qat --set pretrain.max_tokens=1 --prepare-data >> "$OUT/prep.log" 2>&1 ) &
PS=$!
python3 -m train.pipeline $(args mobilemoe-mini 0 "$W/prep") --stages pretrain,midtrain --set pretrain.max_tokens=1 --prepare-data > "$OUT/prep_text.log" 2>&1 &
PT=$!
for m in mobilemoe-mini mobilemoe-50m; do
  MODEL=$m timeout 60 python3 train/runs/issue17/gmm_check.py > "$OUT/gmm_$m.txt" 2>&1
done
grep -q "CHOICE grouped" "$OUT/gmm_mobilemoe-mini.txt" && export IMPL_MINI=grouped
grep -q "CHOICE grouped" "$OUT/gmm_mobilemoe-50m.txt" && export IMPL_50M=grouped
wait $PT || { tail "$OUT/prep_text.log"; exit 5; }
echo "text data ready $(el)s; impl mini ${IMPL_MINI:-dense}, 50m ${IMPL_50M:-dense}"

# 2. calibration: all runs at once, CAL (30) steps
mkdir -p "$W/cal" "$W/runs"; CP=()
for r in $R; do
  run=${r#*/}; model=${run%%:*} seed=${run##*:}
  timeout 120 python3 -m train.pipeline $(args "$model" "$seed" "$W/cal/$model-s$seed") --stages pretrain \
    --set pretrain.max_steps=$CAL --set "pretrain.eval_tokens=${CALE:-32768}" --set pretrain.log_every=5 > "$W/cal/$model-s$seed.log" 2>&1 &
  CP+=($!)
done
wait "${CP[@]}"
BUDGET=$(python3 train/runs/issue17/equal_tokens.py "$W/cal" "$S" "$STEP" $(for r in $R; do g=${r%%/*}; run=${r#*/}; echo "$g/${run%%:*}-s${run##*:}"; done)) \
  || { tail -n 30 "$W"/cal/*.log; exit 7; }
echo "$BUDGET" | tee "$OUT/budget.txt" "$W/budget.txt"; echo "calibrated $(el)s"
wait $PS || { tail "$OUT/prep.log"; exit 6; }
echo "chat data ready $(el)s"

# 3. the real runs, all at once, cut (SIGINT) at D - 75 s
LIMIT=$(( D - 75 - $(el) ))
for r in $R; do
  group=${r%%/*} run=${r#*/}; model=${run%%:*} seed=${run##*:}
  tokens=$(echo "$BUDGET" | awk -v g="$group" '$1 == g {print $2}')
  timeout -s INT $LIMIT python3 -m train.pipeline $(args "$model" "$seed" "$W/runs/$model-s$seed") \
    --set "pretrain.max_tokens=$tokens" --qa-limit "$Q" > "$W/runs/$model-s$seed.log" 2>&1 &
done
wait; echo "trained $(el)s"

# 4. multiple choice after every stage (GPU), cut at D - 15 s
EV=$(( D - 15 - $(el) ))
for d in "$W"/runs/*/; do
  [ -d "$d/qat/final" ] || continue
  timeout $EV python3 -m mobilemoe.eval compare "$d"/pretrain/final "$d"/midtrain/final "$d"/sft/final "$d"/qat/final \
    "int4:$d/qat/final" --tasks python_modules python_docstrings --limit $MCL --device $DEV \
    --json "$d/mc.json" --markdown "$d/mc.md" > "$d/mc.log" 2>&1 &
done
wait; echo "evaluated $(el)s"
python3 train/runs/issue17/pairs_table.py "$W/runs" | tee "$OUT/table.md"
cd "$W" && tar czf "$OUT/reports.tgz" $(ls -d budget.txt runs/*.log runs/*/report.json runs/*/mc.* \
  runs/*/*/summary.json runs/*/*/metrics.jsonl runs/*/loss.png cal/*/pretrain/metrics.jsonl cal/*.log 2>/dev/null)
ls -la "$OUT"; echo "done $(el)s"
