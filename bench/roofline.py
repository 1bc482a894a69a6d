"""Roofline: an artifact's decode bandwidth and prefill FLOP/s as fractions of this machine's measured peaks.

    python -m bench.roofline --artifact DIR                  # a host TVM artifact
    python -m bench.roofline --preset mobilemoe-s            # build it (cached in --work), random INT4 weights
    python -m bench.roofline --checkpoint DIR [--thread-counts 1,2] [--json OUT]

For each thread count (a fresh subprocess each: TVM's pool reads TVM_NUM_THREADS once) it measures
  memory read bandwidth   a streaming sum over a --buffer-gib buffer (far larger than L3): a TVM
                          kernel (llvm, mcpu=host, parallel over chunks, TVM's thread pool) and
                          torch.sum; the best is "measured bandwidth"
  fp32 peak               a register-blocked TVM FMA kernel (no memory traffic) and a 2048^3 torch
                          matmul; the best is the fp32 peak
  int8 dot peak           a TVM kernel of vpdpbusd (avx512_vnni) / sdot (arm64 dotprod) / pmaddubsw added
                          in int16 (AVX2 without VNNI: int4_rows.py's instruction), if the CPU has it
  the artifact            prefill and decode tok/s (compiler.bench.run: medians after a warm-up);
                          decode as generation runs: --decode-tokens steps in a row from each
                          context, the cache growing (compiler/generation.py), with its spread, the
                          single-step figure (one step from a fixed cache) beside it, minor page
                          faults per step and the time outside kernels per token
and prints
  decode   bytes needed per token (bench/common.py decode_bytes: weights + scales + KV cache at the
           mean depth of the run, context + (steps + 1) / 2, from params.safetensors) x generation
           tok/s, as a fraction of the measured bandwidth (goal >= 80%); the single-step figure is
           printed beside it, not judged
  prefill  needed FLOPs (bench/common.py prefill_flops: mobilemoe.config's accounting, LM head for
           the last token only) x tok/s / tokens, as a fraction of the fp32 and int8-dot peaks; the
           goal (>= 50% at 512 tokens) is judged against the peak of the instruction set the
           artifact's kernels use (manifest quantization.activations, else vpdpbusd/vpmaddubsw/sdot in lib.so).
Peaks are the best of 5 runs; the artifact's numbers are medians. Each run's process CPU time /
wall time shows whether it used the threads it was given (and whether others took the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm.script import tirx as T
from tvm.target import codegen

from bench import common, measure
from bench.common import log
from mobilemoe.artifact import ArtifactError, read_manifest
from mobilemoe.config import MobileMoEConfig
from mobilemoe.generate import DEFAULT_MODEL_DIR

GOAL_DECODE_BW, GOAL_PREFILL_PEAK, GOAL_PREFILL_LEN = 0.80, 0.50, 512
REG_BLOCKS = 12  # independent accumulators of the peak kernels (hide the FMA / dot latency)


# ------------------------------------------------------------------ micro kernels (TVMScript)
def compile_kernel(func):
    """A micro kernel (a PrimFunc) compiled for this machine's CPU (llvm, mcpu=host) as "main"."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).mod


def sum_kernel(chunks: int, rows: int, width: int):
    """out[c, :] = sum over r of a[c, r, :]: a streaming read of `a`, parallel over chunks."""

    @T.prim_func
    def func(a: T.Buffer((chunks, rows, width), "float32"), out: T.Buffer((chunks, width), "float32")):
        T.func_attr({"tirx.noalias": True})
        for c in T.parallel(chunks):
            acc = T.alloc_buffer((width,), "float32", scope="local")
            for v in T.vectorized(width):
                acc[v] = T.float32(0)
            for r in range(rows):
                for v in T.vectorized(width):
                    acc[v] = acc[v] + a[c, r, v]
            for v in T.vectorized(width):
                out[c, v] = acc[v]
    return func


def fma_kernel(par: int, lanes: int):
    """Each of `par` parallel tasks: n iterations of REG_BLOCKS independent vector FMAs on registers."""
    width = lanes * REG_BLOCKS

    @T.prim_func
    def func(x: T.Buffer((par, width), "float32"), out: T.Buffer((par, width), "float32"), n: T.int32):
        T.func_attr({"tirx.noalias": True})
        for p in T.parallel(par):
            acc = T.alloc_buffer((width,), "float32", scope="local")
            for v in T.vectorized(width):
                acc[v] = x[p, v]
            for _ in range(n):
                for r in T.unroll(REG_BLOCKS):
                    for v in T.vectorized(lanes):
                        acc[r * lanes + v] = T.call_llvm_pure_intrin(
                            "float32", "llvm.fma.f32", acc[r * lanes + v], T.float32(0.9999), T.float32(1e-4))
            for v in T.vectorized(width):
                out[p, v] = acc[v]
    return func


