"""MoE vs dense: mobilemoe-s and the dense mobilellm-pro-like baseline, same target and threads, one run.

    python -m bench.moe_vs_dense                               # host, random INT4 weights, cached builds
    python -m bench.moe_vs_dense --threads 1 --json OUT
    python -m bench.moe_vs_dense --moe A.json --dense B.json   # any presets / config JSONs
    python -m bench.moe_vs_dense --target linux-arm64 --rpc-tracker HOST:PORT --rpc-key KEY

Builds both presets with random INT4 weights (`python -m compiler.build --preset`, the speed of a
model does not depend on its weights) into --work and reuses them while their manifests and the
compiler sources match; paper-size builds hold /tmp/mobilemoe-big.lock. Then measures the MoE model
and the dense baseline one after the other in this process with the same thread count
(compiler.bench.run: prefill tok/s per prompt length, decode tok/s at each context, medians after a
warm-up) and prints tok/s and the speedup MoE / dense, next to what the accounting predicts
(decode: bytes per token, bench/common.py decode_bytes; prefill: FLOPs, prefill_flops) and the
goals (decode >= 3.4x, prefill >= 3.8x). Also the INT4 weight memory of each (the comparison is at
comparable INT4 weight memory).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from bench import common, measure
from bench.common import log
from mobilemoe.artifact import ArtifactError, read_manifest
from mobilemoe.config import ConfigError
from targets import TargetError, get_target
from targets.rpc_device import parse_tracker

GOALS = {"prefill": 3.8, "decode": 3.4}


def describe(artifact: Path, cfg, contexts, prompts) -> dict:
    """What each model must move and compute, from the artifact's parameters and config."""
    shapes = common.param_shapes(artifact)
    return {"int4_weight_mb_config": cfg.int4_weight_bytes() / 2**20,
            "params_file_mb": (artifact / "params.safetensors").stat().st_size / 2**20,
            "total_params": cfg.total_params(), "active_params": cfg.active_params(),
            "decode_bytes": {c: common.decode_bytes(shapes, cfg, c + 1)["total"] for c in contexts},
            "prefill_flops": {n: common.prefill_flops(cfg, n)["needed"] for n in prompts}}


