#!/usr/bin/env bash
# Issue 17 on one GPU, one device call: the scaling-law sweep on the new corpus (grid corpus50m, train/scaling/grid.py),
# every run pre-training only, N of them at once, longest first, stopped (resumably) at D seconds.
#
#   IN=/path/with/corpus.tar.xz+whl OUT=... D=560 N=16 bash train/runs/issue17/gpu_law.sh
#
# OUT/sweep.jsonl: one line per finished run (train.scaling sweep's log); OUT/sweep.log: its progress;
# OUT/failed.tgz: the logs of runs that failed. Then, here: python -m train.scaling fit --log OUT/sweep.jsonl
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
IN=${IN:?IN: the folder with corpus.tar.xz and whl/}; OUT=${OUT:?}; D=${D:-560}; N=${N:-16}
W=${W:-/tmp/sc}; mkdir -p "$W" "$OUT"
if [ -d "$IN/whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$IN"/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
mkdir -p data && tar -C data -xJf "$IN/corpus.tar.xz" || exit 4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "setup $(el)s"
python3 -m train.scaling sweep --grid "${GRID:-corpus50m}" --log "$OUT/sweep.jsonl" --work-dir "$W" \
  --corpus data/corpus --tokenizer train/runs/issue17/tokenizer-8192.json --workers "$N" --device "${DEV:-cuda}" \
  --deadline $(( D - 15 - $(el) )) --order longest > "$OUT/sweep.log" 2>&1
echo "sweep rc $? $(el)s"; grep -v "it/s\]\|run/s\]" "$OUT/sweep.log" | tail -n 20
cd "$W" && tar czf "$OUT/logs.tgz" $(ls -d */log.txt */summary.json 2>/dev/null); ls -la "$OUT"; echo "done $(el)s"
