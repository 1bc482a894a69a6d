# One device call for issue 17 (README beside): carry [".i17" (corpus.tar.xz), ".whl" (tokenizers, safetensors, torchao, tqdm wheels)].
# Env: R (RUNS), E (EXPORT), X (EXTRA_SETS), D (seconds for the pipelines, default 575), Q (QA_LIMIT), PRE (a check script).
export PYTHONUNBUFFERED=1; S=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 3
mkdir -p data && tar -C data -xJf .i17/corpus.tar.xz && python3 -m train.sft_data --corpus data/corpus --out data/sft > $OUT/sft_data.log 2>&1 || { tail $OUT/sft_data.log; exit 4; }
echo "setup $(( $(date +%s)-S ))s"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch;print(torch.__version__)"
[ -n "${PRE:-}" ] && { timeout 25 env PYTHONPATH=/tmp/site:$PWD python3 $PRE 2>&1 | tail -6 | tee $OUT/pre.txt; }
export TIME_LIMIT=$(( ${D:-575} - ($(date +%s)-S) )) QA_LIMIT=${Q:-250} RUNS="$R" EXPORT="$E" EXTRA_SETS="$X"
train/issue17_runs.sh /tmp/i17 | tee $OUT/table.md
echo "done $(( $(date +%s)-S ))s"; cd /tmp/i17 && tar czf $OUT/reports.tgz $(ls -d */report.json *.log */*/summary.json */*/metrics.jsonl */loss.png 2>/dev/null)
[ -d default-model ] && tar cf - default-model | split -b 15M - $OUT/model.tar.part-; ls -la $OUT
