"""The in-place KV cache vs the growing one: decode as generation runs, alternating in one process.

    python -m bench.kv_cache --preset mobilemoe-s [--contexts 128,1024] [--decode-tokens 128] [--rounds 5]
    python -m bench.kv_cache --artifacts GROW_DIR INPLACE_DIR [--threads 1]

Builds (cached in --work) the host artifact twice, `compiler.build --kv-cache grow` (decode returns
grown copies of the cache) and `--kv-cache inplace` (fixed capacity, the slot written in place,
attention over the valid prefix: mobilemoe/kv_cache.py), or takes two built ones (grow first).
Measures this machine's read bandwidth (bench/roofline.py's TVM sum kernel, best of 5), then runs
--rounds rounds, each artifact in turn within a round (both see the same load on a shared
machine): for each context, --decode-tokens steps in a row from a prompt of that length
(compiler/generation.py, one run per round after a warm-up run). Prints, per artifact and context,
the median generation tok/s over the rounds with its spread, its bandwidth fraction (bench/common.py
decode_bytes at the run's mean depth, context + (steps + 1) / 2, x tok/s / bandwidth), the ratio of
the fraction at the longest context to the shortest (goal >= 0.9: a long cache costs no more than
its bytes), minor page faults per step of the first run from each context (the first time through
those cache lengths, as generation always is: later runs find the pages already mapped) and new
storage requests per step (compiler/generation.py kernel_time), and in-place / grow.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import tvm

from bench import common, measure
from bench.common import log
from bench.roofline import compile_kernel, sum_kernel
from compiler.generation import generation, kernel_time, prompt_cache
from mobilemoe.runtimes import load_artifact

CACHES = ("grow", "inplace")
GOAL_LONG_OVER_SHORT = 0.9


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Bytes/s of bench/roofline.py's streaming TVM sum over a `gib` GiB buffer (best of 5)."""

    width, chunks = 64, 64 * threads
    rows = int(gib * 2**30) // 4 // width // chunks
    x = torch.ones(chunks, rows, width)
    kern = compile_kernel(sum_kernel(chunks, rows, width))
    res = tvm.runtime.empty((chunks, width), "float32", tvm.cpu())
    t, _ = measure.best_time(lambda: kern["main"](tvm.runtime.from_dlpack(x), res))
    return x.numel() * 4 / t


def main(argv=None):

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="preset name or config JSON: build both (random INT4 weights)")
    p.add_argument("--artifacts", type=Path, nargs=2, default=None, metavar=("GROW", "INPLACE"))
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--buffer-gib", type=float, default=1.0, help="bandwidth buffer size (default 1 GiB)")
    common.add_args(p, prompts="128", contexts="128,1024")
    a = p.parse_args(argv)
    if (a.preset is None) == (a.artifacts is None):
        p.error("give --preset or --artifacts")
    threads = measure.pin_threads(a)
    if a.artifacts is None:
        name = Path(a.preset).stem
        a.artifacts = [common.cached_artifact(a.work, f"{name}-host-{kv}", "host", a.preset, rebuild=a.rebuild,
                                              kv_cache=kv) for kv in CACHES]
    rts = dict(zip(CACHES, (load_artifact(d) for d in a.artifacts)))
    if [rt.kv_inplace for rt in rts.values()] != [False, True]:
        sys.exit(f"error: expected a growing-cache artifact then an in-place one, got {[str(d) for d in a.artifacts]}")
    cfg = rts["inplace"].config
    contexts = [c for c in a.contexts if c + a.decode_tokens <= cfg.max_seq_len]
    if not contexts:
        sys.exit(f"error: no --contexts fits max_seq_len {cfg.max_seq_len} with {a.decode_tokens} decode tokens")
    load0 = measure.load_note()
    bw = read_bandwidth(threads, a.buffer_gib)
    log(f"read bandwidth {bw / 1e9:.1f} GB/s ({threads} thread(s))")
    shapes = common.param_shapes(a.artifacts[1])
    caches = {(kv, c): prompt_cache(rt.step, cfg.vocab_size, c) for kv, rt in rts.items() for c in contexts}
    runs = {key: [] for key in caches}
    for (kv, c), (cache, token) in caches.items():  # warm-up; the counts of faults and new storage
        g = generation(rts[kv].step, cache, token, a.decode_tokens, 1, warmup=0)
        k = kernel_time(rts[kv], cache, token)
        runs[kv, c + 0.5] = {"faults": g["faults_per_step_steady"],
                             "new_storage": sum(k["new_storage_per_step"]) / len(k["new_storage_per_step"])}
    for r in range(a.rounds):
        for (kv, c), (cache, token) in caches.items():
            runs[kv, c].append(generation(rts[kv].step, cache, token, a.decode_tokens, 1, warmup=0)["tok_s"])
        log(f"round {r + 1}/{a.rounds} done ({measure.load_note()})")

    print(f"model {cfg.name}; {threads} thread(s); {a.decode_tokens} decode steps in a row per run, {a.rounds} "
          f"alternating rounds; read bandwidth {bw / 1e9:.1f} GB/s; {load0} at start, {measure.load_note()} at end")
    print(f"{'cache':<9}{'context':>8}{'tok/s':>9}{'spread':>18}{'BW fraction':>13}{'faults/step*':>13}"
          f"{'new storage/step':>18}")
    result, frac = [], {}
    for kv in CACHES:
        for c in contexts:
            rates, extra = runs[kv, c], runs[kv, c + 0.5]
            tok_s = statistics.median(rates)
            b = common.decode_bytes(shapes, cfg, c + (a.decode_tokens + 1) / 2)["total"]
            frac[kv, c] = b * tok_s / bw
            result.append({"cache": kv, "context": c, "tok_s": tok_s, "rounds": rates, "bw_fraction": frac[kv, c],
                           **extra})
            print(f"{kv:<9}{c:>8}{tok_s:>9.1f}{f'{min(rates):.1f}..{max(rates):.1f}':>18}{frac[kv, c]:>13.0%}"
                  f"{extra['faults']:>13.1f}{extra['new_storage']:>18.1f}")
    print("* minor page faults per step, steady state of the first run through those cache lengths")
    lo, hi = contexts[0], contexts[-1]
    for kv in CACHES:
        ratio = frac[kv, hi] / frac[kv, lo]
        met = "met" if ratio >= GOAL_LONG_OVER_SHORT else "NOT met"
        print(f"{kv}: BW fraction at ctx {hi} / ctx {lo} = {ratio:.2f} ({met}: >= {GOAL_LONG_OVER_SHORT})")
    for c in contexts:
        print(f"ctx {c}: in-place / grow = "
              f"{statistics.median(runs['inplace', c]) / statistics.median(runs['grow', c]):.2f}x")
    if a.json:
        a.json.write_text(json.dumps({"model": cfg.name, "threads": threads, "bandwidth": bw, "results": result,
                                      "artifacts": [str(d) for d in a.artifacts], "pid": os.getpid()}, indent=1))


if __name__ == "__main__":
    main()
