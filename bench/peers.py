"""Peers: one model through our TVM artifact, our ONNX Runtime artifact and PyTorch eager, one run.

    python -m bench.peers                               # the bundled default model
    python -m bench.peers --checkpoint DIR
    python -m bench.peers --preset mobilemoe-s          # preset shapes, random weights
    python -m bench.peers --threads 1 --json OUT
    python -m bench.peers --llama-cpp [--preset mobilemoe-s]  # TVM vs llama.cpp Q4_0 (bench/llamacpp.py)

Builds (cached in --work while manifests and compiler sources match) the host TVM artifact
(`compiler.build --target host`) and the ONNX Runtime artifact (`--target onnx`, float32 compute
unless --ort-accuracy-level), opens both with mobilemoe.runtimes.load_artifact and runs PyTorch
eager (mobilemoe.model, float32) on the same weights, all with --threads threads. Each is timed
with bench/measure.py's measure (same prompts, medians of --repeats after a warm-up): prefill tok/s
per prompt length and decode tok/s as generation runs: --decode-tokens steps in a row after a prompt
of each context, the cache growing (compiler/generation.py), with its spread over the repeats and
the single-step figure (one step from a fixed cache) printed beside it.
Prints the table and the ratios TVM / ORT and TVM / PyTorch (goal: TVM faster than ORT on both).

Agreement (teacher-forced next-token argmax on real text, tests/data, as bench/ort_vs_tvm.py):
TVM vs ORT, and for checkpoints TVM vs PyTorch with INT4-dequantized weights (train.qat.simulate_int4:
the function the artifacts compute; same ops as float32, so not timed separately) and vs PyTorch
float32. For --preset the artifacts draw their own random weights (compiler.params.RandomWeights),
so only TVM vs ORT is compared.

--llama-cpp: instead, our TVM host artifact vs llama.cpp (bench/llamacpp.py: its cached build, its own
converter to Q4_0 and Q4_0 --pure, its F16 logits checked against our PyTorch model first), llama-bench
pp128/pp512/tg128 alternating with ours for --rounds rounds at each of --llama-threads; prints the
ratio table ours / llama.cpp. --preset writes a random-weight checkpoint first, so both run the same weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench import common, llamacpp
from bench.common import log
from bench.measure import load_note, measure, pin_threads, torch_step
from bench.ort_vs_tvm import SAMPLE, top1_agreement
from compiler.build import shape_only_model
from mobilemoe.artifact import ArtifactError
from mobilemoe.checkpoint import CheckpointError, load_checkpoint
from mobilemoe.config import ConfigError
from mobilemoe.generate import DEFAULT_MODEL_DIR
from mobilemoe.runtimes import load_artifact
from train.qat import simulate_int4

SIMULATE_INT4_MAX_PARAMS = 300e6  # the INT4-dequantized PyTorch copy: only when a float copy is cheap


def measure_all(step, vocab: int, prompts: list[int], contexts: list[int], decode_tokens: int, repeats: int) -> dict:
    """bench/measure.py's measure for every decode context (prefill once)."""
    out = {"prefill": {}, "decode": {}, "decode_spread": {}, "decode_single_step": {}, "decode_faults_per_step": {}}
    for i, ctx in enumerate(contexts):
        r = measure(step, vocab, prompts if i == 0 else [], ctx, decode_tokens, repeats)
        for key in out:
            out[key].update(r[key])
    return out


