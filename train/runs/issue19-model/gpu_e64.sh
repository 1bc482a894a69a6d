#!/usr/bin/env bash
# Issue 19's trained 64-expert model (and issue 17's shape sweep beside it) on one GPU, two device calls
# back to back on the same machine (a warm machine keeps W: ignored).
#
#   PHASE=a IN=.i17/law OUT=... D=570 N=6 MS=280 ONLY=ID,... bash train/runs/issue19-model/gpu_e64.sh
#   PHASE=b IN=.i17/law OUT=... D=570 N=10 ONLY=ID,... bash train/runs/issue19-model/gpu_e64.sh
#
# IN: corpus.tar.xz (corpus/{train,heldout}.jsonl), whl/ (tqdm), sweep.jsonl (the logged runs: skipped).
# a: pre-trains config.json beside this script (mobilemoe-mini with 64 experts, top-4) for one epoch of
#    the corpus' training split, cut at MS seconds of training (train.pipeline --stages pretrain,
#    max_seconds: the cosine schedule fitted to the steps that fit), exports it bf16 (W/e64/export),
#    measures its held-out loss (train.evaluate, the whole held-out split) and routing (compiler.routing),
#    tars the export (124 MiB), splits it into 8 equal pieces (W/e64.part-*: 15.5 MiB; a call returns
#    64 MiB at most) and returns the first 4 with info.tgz (sha256.txt); beside it, the sweep (train/runs/issue17/gpu_law.sh, grid corpus50m-shapes, N runs).
# b: returns the other pieces, and runs the sweep on (its cut runs resume from their checkpoints).
# N=0: no sweep (the model alone; phase b then only returns the pieces). RT: seconds for the routing
# statistics (default 60; 0: none).
# OUT: e64.part-* (a: aa-ad, b: the rest), sweep.jsonl, logs.tgz, info.tgz (logs, summary, sha256, routing).
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
PHASE=${PHASE:?a or b}; IN=${IN:-.i17/law}; OUT=${OUT:?}; W=${W:-runs/law}; D=${D:-570}; N=${N:-7}; MS=${MS:-280}
E=$W/e64; TOK=train/runs/issue17/tokenizer-8192.json; HERE=train/runs/issue19-model
mkdir -p "$W" "$OUT" "$E"
if [ "$PHASE" = b ]; then  # the pieces first: they exist only on the machine that ran phase a
  ls "$W"/e64.part-* > /dev/null 2>&1 || echo "NO PIECES on this machine (not the one of phase a)"
  for f in $(ls "$W"/e64.part-* 2>/dev/null | tail -n +5); do cp "$f" "$OUT/"; done
  [ "$N" -gt 0 ] || { cp "$E/sha256.txt" "$OUT/" 2>/dev/null; ls -la "$OUT"; echo "done $(el)s"; exit 0; }
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$IN"/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
STAMP=$(stat -c %s "$IN/corpus.tar.xz")
if [ "$(cat "$W/corpus-stamp" 2>/dev/null)" != "$STAMP" ]; then
  rm -rf "$W/corpus" "$W/runs/cache" && tar -C "$W" -xJf "$IN/corpus.tar.xz" || exit 4
  echo "$STAMP" > "$W/corpus-stamp"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$N" -gt 0 ] && nvidia-cuda-mps-control -d && timeout 30 python3 -c "import torch; assert torch.ones(4, device='cuda').sum().item() == 4"; then
  trap 'echo quit | nvidia-cuda-mps-control' EXIT; echo "MPS on"
else
  echo quit | nvidia-cuda-mps-control 2>/dev/null; echo "MPS off"
fi
echo "setup $(el)s"
LAW=
if [ "$N" -gt 0 ]; then  # N=0: no sweep
  IN=$IN OUT=$W/lawout-$PHASE W=$W D=$(( D - $(el) )) N=$N MPS=0 GRID=corpus50m-shapes ONLY=${ONLY:-} \
    bash train/runs/issue17/gpu_law.sh > "$W/law-$PHASE.txt" 2>&1 &
  LAW=$!
fi
if [ "$PHASE" = a ]; then
  python3 -m train.pipeline --model $HERE/config.json --stages pretrain --out "$E" --corpus "$W/corpus" \
    --sft-data "$W/no-sft" --export "$E/export" --qa-limit 0 --device cuda \
    --set "all.tokenizer=$TOK" --set "all.cache_dir=$W/e64cache" --set all.progress=false --set all.seed=0 \
    --set all.moe_impl=grouped --set pretrain.epochs=1 --set "pretrain.max_seconds=$MS" --set pretrain.seq_len=1024 \
    --set pretrain.batch_size=16 --set pretrain.grad_accum=2 --set pretrain.lr=2e-3 --set pretrain.warmup_steps=30 \
    --set pretrain.schedule=cosine --set pretrain.min_lr_ratio=0.1 --set pretrain.log_every=10 \
    --set pretrain.eval_every=200 --set pretrain.eval_tokens=0 --set pretrain.ckpt_every=100000 > "$E/train.log" 2>&1
  echo "e64 trained rc $? $(el)s"; tail -n 3 "$E/train.log"
  python3 -m train.evaluate --checkpoint "$E/export" --data "$W/corpus/heldout.jsonl" --seq-len 1024 --device cuda \
    --cache-dir "$W/e64cache" > "$E/heldout_export.json" 2> "$E/evaluate.log"; cat "$E/heldout_export.json"
  (cd "$E" && tar cf ../e64-export.tar export) && (cd "$W" && sha256sum e64-export.tar e64/export/* > e64/sha256.txt)
  split -n 8 "$W/e64-export.tar" "$W/e64.part-" && (cd "$W" && sha256sum e64.part-* >> e64/sha256.txt)
  for f in $(ls "$W"/e64.part-* | head -n 4); do cp "$f" "$OUT/"; done
  echo "pieces $(ls "$W"/e64.part-* | wc -l) $(el)s"
  [ "${RT:-60}" -gt 0 ] && OMP_NUM_THREADS=4 timeout ${RT:-60} python3 -m compiler.routing --checkpoint "$E/export" --data "$W/corpus/heldout.jsonl" \
    --out "$E/routing" --max-tokens 65536 > "$E/routing.txt" 2>&1; echo "routing rc $? $(el)s"
fi
[ -n "$LAW" ] && { wait $LAW; echo "sweep done $(el)s"; tail -n 25 "$W/law-$PHASE.txt"; }
cp "$W/lawout-$PHASE/sweep.jsonl" "$W/lawout-$PHASE/logs.tgz" "$OUT/" 2>/dev/null
tar czf "$OUT/info.tgz" "$W"/law-*.txt "$W"/lawout-*/sweep.log $(ls "$E"/*.log "$E"/*.txt "$E"/*.json "$E"/routing/* \
  "$E"/pretrain/summary.json "$E"/pretrain/metrics.jsonl "$E"/pretrain/loss.png "$E"/export/*.json 2>/dev/null)
ls -la "$OUT"; echo "done $(el)s"