def main(argv=None):

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", default="mobilemoe-s", help="MoE preset or config JSON (default mobilemoe-s)")
    p.add_argument("--dense", default="mobilellm-pro",
                   help="dense baseline preset or config JSON (default mobilellm-pro)")
    p.add_argument("--target", default="host", help="build target (default host)")
    p.add_argument("--rpc-tracker", type=parse_tracker, default=None, metavar="HOST:PORT",
                   help="measure on the device registered with this tracker (targets that do not run here)")
    p.add_argument("--rpc-key", default=None)
    common.add_args(p)
    a = p.parse_args(argv)
    if (a.rpc_tracker is None) != (a.rpc_key is None):
        p.error("--rpc-tracker and --rpc-key go together")
    rpc = (*a.rpc_tracker, a.rpc_key) if a.rpc_tracker else None
    try:
        spec = get_target(a.target)
        cfgs = {role: common.model_config(name, None) for role, name in (("moe", a.moe), ("dense", a.dense))}
    except (TargetError, ConfigError) as e:
        sys.exit(f"error: {e}")
    if not spec.runs_on_host and rpc is None:
        sys.exit(f"error: target {a.target!r} artifacts do not run on this machine: give --rpc-tracker and --rpc-key "
                 f"of a device (targets/arm64_device.sh start), or use --target host")
    if not cfgs["moe"].is_moe or cfgs["dense"].is_moe:
        log(f"warning: --moe {a.moe} has {cfgs['moe'].num_experts} experts and --dense {a.dense} "
            f"{cfgs['dense'].num_experts}; expected an MoE model and a dense one")
    threads = measure.pin_threads(a)  # before any TVM work: the pool reads TVM_NUM_THREADS once

    arts, res = {}, {}
    for role, name in (("moe", a.moe), ("dense", a.dense)):
        arts[role] = common.cached_artifact(a.work, f"{Path(name).stem}-{a.target}", a.target, preset=name,
                                            rebuild=a.rebuild)
    for role in ("moe", "dense"):  # one after the other, same process, same threads
        log(f"measuring {cfgs[role].name} ({role}) with {threads} thread(s)")
        try:
            if read_manifest(arts[role]).get("config") != cfgs[role].to_dict():
                raise ArtifactError(f"{arts[role]}: its config is not {cfgs[role].name}'s")
            res[role] = measure.run_artifact(arts[role], a.prompt_lens, a.contexts, a.decode_tokens, a.repeats, rpc)
        except (ArtifactError, ValueError) as e:
            sys.exit(f"error: {e}")
        res[role]["bench"] = {k: res[role]["bench"].get(k) for k in ("where", "load_s", "peak_rss_mb")}
        res[role]["model"] = describe(arts[role], cfgs[role], a.contexts, a.prompt_lens)
        gc.collect()

    moe, dense = res["moe"], res["dense"]
    names = cfgs["moe"].name, cfgs["dense"].name
    print(f"{names[0]} (MoE) vs {names[1]} (dense baseline); target {a.target} on {moe['bench']['where']}; "
          f"{threads} thread(s); random INT4 weights; {measure.load_note()}")
    w = max(16, *(len(n) + 2 for n in names))
    print(f"{'':<34}{names[0]:>{w}}{names[1]:>{w}}")
    rows = (("INT4 weight memory MB (config)", "int4_weight_mb_config", "{:.1f}"),
            ("params.safetensors MB", "params_file_mb", "{:.1f}"),
            ("total params (M)", "total_params", "{:.1f}"), ("active params/token (M)", "active_params", "{:.1f}"))
    for label, key, fmt in rows:
        scale = 1e-6 if "params" in key and "mb" not in key else 1
        print(f"{label:<34}" + "".join(f"{fmt.format(r['model'][key] * scale):>{w}}" for r in (moe, dense)))
    print(f"\n{'phase':<18}{names[0] + ' tok/s':>22}{names[1] + ' tok/s':>24}{'speedup':>9}{'accounting':>12}   goal")
    table = []
    for phase, sizes, need in (("prefill", a.prompt_lens, "prefill_flops"), ("decode", a.contexts, "decode_bytes")):
        for n in sizes:
            if n not in moe[phase] or n not in dense[phase]:
                log(f"skipped {phase} {n}: longer than a model's max_seq_len")
                continue
            speedup = moe[phase][n] / dense[phase][n]
            expect = dense["model"][need][n] / moe["model"][need][n]
            ok = "met" if speedup >= GOALS[phase] else "NOT met"
            name = f"{phase} {'prompt' if phase == 'prefill' else 'ctx'} {n}"
            table.append({"phase": phase, "size": n, "moe_tok_s": moe[phase][n], "dense_tok_s": dense[phase][n],
                          "speedup": speedup, "accounting_speedup": expect, "goal": GOALS[phase]})
            print(f"{name:<18}{moe[phase][n]:>22.1f}{dense[phase][n]:>24.1f}{speedup:>8.2f}x{expect:>11.2f}x   "
                  f"{ok} (>= {GOALS[phase]}x)")
    print("accounting: the speedup if both ran at the same bandwidth (decode: bytes/token incl. KV cache) or "
          "FLOP/s (prefill)")
    for role in ("moe", "dense") if rpc is None else ():  # on a device: its own threads, not this process's
        print(f"{cfgs[role].name}: {measure.thread_check(res[role]['cpu_per_wall'], threads)}; "
              f"process peak RSS so far {res[role]['bench']['peak_rss_mb']:.0f} MB")
    if a.json:
        out = {"target": a.target, "threads": threads, "machine": measure.machine() | {"flags": None},
               "artifacts": {k: str(v) for k, v in arts.items()}, "results": res, "table": table}
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
