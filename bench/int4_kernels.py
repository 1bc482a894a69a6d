"""Time the INT4 TVM kernels (kernels) unscheduled vs scheduled against fp32 numpy/torch.

    python -m bench.int4_kernels [--mcpu znver4] [--shapes 1024x1024 4096x4096] [--m 1 64]

GB/s counts the INT4 weight bytes a call reads (packed codes + fp16 scales).
"""

import argparse
import time

import numpy as np
import torch
import tvm
from tvm.target import Target, codegen

from tir_kernels import int4_matmul, moe_gemv, schedule_int4_kernels
from mobilemoe.quant import dequantize_int4, pack_int4, quantize_int4


def build(func, target):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=target).mod


def tvm_ms(lib, args, min_repeat_ms=200):
    timer = lib.time_evaluator("main", tvm.cpu(), number=1, repeat=5, min_repeat_ms=min_repeat_ms)
    return min(timer(*args).results) * 1e3


def wall_ms(fn, repeat=5, min_s=0.2):
    best = float("inf")
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_s:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mcpu", default=None, help="llvm mcpu, e.g. znver4; 'host': this CPU")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["1024x1024"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--skip-unscheduled", action="store_true")
    args = ap.parse_args()
    target = {"kind": "llvm", "num-cores": args.cores}
    if args.mcpu:  # without it LLVM targets baseline x86-64: SSE2, no FMA, software fp16 convert
        target["mcpu"] = codegen.llvm_get_system_cpu() if args.mcpu == "host" else args.mcpu
    target = Target(target)
    dev = tvm.cpu()
    print(f"target {target}  torch threads {torch.get_num_threads()}")
    big = np.ones(64 << 20, np.float32)
    copy_ms = wall_ms(lambda: big.copy(), repeat=3)
    print(f"numpy copy of 256 MiB: {2 * big.nbytes / copy_ms / 1e6:.1f} GB/s (read + write)")

    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        codes, scales = quantize_int4(torch.randn(n, k) * 0.02)
        w, s = pack_int4(codes).numpy(), scales.numpy()
        w_fp32 = dequantize_int4(codes, scales).numpy()
        wbytes = w.nbytes + s.nbytes
        func = int4_matmul(n, k)
        libs = {"scheduled": build(schedule_int4_kernels(tvm.IRModule({"main": func}), target)["main"], target)}
        if not args.skip_unscheduled:
            libs["unscheduled"] = build(func, target)
        for m in args.m:
            x = np.random.randn(m, k).astype(np.float32)
            tv = [tvm.runtime.tensor(a, dev) for a in (x, w, s)] + [tvm.runtime.empty((m, n), "float32", dev)]
            for name, lib in libs.items():
                ms = tvm_ms(lib, tv, min_repeat_ms=50 if name == "unscheduled" else 200)
                err = np.abs(tv[-1].numpy() - x @ w_fp32.T).max()
                print(f"int4_matmul N={n} K={k} M={m:<3} {name:<11} {ms:8.3f} ms "
                      f"{wbytes / ms / 1e6:6.2f} GB/s {2 * m * n * k / ms / 1e6:6.1f} GFLOP/s "
                      f"max|err| {err:.1e}")
            xt, wt = torch.from_numpy(x), torch.from_numpy(w_fp32)
            ms_np = wall_ms(lambda: x @ w_fp32.T)
            ms_t = wall_ms(lambda: torch.nn.functional.linear(xt, wt))
            best = min(ms_np, ms_t)
            print(f"fp32 matmul  N={n} K={k} M={m:<3} numpy {ms_np:.3f} ms, torch {ms_t:.3f} ms "
                  f"({w_fp32.nbytes / best / 1e6:.2f} GB/s fp32 weight, "
                  f"{2 * m * n * k / best / 1e6:.1f} GFLOP/s)")

    # decode MoE: 1 token, top-2 of 8 experts, gate/up-sized 1024x1024 experts
    e, n, k, top_k = 8, 1024, 1024, 2
    codes, scales = quantize_int4(torch.randn(e, n, k) * 0.02)
    w, s = pack_int4(codes).numpy(), scales.numpy()
    func = moe_gemv(e, n, k, top_k)
    lib = build(schedule_int4_kernels(tvm.IRModule({"main": func}), target)["main"], target)
    for t in (1, 16):
        x = np.random.randn(t, k).astype(np.float32)
        ids = np.stack([np.random.choice(e, top_k, replace=False) for _ in range(t)]).astype(np.int32)
        tv = [tvm.runtime.tensor(a, dev) for a in (x, ids, w, s)]
        tv.append(tvm.runtime.empty((t, top_k, n), "float32", dev))
        ms = tvm_ms(lib, tv)
        read = t * top_k * (w.nbytes + s.nbytes) // e
        print(f"moe_gemv E={e} N={n} K={k} top{top_k} T={t:<3} scheduled {ms:8.3f} ms "
              f"{read / ms / 1e6:6.2f} GB/s of selected expert weights")


if __name__ == "__main__":
    main()