DOT_ISAS = {  # flag -> (intrinsic, int32 lanes of the accumulator, int8 operand type, ops per instruction)
    "avx512_vnni": ("llvm.x86.avx512.vpdpbusd.512", 16, "int8x64", 2 * 64),
    "asimddp": ("llvm.aarch64.neon.sdot.v4i32.v16i8", 4, "int8x16", 2 * 16),
    # no dot instruction: pmaddubsw (u8 x s8 pairs -> int16) added in int16, as int4_rows.py's kernels do
    # (lanes here: int16 lanes of the accumulator)
    "avx2": ("llvm.x86.avx2.pmadd.ub.sw", 16, "int8x32", 2 * 32),
}
ACC_DTYPE = {"avx2": "int16"}


def dot_kernel(par: int, isa: str):
    """Like fma_kernel with the int8 dot-product instruction (u8 x s8 -> i32 on x86, s8 x s8 on arm64)."""
    intrin, lanes, operand, _ = DOT_ISAS[isa]
    width = lanes * REG_BLOCKS
    acc_dtype = ACC_DTYPE.get(isa, "int32")
    words = lanes * int(acc_dtype[3:]) // 32  # int32 words of one operand

    def step(acc, a):
        if acc_dtype == "int16":  # pmaddubsw of the accumulator's bytes (a chain: nothing to hoist), an int16 add
            return acc + T.call_llvm_pure_intrin(f"int16x{lanes}", intrin, T.reinterpret(acc, dtype=operand), a)
        return T.call_llvm_pure_intrin(f"int32x{lanes}", intrin, acc, a, a)

    @T.prim_func
    def func(x: T.Buffer((par, width), acc_dtype), out: T.Buffer((par, width), acc_dtype), n: T.int32):
        T.func_attr({"tirx.noalias": True})
        for p in T.parallel(par):
            acc = T.alloc_buffer((width,), acc_dtype, scope="local")
            xw = T.decl_buffer((par * width * int(acc_dtype[3:]) // 32,), "int32", data=x.data)
            for v in T.vectorized(width):
                acc[v] = x[p, v]
            a = T.reinterpret(xw[T.ramp(p * width * int(acc_dtype[3:]) // 32, 1, words)], dtype=operand)
            for _ in range(n):
                for r in T.unroll(REG_BLOCKS):
                    acc[T.ramp(r * lanes, 1, lanes)] = step(acc[T.ramp(r * lanes, 1, lanes)], a)
            for v in T.vectorized(width):
                out[p, v] = acc[v]
    return func


def measure_peaks(threads: int, buffer_gib: float, flags: list[str]) -> dict:
    dev, out = tvm.cpu(), {}

    nbytes = int(buffer_gib * 2**30)
    width, chunks = 64, 64 * threads
    rows = nbytes // 4 // width // chunks
    x = torch.ones(chunks, rows, width)  # touched: no page faults inside the timing
    nbytes = x.numel() * 4
    res = tvm.runtime.empty((chunks, width), "float32", dev)
    kern, xt = compile_kernel(sum_kernel(chunks, rows, width)), tvm.runtime.from_dlpack(x)
    t, cpu = measure.best_time(lambda: kern["main"](xt, res))
    out["bw_tvm_sum"], out["cpu_per_wall_tvm_sum"] = nbytes / t, cpu
    log(f"  [{threads} thread(s)] read bandwidth, TVM sum over {nbytes / 2**30:.2f} GiB: {nbytes / t / 1e9:.1f} GB/s "
        f"(CPU/wall {cpu:.2f})")
    t, cpu = measure.best_time(lambda: x.sum())
    out["bw_torch_sum"] = nbytes / t
    log(f"  [{threads} thread(s)] read bandwidth, torch.sum: {nbytes / t / 1e9:.1f} GB/s (CPU/wall {cpu:.2f})")
    del x, xt

    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    iters = 1 << 17
    kern = compile_kernel(fma_kernel(threads, lanes))
    buf = [tvm.runtime.tensor(np.ones((threads, lanes * REG_BLOCKS), "float32"), dev) for _ in range(2)]
    t, cpu = measure.best_time(lambda: kern["main"](*buf, iters))
    out["fp32_tvm_fma"], out["cpu_per_wall_fma"] = threads * iters * REG_BLOCKS * lanes * 2 / t, cpu
    a = torch.randn(2048, 2048)
    t, _ = measure.best_time(lambda: a @ a)
    out["fp32_torch_mm"] = 2 * 2048**3 / t
    isa = next((f for f in DOT_ISAS if f in flags), None)
    if isa:
        _, lanes, _, ops = DOT_ISAS[isa]
        kern = compile_kernel(dot_kernel(threads, isa))
        buf = [tvm.runtime.tensor(np.ones((threads, lanes * REG_BLOCKS), ACC_DTYPE.get(isa, "int32")), dev)
               for _ in range(2)]
        t, _ = measure.best_time(lambda: kern["main"](*buf, iters))
        out["int8_dot"], out["int8_dot_isa"] = threads * iters * REG_BLOCKS * ops / t, isa
    dot = f"{out['int8_dot'] / 1e9:.0f} GOP/s ({isa})" if isa else "n/a (no dot-product ISA)"
    log(f"  [{threads} thread(s)] fp32 FMA {out['fp32_tvm_fma'] / 1e9:.0f} GFLOP/s (TVM), "
        f"{out['fp32_torch_mm'] / 1e9:.0f} (torch mm); int8 dot {dot}")
    out["bw"] = max(out["bw_tvm_sum"], out["bw_torch_sum"])
    out["fp32_peak"] = max(out["fp32_tvm_fma"], out["fp32_torch_mm"])
    return out


def kernel_isa(artifact: Path, manifest: dict) -> dict:
    """Which instructions the artifact's kernels compute with: what the build recorded (manifest
    quantization.activations: "int8 ... dot products" or "float32"), else what `objdump -d lib.so`
    shows (int8 dot if any vpdpbusd / vpmaddubsw / sdot, else fp32 FMA). The instruction counts are reported either way."""
    counts, err = {"vpdpbusd": 0, "vpmaddubsw": 0, "sdot/udot": 0, "vfmadd*ps zmm": 0, "vfmadd*ps ymm": 0,
                   "fmla": 0}, None
    try:
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(artifact / "lib.so")], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        asm, err = "", f"objdump failed: {e}"
    for line in asm.splitlines():
        parts = line.split()
        op = parts[1] if len(parts) > 1 and parts[0].endswith(":") else ""
        if op.startswith("vpdpbus"):
            counts["vpdpbusd"] += 1
        elif op == "vpmaddubsw":
            counts["vpmaddubsw"] += 1
        elif op in ("sdot", "udot"):
            counts["sdot/udot"] += 1
        elif op.startswith("vfmadd") and op.endswith("ps"):
            counts["vfmadd*ps zmm" if "zmm" in line else "vfmadd*ps ymm"] += 1
        elif op == "fmla":
            counts["fmla"] += 1
    seen = "int8-dot" if counts["vpdpbusd"] + counts["vpmaddubsw"] + counts["sdot/udot"] else "fp32-fma"
    acts = (manifest.get("quantization") or {}).get("activations")
    if acts:
        isa = "int8-dot" if acts.startswith("int8") else "fp32-fma"
        out = {"isa": isa, "source": f"manifest: activations {acts!r}", "counts": counts}
        if isa != seen and err is None:
            out["warning"] = f"the manifest says {isa} but lib.so's instructions say {seen}"
        return out
    return {"isa": seen, "source": err or "objdump -d lib.so", "counts": counts}


# ------------------------------------------------------------------ one thread count (a subprocess)
def child(a) -> None:
    threads = measure.pin_threads(a)
    m = measure.machine()
    res = {"threads": threads, "peaks": measure_peaks(threads, a.buffer_gib, m["flags"])}
    res["artifact"] = measure.run_artifact(a.artifact, a.prompt_lens, a.contexts, a.decode_tokens, a.repeats)
    res["tvm_num_threads"] = tvm.runtime.num_threads()
    res["artifact"].pop("bench")
    res["decode_steps"] = a.decode_tokens
    a.child_out.write_text(json.dumps(res))


def analyse(runs: dict, shapes: dict, cfg, isa: dict) -> tuple[list, dict]:
    """Achieved bandwidth / FLOP/s of each run against that run's peaks -> (table rows, JSON result)."""
    goal_peak = "int8_dot" if isa["isa"] == "int8-dot" else "fp32_peak"
    rows, result = [], {"kernel_isa": isa, "runs": runs, "decode": [], "prefill": []}
    for n, r in runs.items():
        pk, art = r["peaks"], r["artifact"]
        for ctx, tok_s in art["decode"].items():
            d = art["decode_detail"][ctx]
            depth = int(ctx) + (r["decode_steps"] + 1) / 2  # mean positions attended over the run
            b = common.decode_bytes(shapes, cfg, depth)
            frac = b["total"] * tok_s / pk["bw"]
            single = common.decode_bytes(shapes, cfg, int(ctx) + 1)["total"] * d["single_step_tok_s"] / pk["bw"]
            result["decode"].append({"threads": n, "context": int(ctx), "steps": r["decode_steps"], "tok_s": tok_s,
                                     "bytes": b, "bw_achieved": b["total"] * tok_s, "bw_fraction": frac,
                                     "single_step_bw_fraction": single, **d})
            rows.append((f"decode ctx {ctx}", n, tok_s, f"{b['total'] * tok_s / 1e9:.1f} GB/s", f"{frac:.0%} of BW",
                         f"{'met' if frac >= GOAL_DECODE_BW else 'NOT met'} (>= {GOAL_DECODE_BW:.0%})"))
            rows.append((f"  {r['decode_steps']} in a row", n, None,
                         f"{d['tok_s_min']:.1f}..{d['tok_s_max']:.1f} tok/s", "", ""))
            outside = "n/a" if d["outside_kernels_ms"] is None else f"{d['outside_kernels_ms']:.3f} ms/token"
            rows.append(("  single step", n, d["single_step_tok_s"], "(fixed cache)", f"{single:.0%} of BW",
                         f"faults/step {d['faults_per_step']:.1f} (steady {d['faults_per_step_steady']:.1f}), "
                         f"outside kernels {outside}"))
        for tokens, tok_s in art["prefill"].items():
            fl = common.prefill_flops(cfg, int(tokens))
            rate = fl["needed"] * tok_s / int(tokens)
            fr = {"fp32": rate / pk["fp32_peak"], "int8_dot": rate / pk["int8_dot"] if "int8_dot" in pk else None}
            judged = rate / pk[goal_peak] if goal_peak in pk else None
            result["prefill"].append({"threads": n, "tokens": int(tokens), "tok_s": tok_s, "flops": fl,
                                      "flops_per_s": rate, "fraction": fr, "goal_fraction": judged})
            int8 = f" / {fr['int8_dot']:.0%} int8" if fr["int8_dot"] is not None else ""
            goal = ""
            if int(tokens) == GOAL_PREFILL_LEN and judged is not None:
                met = "met" if judged >= GOAL_PREFILL_PEAK else "NOT met"
                goal = f"{met} (>= {GOAL_PREFILL_PEAK:.0%} of {goal_peak})"
            rows.append((f"prefill {tokens}", n, tok_s, f"{rate / 1e9:.1f} GFLOP/s", f"{fr['fp32']:.0%} fp32{int8}",
                         goal))
    return rows, result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, default=None, help="a host TVM artifact (else built from the next two)")
    p.add_argument("--preset", default=None, help="preset name or config JSON: build with random INT4 weights")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to build (default: the bundled model)")
    p.add_argument("--thread-counts", type=common.lengths, default=[1, 2],
                   help="thread counts to measure, each in a fresh process (default 1,2; --threads N: only N)")
    p.add_argument("--buffer-gib", type=float, default=1.0, help="bandwidth buffer size (default 1 GiB)")
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    common.add_args(p)
    a = p.parse_args(argv)
    if a.child_out:
        return child(a)
    if a.threads:
        a.thread_counts = [a.threads]

    if a.artifact is None:
        ckpt = None if a.preset else (a.checkpoint or DEFAULT_MODEL_DIR)
        name = Path(a.preset).stem if a.preset else Path(ckpt).name
        a.artifact = common.cached_artifact(a.work, f"{name}-host", "host", a.preset, ckpt, rebuild=a.rebuild)
    try:
        manifest = read_manifest(a.artifact)
        if manifest.get("backend") != "tvm" or not manifest.get("runs_on_host"):
            raise ArtifactError(f"{a.artifact}: expected a TVM artifact for this machine (target host), got backend "
                                f"{manifest.get('backend')!r}, target {manifest['target']['name']!r}")
        shapes = common.param_shapes(a.artifact)
    except ArtifactError as e:
        sys.exit(f"error: {e}")
    cfg = MobileMoEConfig.from_dict(manifest["config"], source=f"{a.artifact}/manifest.json")
    isa = kernel_isa(a.artifact, manifest)
    mach = measure.machine()
    runs = {}
    for n in a.thread_counts:
        log(f"measuring with {n} thread(s) in a fresh process")
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, "-m", "bench.roofline", "--child-out", str(out), "--threads", str(n), "--artifact", str(a.artifact),
               "--buffer-gib", str(a.buffer_gib), "--prompt-lens", ",".join(map(str, a.prompt_lens)),
               "--contexts", ",".join(map(str, a.contexts)), "--decode-tokens", str(a.decode_tokens),
               "--repeats", str(a.repeats)]
        env = {**os.environ, "TVM_NUM_THREADS": str(n), "OMP_NUM_THREADS": str(n)}
        if subprocess.run(cmd, env=env, cwd=common.ROOT).returncode:
            sys.exit(f"error: the {n}-thread measurement failed (see above)")
        runs[n] = json.loads(out.read_text())
        out.unlink()

    rows, result = analyse(runs, shapes, cfg, isa)
    result.update(machine={k: v for k, v in mach.items() if k != "flags"}, artifact=str(a.artifact), model=cfg.name)
    mib = 2**20
    b = common.decode_bytes(shapes, cfg, a.contexts[0] + 1)
    print(f"machine: {mach['cpu']} ({mach['llvm_mcpu']}), {mach['cores']} cores; load average at start "
          f"{mach['load_average'][0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    print(f"artifact: {a.artifact} ({cfg.name}); kernels: {isa['isa']} ({isa['source']}; lib.so {isa['counts']})"
          + (f" WARNING: {isa['warning']}" if "warning" in isa else ""))
    print(f"decode bytes/token at ctx {a.contexts[0]}: {b['total'] / mib:.1f} MiB = weights {b['weights'] / mib:.1f} "
          f"(INT4 codes {b['int4_codes'] / mib:.1f}, scales {b['int4_scales'] / mib:.1f}, routed experts top-k "
          f"{b['routed_experts'] / mib:.1f}, float {b['float'] / mib:.2f}, embedding row "
          f"{b['embedding_row'] / 1024:.1f} KiB) + KV cache {b['kv_cache'] / mib:.2f}; mobilemoe.config "
          f"int4_active_bytes: {b['config_weights'] / mib:.1f} MiB ({b['weights'] / b['config_weights'] - 1:+.2%})")
    fl = common.prefill_flops(cfg, a.prompt_lens[-1])
    print(f"prefill FLOPs ({a.prompt_lens[-1]} tokens): {fl['needed'] / 1e9:.1f} G needed (mobilemoe.config "
          f"flops_per_token x tokens, LM head once) vs {fl['config_x_tokens'] / 1e9:.1f} G config x tokens")
    print(f"\n{'threads':<8}{'BW TVM sum':>12}{'BW torch sum':>14}{'measured BW':>13}{'fp32 TVM FMA':>14}"
          f"{'fp32 torch mm':>15}{'int8 dot':>12}{'CPU/wall':>10}")
    for n, r in runs.items():
        pk = r["peaks"]
        dot = f"{pk['int8_dot'] / 1e9:.0f} GOP/s" if "int8_dot" in pk else "n/a"
        print(f"{n:<8}{pk['bw_tvm_sum'] / 1e9:>7.1f} GB/s{pk['bw_torch_sum'] / 1e9:>9.1f} GB/s"
              f"{pk['bw'] / 1e9:>8.1f} GB/s{pk['fp32_tvm_fma'] / 1e9:>8.0f} GFLOP/s"
              f"{pk['fp32_torch_mm'] / 1e9:>7.0f} GFLOP/s{dot:>12}{pk['cpu_per_wall_tvm_sum']:>10.2f}")
    print(f"\n{'phase':<18}{'threads':>8}{'tok/s':>10}{'achieved':>16}{'fraction':>20}   goal")
    for name, n, tok_s, ach, frac, goal in rows:
        rate = "" if tok_s is None else f"{tok_s:.1f}"
        print(f"{name:<18}{n:>8}{rate:>10}{ach:>16}{frac:>20}   {goal}")
    for n, r in runs.items():
        print(f"{n} thread(s): TVM pool {r['tvm_num_threads']} thread(s); artifact run "
              f"{measure.thread_check(r['artifact']['cpu_per_wall'], n)}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
