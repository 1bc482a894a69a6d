"""Prefill and decode tokens/s: the host TVM artifact vs PyTorch eager on the same weights, one process.

    python bench/decode.py                                   # the bundled default model
    python bench/decode.py --checkpoint DIR
    python bench/decode.py --preset mobilemoe-s              # preset shapes, random weights
    python bench/decode.py --artifact DIR --checkpoint DIR   # reuse a built artifact

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
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_step(model):
    @torch.no_grad()
    def step(ids, kv):
        logits, kv = model(torch.tensor([ids]), kv=kv, last_only=True)
        return logits[0, -1], kv
    return step


def measure(step, vocab: int, prompt_lens: list[int], context: int, decode_tokens: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {"prefill": {}, "decode": {}}
    for n in prompt_lens:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out["prefill"][n] = n / median_time(lambda: step(ids, None), repeats)
    # decode as generation runs (compiler/generation.py): decode_tokens steps in a row from the
    # prompt's cache, the cache growing; the single step from a fixed cache is kept beside it
    from compiler.generation import generation, prompt_cache, single_step
    kv, token = prompt_cache(step, vocab, context)
    gen = generation(step, kv, token, decode_tokens, repeats)
    out["decode"][context] = gen["tok_s"]
    out["decode_spread"] = {context: [gen["tok_s_min"], gen["tok_s_max"]]}
    out["decode_single_step"] = {context: single_step(step, kv, token, max(8, 4 * repeats))["tok_s"]}
    out["decode_faults_per_step"] = {context: gen["faults_per_step"]}
    return out


def add_measure_args(p: argparse.ArgumentParser) -> None:
    """The measurement options every bench script shares (see measure())."""
    p.add_argument("--prompt-lens", default="32,128")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)


def set_threads(a) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    return torch.get_num_threads()


def main(argv=None):
    from compiler.build import build, shape_only_model
    from mobilemoe.checkpoint import load_checkpoint
    from mobilemoe.generate import DEFAULT_MODEL_DIR
    from mobilemoe.runtime import load_artifact

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

    print(f"model: {label}; threads: {threads}; TVM INT4 artifact vs PyTorch eager float32 (baseline)")
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
