# One device call for issue 17 (README beside): carry [".i17" (corpus.tar.xz), ".whl" (tokenizers, safetensors, torchao, tqdm wheels)].
# Env: R (RUNS), E (EXPORT: runs whose QAT model comes back as models.tar.xz.part-*), X (EXTRA_SETS),
# T (seconds from the start at which training is cut, default 470), D (the call's budget, default 575),
# Q (QA_LIMIT in the pipeline's report, default 0), A (held-out questions for the evals after training, default 300),
# PRE (train/runs/issue17/gmm_check.py: picks all.moe_impl, grouped or dense, from its check).
export PYTHONUNBUFFERED=1; S=$(date +%s); el() { echo $(( $(date +%s)-S )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 3
mkdir -p data && tar -C data -xJf .i17/corpus.tar.xz && python3 -m train.sft_data --corpus data/corpus --out data/sft > $OUT/sft_data.log 2>&1 || { tail $OUT/sft_data.log; exit 4; }
echo "setup $(el)s"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch;print(torch.__version__)"
if [ -n "${PRE:-}" ]; then
  timeout 40 env PYTHONPATH=/tmp/site:$PWD python3 $PRE 2>&1 | tail -7 | tee $OUT/pre.txt
  X="${X:-} all.moe_impl=$(grep -q 'CHOICE grouped' $OUT/pre.txt && echo grouped || echo dense)"; echo "X=$X"
fi
export TIME_LIMIT=$(( ${T:-470} - $(el) )) QA_LIMIT=${Q:-0} RUNS="$R" EXPORT="${E:-}" EXTRA_SETS="${X:-}"
train/issue17_runs.sh /tmp/i17 | tee $OUT/table.md
echo "trained $(el)s"; EV=$(( ${D:-575} - 35 - $(el) ))
for d in /tmp/i17/*/; do  # every run that finished: exact answers (GPU) and multiple choice (CPU), cut at the budget
  [ -d $d/qat/final ] || continue; mkdir -p $d/evals
  for st in sft qat; do
    timeout $EV python3 -m mobilemoe.answer_check --checkpoint $d/$st/final --qa data/sft/heldout_qa.jsonl --limit ${A:-300} --device cuda > $d/evals/exact_$st.json 2>/dev/null &
  done
  timeout $EV python3 -m mobilemoe.answer_check --checkpoint $d/qat/final --qa data/sft/heldout_qa.jsonl --limit ${A:-300} --device cuda --int4 > $d/evals/exact_qat_int4.json 2>/dev/null &
  OMP_NUM_THREADS=2 timeout $EV python3 -m mobilemoe.eval compare $d/pretrain/final $d/midtrain/final $d/sft/final $d/qat/final int4:$d/qat/final \
    --tasks python_modules python_docstrings --json $d/evals/mc.json --markdown $d/evals/mc.md > /dev/null 2>&1 &
done; wait
echo "evaluated $(el)s"; cd /tmp/i17 && tar czf $OUT/reports.tgz $(ls -d */report.json *.log */*/summary.json */*/metrics.jsonl */loss.png */evals 2>/dev/null)
[ -d models ] && tar cf - models | xz -2 -T16 | split -b 15M - $OUT/models.tar.xz.part-; ls -la $OUT; echo "done $(el)s"
