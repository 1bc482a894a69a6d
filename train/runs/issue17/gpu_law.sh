#!/usr/bin/env bash
# Issue 17 on one GPU, one device call: the scaling-law sweep on the new corpus (GRID, default corpus50m,
# train/scaling/grid.py), every run pre-training only, N of them at once, longest first, stopped (resumably)
# at D seconds.
#
#   IN=/path/with/corpus.tar.xz OUT=... D=560 N=16 [GRID=corpus50m-long] [ONLY=ID,ID,...] [MPS=1] bash train/runs/issue17/gpu_law.sh
#
# IN: corpus.tar.xz (corpus/{train,heldout}.jsonl), optionally whl/ (wheels for the device's Python) and
# sweep.jsonl (runs already logged: skipped). W, the work dir (default runs/law: ignored, so a warm machine
# keeps it), holds the token cache, the runs' checkpoints and the sweep log, so the next call on the same
# machine resumes runs cut at the deadline from their last checkpoint (every 100 steps); on a fresh machine
# the log is seeded from IN/sweep.jsonl. MPS=1 starts the CUDA MPS daemon (kernels of the N processes run
# side by side instead of time-sliced) if a CUDA client can start under it within 30 s, else runs without;
# it is stopped on exit.
# OUT/sweep.jsonl: one line per finished run (train.scaling sweep's log, copied every 20 s and at the end);
# OUT/sweep.log: its progress; OUT/logs.tgz: every run's log and metrics. Then, here:
# python -m train.scaling fit --log OUT/sweep.jsonl
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
IN=${IN:?IN: the folder with corpus.tar.xz}; OUT=${OUT:?}; D=${D:-560}; N=${N:-16}
W=${W:-runs/law}; mkdir -p "$W" "$OUT"
if [ -d "$IN/whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$IN"/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
STAMP=$(stat -c %s "$IN/corpus.tar.xz")
if [ "$(cat "$W/corpus-stamp" 2>/dev/null)" != "$STAMP" ]; then  # a warm machine keeps W
  rm -rf "$W/corpus" "$W/runs/cache" && tar -C "$W" -xJf "$IN/corpus.tar.xz" || exit 4
  echo "$STAMP" > "$W/corpus-stamp"
fi
if [ ! -s "$W/sweep.jsonl" ] && [ -f "$IN/sweep.jsonl" ]; then cp "$IN/sweep.jsonl" "$W/sweep.jsonl"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${MPS:-0}" = 1 ]; then
  if nvidia-cuda-mps-control -d && timeout 30 python3 -c "import torch; assert torch.ones(4, device='cuda').sum().item() == 4"; then
    trap 'echo quit | nvidia-cuda-mps-control' EXIT; echo "MPS on"
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null; echo "MPS off (the daemon or a client under it failed)"
  fi
fi
echo "setup $(el)s"
( while sleep 20; do cp "$W/sweep.jsonl" "$OUT/sweep.jsonl.tmp" 2>/dev/null && mv "$OUT/sweep.jsonl.tmp" "$OUT/sweep.jsonl"; done ) &
COPIER=$!
python3 -m train.scaling sweep --grid "${GRID:-corpus50m}" --log "$W/sweep.jsonl" --work-dir "$W/runs" \
  --corpus "$W/corpus" --tokenizer train/runs/issue17/tokenizer-8192.json --workers "$N" --device "${DEV:-cuda}" \
  --deadline $(( D - 25 - $(el) )) --order longest ${ONLY:+--only "$ONLY"} > "$OUT/sweep.log" 2>&1
echo "sweep rc $? $(el)s"; kill $COPIER 2>/dev/null
cp "$W/sweep.jsonl" "$OUT/sweep.jsonl"
grep -v "it/s\]\|run/s\]" "$OUT/sweep.log" | tail -n 20
(cd "$W/runs" && tar czf "$OUT/logs.tgz" $(ls -d */log.txt */summary.json */metrics.jsonl 2>/dev/null))
ls -la "$OUT"; echo "done $(el)s"
