#!/usr/bin/env bash
# Issue 17 on one GPU, one device call: MoE vs dense twins at EQUAL pre-training tokens, all runs side by
# side, all four stages, and after EACH stage: held-out loss, exact answers, multiple choice.
#
#   R="mobilemoe-mini:0 mobilemoe-mini-dense:0 mobilemoe-mini:1 mobilemoe-mini-dense:1" \
#   D=585 POST=170 Q=300 IN=.i17/dev OUT=... bash train/runs/issue17/gpu_pairs.sh
#
# From a checkout of this branch (the cwd); IN holds corpus.tar.xz (corpus/{train,heldout}.jsonl) and
# optionally whl/ (wheels for the device's Python). R: the runs (MODEL:SEED), all of one budget (one
# size per call: its MoE and its dense twin). Steps, timed from the start (D: the whole call, seconds):
#  1. corpus (kept on a warm machine), SFT data (train.sft_data), every stage's data tokenized once into
#     one shared cache (train.pipeline --prepare-data), the corpus-domain multiple-choice task (qa_mc.py).
#  2. the real runs, all at once, all four stages. Pre-training runs at most one epoch (pretrain.epochs=1:
#     no token seen twice) and stops at the end of its warmup until equal_tokens.py (watch) has timed
#     every run over steps 5-15, all training side by side, and written the tokens the slowest run (the
#     MoE) trains by D - POST (pretrain.budget_file): every run trains exactly those tokens, on the same
#     cosine schedule. Mid-training, SFT and QAT at fixed token budgets (M, F, Z); the report
#     (report.json: held-out text loss of every stage, chat loss of sft and qat, float and INT4).
#  3. beside each run, as soon as a stage's final/ is saved: exact answers (Q held-out questions, greedy,
#     mobilemoe.answer_check; INT4 too after QAT) and multiple choice (python_modules,
#     python_docstrings, docs_qa: MCL questions each) of that stage's model, on the GPU.
# Everything is cut at D - 12 s; what finished goes to OUT/reports.tgz, with OUT/table.md (pairs_table.py).
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
IN=${IN:?IN: the folder with corpus.tar.xz}; OUT=${OUT:?}; R=${R:?R: MODEL:SEED ...}
D=${D:-585}; POST=${POST:-170}; Q=${Q:-300}; M=${M:-1000000}; F=${F:-1500000}; Z=${Z:-500000}
STEP=${STEP:-32768}; MCL=${MCL:-200}; DEV=${DEV:-cuda}; WARM=${WARM:-30}; AT=${AT:-15}
W=${W:-/tmp/i17}; CACHE=$W/cache; TOK=train/runs/issue17/tokenizer-8192.json
rm -rf "$W/runs" "$W/budget.tokens"; mkdir -p "$W/runs" "$OUT"  # a warm machine keeps /tmp (and the cache)
if [ -d "$IN/whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$IN"/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
STAMP=$(stat -c %s "$IN/corpus.tar.xz")
if [ "$(cat data/.corpus-stamp 2>/dev/null)" != "$STAMP" ]; then  # a warm machine keeps data/ (ignored)
  rm -rf data/corpus data/sft && mkdir -p data && tar -C data -xJf "$IN/corpus.tar.xz" || exit 4
  echo "$STAMP" > data/.corpus-stamp
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch; print(torch.__version__)"

SETS=(all.progress=false all.log_every=5 all.eval_every=100 all.ckpt_every=1000000 all.eval_tokens=200000
      all.batch_size=16 all.grad_accum=2 all.seq_len=1024 "all.tokenizer=$TOK" "all.cache_dir=$CACHE"
      all.moe_impl=${IMPL:-grouped}
      pretrain.epochs=1 pretrain.warmup_steps=$WARM pretrain.schedule=cosine pretrain.min_lr_ratio=0.1
      "pretrain.budget_file=$W/budget.tokens" pretrain.budget_wait_s=240
      midtrain.epochs=0 midtrain.max_tokens=$M midtrain.warmup_steps=10
      sft.seq_len=512 sft.epochs=0 sft.max_tokens=$F sft.lr=5e-4
      qat.seq_len=512 qat.epochs=0 qat.max_tokens=$Z qat.lr=1e-4 qat.warmup_steps=10 ${X:-})
args() {  # args MODEL SEED OUTDIR: the pipeline's arguments for one run
  local lr=1e-3; case "$1" in *mini*) lr=2e-3 ;; esac
  local a=(--model "$1" --out "$3" --corpus data/corpus --sft-data data/sft --set "all.seed=$2"
           --set "pretrain.lr=$lr" --set "midtrain.lr=$lr")
  for s in "${SETS[@]}"; do a+=(--set "$s"); done
  echo "${a[@]}"
}

