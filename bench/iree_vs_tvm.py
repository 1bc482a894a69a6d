"""Prefill and decode tokens/s: the IREE module of the MLIR artifact vs the host TVM artifact, one run.

    python -m bench.iree_vs_tvm                          # the bundled default model (if present)
    python -m bench.iree_vs_tvm --checkpoint DIR
    python -m bench.iree_vs_tvm --preset test-moe        # preset shapes, random weights
    python -m bench.iree_vs_tvm --mlir DIR --tvm DIR     # reuse built artifacts (one TVM artifact)
    python -m bench.iree_vs_tvm --tvm-quant none         # only the like-for-like float32 TVM build

Builds, from the same checkpoint: the MLIR artifact (compiler.build --target mlir: torch-mlir ->
linalg -> IREE llvm-cpu for this CPU, float32 weights) and host TVM artifacts for each --tvm-quant
(default: "none" = float32, the like-for-like baseline, and "int4", what `make demo` ships). For
--preset all draw the same random weights (compiler.params.RandomWeights under the TVM names).
Prints tok/s of each and IREE / TVM for prefill (prompt lengths) and decode (tokens generated after
a prompt of --context), each the median of --repeats runs after a warm-up (bench/decode.py's
measure), and the max logit difference IREE vs TVM float32 on a teacher-forced random token stream.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.measure import add_measure_args, conditions, measure, set_threads
from bench.ort_vs_tvm import timed_build
from compiler.build import build
from mobilemoe.artifact import read_manifest
from mobilemoe.generate import DEFAULT_MODEL_DIR
from mobilemoe.runtimes import load_artifact


def max_logit_difference(a, b, vocab: int, n: int = 48) -> float:
    """Teacher-forced: one prefill of n/2 random tokens, then n/2 decode steps, on both runtimes."""
    ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    la, kv_a = a.step(ids[: n // 2], None)
    lb, kv_b = b.step(ids[: n // 2], None)
    diff = [np.abs(la - lb).max()]
    for t in ids[n // 2:]:
        la, kv_a = a.step([t], kv_a)
        lb, kv_b = b.step([t], kv_b)
        diff.append(np.abs(la - lb).max())
    return float(max(diff))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--preset", default=None, help="preset shapes with random weights (default when no model)")
    p.add_argument("--mlir", type=Path, default=None, help="reuse a built MLIR artifact")
    p.add_argument("--tvm", type=Path, default=None, help="reuse a built host TVM artifact (instead of --tvm-quant)")
    p.add_argument("--tvm-quant", default="none,int4", help="TVM host builds to compare against")
    add_measure_args(p)
    a = p.parse_args(argv)
    threads = set_threads(a)

    checkpoint = a.checkpoint
    if a.preset is None and checkpoint is None:
        if DEFAULT_MODEL_DIR.is_dir():
            checkpoint = DEFAULT_MODEL_DIR
        else:
            a.preset = "test-moe"
            print(f"no {DEFAULT_MODEL_DIR}: using --preset {a.preset} (random weights)", file=sys.stderr)
    label = f"{a.preset} (random weights)" if a.preset else str(checkpoint)
    work = Path(tempfile.mkdtemp(prefix="bench-iree-"))
    mlir_dir = a.mlir or timed_build("MLIR/IREE", lambda: build(checkpoint, "mlir", work / "mlir", preset=a.preset,
                                                                iree_targets=("host",), verbose=False))
    if a.tvm:
        tvm_dirs = {"int4" if read_manifest(a.tvm).get("quantization") else "none": a.tvm}
    else:
        tvm_dirs = {q: timed_build(f"TVM host ({q})", lambda q=q: build(checkpoint, "host", work / f"host-{q}", quant=q,
                                                                         preset=a.preset, verbose=False))
                    for q in a.tvm_quant.split(",")}
    t0 = time.perf_counter()
    iree_rt = load_artifact(mlir_dir, num_threads=threads)
    print(f"IREE module loaded in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    tvm_rts = {q: load_artifact(d, num_threads=threads) for q, d in tvm_dirs.items()}

    cfg = iree_rt.config
    args = (cfg.vocab_size, [int(x) for x in a.prompt_lens.split(",")], a.context, a.decode_tokens, a.repeats)
    results = {"iree": measure(iree_rt.step, *args)}
    results.update({f"tvm-{q}": measure(rt.step, *args) for q, rt in tvm_rts.items()})
    diff = max_logit_difference(iree_rt, tvm_rts["none"], cfg.vocab_size) if "none" in tvm_rts else None

    cols = list(results)
    print(f"model: {label}; {conditions(threads, a.repeats)}; IREE llvm-cpu float32 vs TVM host "
          f"({', '.join('float32' if q == 'none' else q.upper() for q in tvm_rts)})")
    head = "".join(f"{c + ' tok/s':>16}" for c in cols) + "".join(f"{'IREE/' + c[4:]:>12}" for c in cols[1:])
    print(f"{'phase':<20}{head}")
    for phase in ("prefill", "decode"):
        for n in results["iree"][phase]:
            name = f"{phase} {'prompt' if phase == 'prefill' else 'ctx'} {n}"
            vals = [results[c][phase][n] for c in cols]
            ratios = "".join(f"{vals[0] / v:>11.2f}x" for v in vals[1:])
            print(f"{name:<20}{''.join(f'{v:>16.1f}' for v in vals)}{ratios}")
    if diff is not None:
        print(f"max logit difference IREE vs TVM float32 (teacher-forced, random tokens): {diff:.2e}")
    if a.json:
        a.json.write_text(json.dumps({"model": label, "threads": threads, **results,
                                      "max_logit_difference_vs_tvm_float": diff}, indent=2))


if __name__ == "__main__":
    main()