def prefill_agreement(a, b, n: int = 64) -> dict:
    """One prefill of the same real-text prompt in two runtimes: same argmax? largest |logit difference|."""
    ids = [a.config.bos_token_id, *a.tokenizer().encode(SAMPLE.read_text()).ids[: n - 1]]
    ids = [t % a.config.vocab_size for t in ids]
    la, lb = (np.asarray(r.step(ids, None)[0], dtype=np.float32) for r in (a, b))
    return {"tokens": len(ids), "same_argmax": bool(la.argmax() == lb.argmax()),
            "max_abs_diff": float(np.abs(la - lb).max()), "logit_range": float(la.max() - la.min())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help=f"default: the bundled model ({DEFAULT_MODEL_DIR})")
    p.add_argument("--preset", default=None, help="preset name or config JSON: random weights (speed only)")
    p.add_argument("--ort-accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=None,
                   help="ONNX artifact compute: 0 float32 (the build's default), 4 int8 activations")
    common.add_args(p, prompts="32,128", contexts="128")
    llamacpp.add_peer_args(p)
    a = p.parse_args(argv)
    if a.preset and a.checkpoint:
        p.error("give --checkpoint or --preset, not both")
    ckpt = None if a.preset else Path(a.checkpoint or DEFAULT_MODEL_DIR)
    if ckpt is not None and not (ckpt / "config.json").is_file():
        sys.exit(f"error: checkpoint {ckpt}: no config.json there (a checkpoint is a directory with config.json + "
                 f"model.safetensors; or use --preset NAME)")
    if a.llama_cpp:  # llama.cpp peer: its own run at --llama-threads, alternating rounds (bench/llamacpp.py)
        try:
            llamacpp.peer_run(a, ckpt, Path(a.preset).stem if a.preset else ckpt.name,
                              f"{a.preset} (random weights)" if a.preset else str(ckpt))
        except (llamacpp.LlamaCppError, ArtifactError, CheckpointError, ConfigError) as e:
            sys.exit(f"error: {e}")
        return
    threads = pin_threads(a)  # before any TVM work: the pool reads TVM_NUM_THREADS once
    name = Path(a.preset).stem if a.preset else ckpt.name
    label = f"{a.preset} (random weights)" if a.preset else str(ckpt)
    level = a.ort_accuracy_level
    try:
        tvm_dir = common.cached_artifact(a.work, f"{name}-host", "host", a.preset, ckpt, rebuild=a.rebuild)
        onnx_dir = common.cached_artifact(a.work, f"{name}-onnx" + (f"-acc{level}" if level is not None else ""),
                                          "onnx", a.preset, ckpt, ort_accuracy_level=level, rebuild=a.rebuild)
        tvm_rt = load_artifact(tvm_dir, num_threads=threads)
        ort_rt = load_artifact(onnx_dir, num_threads=threads)
        if a.preset:
            model = shape_only_model(a.preset)
            with torch.no_grad():
                model.reset_parameters()
        else:
            model = load_checkpoint(ckpt)
    except (ArtifactError, CheckpointError, ConfigError) as e:
        sys.exit(f"error: {e}")
    model = model.float().eval()
    cfg = tvm_rt.config
    torch_rt = SimpleNamespace(step=torch_step(model), config=model.config)

    prompts = [n for n in a.prompt_lens if n <= cfg.max_seq_len]
    contexts = [c for c in a.contexts if c + a.decode_tokens <= cfg.max_seq_len]
    if len(prompts) < len(a.prompt_lens) or len(contexts) < len(a.contexts):
        log(f"skipping prompt lengths / contexts beyond max_seq_len {cfg.max_seq_len}")
    if not contexts:
        sys.exit(f"error: no --contexts fits max_seq_len {cfg.max_seq_len} with {a.decode_tokens} decode tokens")
    args = (cfg.vocab_size, prompts, contexts, a.decode_tokens, a.repeats)
    res = {}
    for key, rt in (("tvm", tvm_rt), ("ort", ort_rt), ("pytorch", torch_rt)):
        log(f"measuring {key} ({threads} thread(s))")
        res[key] = measure_all(rt.step, *args)

    log("checking agreement on real text (tests/data)")
    agree = {"tvm_vs_ort": {"teacher_forced_top1": top1_agreement(tvm_rt, ort_rt),
                            "prefill": prefill_agreement(tvm_rt, ort_rt)}}
    if a.preset:
        agree["pytorch"] = "not compared: --preset artifacts draw their own random weights"
    else:
        agree["tvm_vs_pytorch_float32"] = {"teacher_forced_top1": top1_agreement(tvm_rt, torch_rt)}
        if cfg.total_params() <= SIMULATE_INT4_MAX_PARAMS:
            with torch.no_grad():
                sim = simulate_int4(model)
            sim_rt = SimpleNamespace(step=torch_step(sim.eval()), config=sim.config)
            agree["tvm_vs_pytorch_int4"] = {"teacher_forced_top1": top1_agreement(tvm_rt, sim_rt),
                                            "prefill": prefill_agreement(tvm_rt, sim_rt)}
        else:
            agree["tvm_vs_pytorch_int4"] = f"skipped: a float copy of {cfg.total_params() / 1e9:.1f}B params"

    ort_desc = f"ORT INT4 (accuracy_level {ort_rt.manifest['onnx']['accuracy_level']})"
    print(f"model: {label}; threads: {threads}; TVM host INT4 vs {ort_desc} vs PyTorch eager float32; "
          f"{load_note()}")
    print(f"{'phase':<18}{'TVM tok/s':>11}{'ORT tok/s':>11}{'PyTorch tok/s':>15}{'TVM/ORT':>9}{'TVM/PyTorch':>13}")
    table = []
    for phase in ("prefill", "decode"):
        for n, t in res["tvm"][phase].items():
            o, pt = res["ort"][phase][n], res["pytorch"][phase][n]
            table.append({"phase": phase, "size": n, "tvm": t, "ort": o, "pytorch": pt, "tvm_over_ort": t / o,
                          "tvm_over_pytorch": t / pt})
            name = f"{phase} {'prompt' if phase == 'prefill' else 'ctx'} {n}"
            print(f"{name:<18}{t:>11.1f}{o:>11.1f}{pt:>15.1f}{t / o:>8.2f}x{t / pt:>12.2f}x")
    for key in ("tvm", "ort", "pytorch"):
        for n, (lo, hi) in res[key]["decode_spread"].items():
            print(f"{key} decode ctx {n}: {a.decode_tokens} steps in a row {lo:.1f}..{hi:.1f} tok/s over {a.repeats} "
                  f"runs; single step from a fixed cache {res[key]['decode_single_step'][n]:.1f} tok/s; minor "
                  f"faults/step {res[key]['decode_faults_per_step'][n]:.1f}")
    for phase in ("prefill", "decode"):
        rows = [r for r in table if r["phase"] == phase]
        ok = all(r["tvm_over_ort"] > 1 for r in rows)
        print(f"goal TVM faster than ORT on {phase}: {'met' if ok else 'NOT met'}")
    for key, v in agree.items():
        if isinstance(v, str):
            print(f"agreement {key}: {v}")
            continue
        line = f"agreement {key.replace('_', ' ')}: teacher-forced top-1 {v['teacher_forced_top1']:.3f} (128 tokens)"
        if "prefill" in v:
            pf = v["prefill"]
            line += (f"; prefill of {pf['tokens']} tokens: same argmax {pf['same_argmax']}, max |logit diff| "
                     f"{pf['max_abs_diff']:.2e} (logit range {pf['logit_range']:.1f})")
        print(line)
    if a.json:
        out = {"model": label, "threads": threads, "artifacts": {"tvm": str(tvm_dir), "onnx": str(onnx_dir)},
               "results": res, "table": table, "agreement": agree}
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
