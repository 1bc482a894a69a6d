"""Prefill and decode tokens/s: the ONNX Runtime artifact vs the host TVM artifact, same weights, one run.

    python -m bench.ort_vs_tvm                          # the bundled default model (if present)
    python -m bench.ort_vs_tvm --checkpoint DIR
    python -m bench.ort_vs_tvm --preset mobilemoe-s     # preset shapes, random weights
    python -m bench.ort_vs_tvm --tvm DIR --onnx DIR     # reuse built artifacts

The artifacts are built here from the same checkpoint (compiler.build --target host / --target onnx,
one ONNX artifact per --accuracy-levels entry: 0 float32 compute, the default build; 4 int8
activations); for --preset all draw the same random weights (compiler.params.RandomWeights under the
TVM parameter names). Baseline: the host TVM artifact. Prints tok/s and the ratio ORT / TVM for
prefill (prompt lengths) and decode (tokens generated after a prompt of --context), each the median
of --repeats runs after a warm-up (bench/decode.py's measure), and each ORT artifact's top-1
next-token agreement with TVM on real text (tests/data, teacher-forced). All use --threads threads
(default: torch's).
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
from compiler.build import build
from mobilemoe.generate import DEFAULT_MODEL_DIR
from mobilemoe.runtimes import load_artifact

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "heldout_sample.txt"


def timed_build(label: str, fn) -> Path:
    t0 = time.perf_counter()
    path = fn()
    print(f"built {label} artifact {path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return path


def top1_agreement(a, b, n: int = 128) -> float:
    """Teacher-forced next-token argmax agreement of two runtimes on real text (tests/data), one token a step."""
    ids = [a.config.bos_token_id, *a.tokenizer().encode(SAMPLE.read_text()).ids[: n - 1]]
    same, kv_a, kv_b = [], None, None
    for t in ids:
        la, kv_a = a.step([t % a.config.vocab_size], kv_a)
        lb, kv_b = b.step([t % b.config.vocab_size], kv_b)
        same.append(int(np.argmax(la)) == int(np.argmax(lb)))
    return float(np.mean(same))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--preset", default=None, help="preset shapes with random weights (default when no model)")
    p.add_argument("--tvm", type=Path, default=None, help="reuse a built host TVM artifact")
    p.add_argument("--onnx", type=Path, action="append", default=None, help="reuse built ONNX artifacts (repeatable)")
    p.add_argument("--accuracy-levels", default="0,4",
                   help="ONNX artifacts to build, one per accuracy_level (0 float32: the default build; 4 int8)")
    add_measure_args(p)
    a = p.parse_args(argv)
    threads = set_threads(a)

    checkpoint = a.checkpoint
    if a.preset is None and checkpoint is None:
        if DEFAULT_MODEL_DIR.is_dir():
            checkpoint = DEFAULT_MODEL_DIR
        else:
            a.preset = "mobilemoe-tiny"
            print(f"no {DEFAULT_MODEL_DIR}: using --preset {a.preset} (random weights)", file=sys.stderr)
    label = f"{a.preset} (random weights)" if a.preset else str(checkpoint)
    work = Path(tempfile.mkdtemp(prefix="bench-ort-"))
    tvm_dir = a.tvm or timed_build("TVM host", lambda: build(checkpoint, "host", work / "host", preset=a.preset,
                                                              verbose=False))
    onnx_dirs = a.onnx or [
        timed_build(f"ONNX accuracy_level {level}",
                    lambda level=level: build(checkpoint, "onnx", work / f"onnx-{level}", preset=a.preset,
                                              ort_accuracy_level=level, verbose=False))
        for level in (int(x) for x in a.accuracy_levels.split(","))]
    tvm_rt = load_artifact(tvm_dir, num_threads=threads)
    ort_rts = []
    for d in onnx_dirs:
        t0 = time.perf_counter()
        ort_rts.append(load_artifact(d, num_threads=threads))
        print(f"ORT session for {d} created in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    cfg = tvm_rt.config
    prompt_lens = [int(x) for x in a.prompt_lens.split(",")]
    args = (cfg.vocab_size, prompt_lens, a.context, a.decode_tokens, a.repeats)
    tvm_r = measure(tvm_rt.step, *args)
    levels = [rt.manifest["onnx"]["accuracy_level"] for rt in ort_rts]
    ort_r = {level: measure(rt.step, *args) for level, rt in zip(levels, ort_rts)}
    agree = {level: top1_agreement(rt, tvm_rt) for level, rt in zip(levels, ort_rts)}

    print(f"model: {label}; {conditions(threads, a.repeats)}; ONNX Runtime INT4 (accuracy_level {', '.join(map(str, levels))}) "
          f"vs TVM host INT4 (baseline)")
    header = f"{'phase':<22}{'TVM tok/s':>11}" + "".join(f"{f'ORT-{lv} tok/s':>14}{'ORT/TVM':>9}" for lv in levels)
    print(header)
    for phase in ("prefill", "decode"):
        for n in tvm_r[phase]:
            name = f"{phase} {'prompt' if phase == 'prefill' else 'ctx'} {n}"
            t = tvm_r[phase][n]
            print(f"{name:<22}{t:>11.1f}" + "".join(f"{ort_r[lv][phase][n]:>14.1f}{ort_r[lv][phase][n] / t:>8.2f}x"
                                                     for lv in levels))
    for lv in levels:
        print(f"top-1 next-token agreement ORT-{lv} vs TVM (teacher-forced, tests/data real text): {agree[lv]:.3f}")
    if a.json:
        a.json.write_text(json.dumps({"model": label, "threads": threads, "tvm": tvm_r, "onnx": ort_r,
                                      "top1_agreement": agree}, indent=2))


if __name__ == "__main__":
    main()