# 1. data: SFT pairs, the shared token cache (text while the SFT pairs are built, then chat), the
#    multiple-choice task of the corpus (the chat cache is finished long before a run reaches SFT)
python3 -m train.pipeline $(args mobilemoe-mini 0 "$W/prep") --stages pretrain,midtrain --prepare-data > "$OUT/prep_text.log" 2>&1 &
PT=$!
[ -f data/sft/heldout_qa.jsonl ] || python3 -m train.sft_data --corpus data/corpus --out data/sft > "$OUT/prep.log" 2>&1 \
  || { tail "$OUT/prep.log"; exit 5; }
python3 train/runs/issue17/qa_mc.py data/sft/heldout_qa.jsonl "$W/docs_qa.jsonl" --n "$MCL" 2>> "$OUT/prep.log"
python3 -m train.pipeline $(args mobilemoe-mini 0 "$W/prep") --stages sft,qat --prepare-data >> "$OUT/prep.log" 2>&1 &
PS=$!
wait $PT || { tail "$OUT/prep_text.log"; exit 6; }
echo "data ready $(el)s"

# 2. the real runs, all at once; the watcher writes their common pre-training budget
left() { echo $(( D - 12 - $(el) )); }
cut() { local t; t=$(left); [ "$t" -gt 3 ] && timeout -s INT "$t" "$@"; }  # cut at D - 12 s (none past it)
evals() {  # evals RUN_DIR PID: exact answers and multiple choice of each stage as soon as it is saved
  local d=$1 pid=$2 st
  for st in pretrain midtrain sft qat; do
    while [ ! -f "$d/$st/summary.json" ]; do kill -0 "$pid" 2>/dev/null || return; sleep 2; done
    if [ "$st" = qat ]; then
      cut python3 -m mobilemoe.answer_check --checkpoint "$d/qat/final" --qa data/sft/heldout_qa.jsonl \
        --limit "$Q" --device "$DEV" --int4 > "$d/exact_qat_int4.json" 2>> "$d/evals.log"
    fi
    cut python3 -m mobilemoe.answer_check --checkpoint "$d/$st/final" --qa data/sft/heldout_qa.jsonl \
      --limit "$Q" --device "$DEV" > "$d/exact_$st.json" 2>> "$d/evals.log"
    cut python3 -m mobilemoe.eval --checkpoint "$d/$st/final" --tasks python_modules python_docstrings \
      "$W/docs_qa.jsonl" --limit "$MCL" --device "$DEV" --json "$d/mc_$st.json" > /dev/null 2>> "$d/evals.log"
    echo "$st evaluated $(el)s" >> "$d/evals.log"
  done
}
LIMIT=$(left); DIRS=(); JOBS=()
for r in $R; do
  model=${r%%:*} seed=${r##*:}; d="$W/runs/$model-s$seed"; DIRS+=("$d")
  timeout -s INT $LIMIT python3 -m train.pipeline $(args "$model" "$seed" "$d") --qa-limit 0 > "$d.log" 2>&1 &
  pid=$!; JOBS+=($pid)
  ( evals "$d" "$pid" ) &
  JOBS+=($!)
done
python3 train/runs/issue17/equal_tokens.py watch "$W/budget.tokens" $(( T0 + D - POST )) "$STEP" "${DIRS[@]}" --at "$AT" --safety "${SAFETY:-0.9}" \
  2>&1 | tee "$OUT/budget.txt"
echo "budget set $(el)s"
wait $PS || tail "$OUT/prep.log"
wait "${JOBS[@]}"
echo "finished $(el)s"
python3 train/runs/issue17/pairs_table.py "$W/runs" > "$OUT/table.md" 2>&1; cat "$OUT/table.md"
cd "$W" && tar czf "$OUT/reports.tgz" $(ls -d budget.tokens docs_qa.jsonl runs/*.log runs/*/report.json runs/*/exact_*.json \
  runs/*/mc_*.json runs/*/evals.log runs/*/*/summary.json runs/*/*/metrics.jsonl runs/*/loss.png 2>/dev/null)
ls -la "$OUT"; echo "done $(el)s"
