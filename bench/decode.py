"""Prefill and decode tokens/s: the host TVM artifact vs PyTorch eager on the same weights, one process.

    python -m bench.decode                                   # the bundled default model
    python -m bench.decode --checkpoint DIR
    python -m bench.decode --preset mobilemoe-s              # preset shapes, random weights
    python -m bench.decode --artifact DIR --checkpoint DIR   # reuse a built artifact

Baseline: PyTorch eager (float32, this process, same thread count) running the same checkpoint; for
--preset, a PyTorch model of the same shapes with random weights. Prints tok/s of both and the ratio
TVM / PyTorch for prefill (prompt lengths) and decode (--decode-tokens steps in a row after a prompt
of --context, the cache growing, as generation runs: compiler/generation.py; its spread and the
single-step figure, one step from a fixed cache, are printed beside it).
Each number is the median of --repeats runs after one warm-up run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.measure import add_measure_args, conditions, measure, set_threads, torch_step
from compiler.build import build
from mobilemoe.checkpoint import load_checkpoint, shape_only_model
from mobilemoe.generate import DEFAULT_MODEL_DIR
from mobilemoe.runtimes import load_artifact


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--artifact", type=Path, default=None)
    add_measure_args(p)
    a = p.parse_args(argv)
    threads = set_threads(a)

    if a.preset:
        model = shape_only_model(a.preset)
        with torch.no_grad():
            model.reset_parameters()
        label = f"{a.preset} (random weights)"
    else:
        ckpt = a.checkpoint or DEFAULT_MODEL_DIR
        model, label = load_checkpoint(ckpt), str(ckpt)
    artifact = a.artifact
    if artifact is None:
        artifact = Path(tempfile.mkdtemp(prefix="bench-decode-")) / "host"
        t0 = time.perf_counter()
        build(None if a.preset else (a.checkpoint or DEFAULT_MODEL_DIR), "host", artifact, preset=a.preset,
              verbose=False)
        print(f"built {artifact} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    rt = load_artifact(artifact, num_threads=threads)

    prompt_lens = [int(x) for x in a.prompt_lens.split(",")]
    args = (model.config.vocab_size, prompt_lens, a.context, a.decode_tokens, a.repeats)
    tvm_r = measure(rt.step, *args)
    pt_r = measure(torch_step(model.eval()), *args)

    print(f"model: {label}; {conditions(threads, a.repeats)}; TVM INT4 artifact vs PyTorch eager float32 (baseline)")
    print(f"{'phase':<22}{'TVM tok/s':>12}{'PyTorch tok/s':>16}{'ratio':>8}")
    for phase in ("prefill", "decode"):
        for n in tvm_r[phase]:
            name = f"{phase} {'prompt' if phase == 'prefill' else 'ctx'} {n}"
            t, b = tvm_r[phase][n], pt_r[phase][n]
            print(f"{name:<22}{t:>12.1f}{b:>16.1f}{t / b:>7.2f}x")
    for key, r in (("TVM", tvm_r), ("PyTorch", pt_r)):
        for n, (lo, hi) in r["decode_spread"].items():
            print(f"{key} decode ctx {n}: {a.decode_tokens} steps in a row {lo:.1f}..{hi:.1f} tok/s over "
                  f"{a.repeats} runs; single step from a fixed cache {r['decode_single_step'][n]:.1f} tok/s; "
                  f"minor faults/step {r['decode_faults_per_step'][n]:.1f}")
    if a.json:
        a.json.write_text(json.dumps({"model": label, "threads": threads, "tvm": tvm_r, "pytorch": pt_r}, indent=2))


if __name__ == "__main__":
    main()
