"""Prefill INT4 dot-product GEMMs: the M-tiled kernels (tir_kernels/int4_dot_gemm.py) against the
kernels they replace, side by side in one process, on mobilemoe-s shapes, as fractions of the int8
dot peak (bench/roofline.py's register-blocked vpdpbusd/sdot kernel).

    TVM_NUM_THREADS=1 python -m bench.int4_dot_gemm [--m 1 128 512] [--rounds 5] [--mt 4] [--rt 4]

Times are process CPU seconds (time.process_time; the host is shared), the best of --rounds
interleaved rounds. GOP/s counts 2 m n k (dense) or 2 T top_k n k (grouped) multiply-adds.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import tvm
from tvm.target import Target, codegen

from bench.roofline import DOT_ISAS, REG_BLOCKS, dot_kernel
from tir_kernels import int4_dot, int4_dot_gemm, moe_grouped
from tir_kernels.schedules import lanes_for
from mobilemoe.config import MobileMoEConfig
from mobilemoe.quant import pack_int4, quantize_int4

DEV = tvm.cpu()


def compile_(func, target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def cpu_s(fn, min_s=0.15):
    """Process CPU seconds per call (enough calls for min_s)."""
    fn()
    n, c0 = 0, time.process_time()
    while time.process_time() - c0 < min_s:
        fn()
        n += 1
    return (time.process_time() - c0) / n


def int8_peak(target) -> float:
    flags = open("/proc/cpuinfo").read().split()
    isa = next(f for f in DOT_ISAS if f in flags)
    _, lanes, _, ops = DOT_ISAS[isa]
    kern = compile_(dot_kernel(1, isa), target)
    buf = [tvm.runtime.tensor(np.ones((1, lanes * REG_BLOCKS), "int32")) for _ in range(2)]
    iters = 1 << 17
    return min(iters * REG_BLOCKS * ops / cpu_s(lambda: kern(*buf, iters)) for _ in range(3))


def weight(e, n, k, isa, seed=0):
    codes, scales = quantize_int4(torch.randn(e, n, k, generator=torch.Generator().manual_seed(seed)) * 0.02)
    w, s = (v.numpy() for v in int4_dot.dot_layout(isa, pack_int4(codes), scales))
    return w[0] if e == 1 else w, s[0] if e == 1 else s


def routing(t, e, top_k, rng):
    ids = np.argsort(-rng.standard_normal((t, e)), axis=1)[:, :top_k]
    order = np.argsort(ids.reshape(-1), kind="stable").astype("int32")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(ids.reshape(-1), minlength=e))]).astype("int32")
    rw = rng.random((t, top_k)).astype("float32")
    return offsets, order, rw


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 128, 512])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mt", type=int, default=None, help="token rows per tile (default: the ISA's)")
    ap.add_argument("--rt", type=int, default=int4_dot_gemm.R)
    ap.add_argument("--only", choices=["dense", "grouped"], default=None)
    a = ap.parse_args()
    if os.environ.get("TVM_NUM_THREADS") != "1":
        print("note: set TVM_NUM_THREADS=1 for one-core figures")
    target = Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 1})
    isa = int4_dot.dot_isa(target)
    peak = int8_peak(target)
    print(f"int8 dot peak (1 thread, CPU time): {peak / 1e9:.0f} GOP/s; MT={a.mt} R={a.rt}")
    cfg = MobileMoEConfig.from_name("mobilemoe-s")
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    rng = np.random.default_rng(0)

    def report(name, m, ops, old, new):
        print(f"{name:<34} m={m:<4} old {ops / old / 1e9:6.1f} GOP/s ({ops / old / peak:5.1%})  "
              f"new {ops / new / 1e9:6.1f} GOP/s ({ops / new / peak:5.1%})  new/old {old / new:4.2f}x", flush=True)

    if a.only in (None, "dense"):
        dense = {"qkv": (q + 2 * kv, h), "o": (h, q), "shared gate_up": (2 * cfg.shared_expert_hidden, h),
                 "shared down": (h, cfg.shared_expert_hidden)}
        for name, (n, k) in dense.items():
            w, s = weight(1, n, k, isa)
            old = compile_(int4_dot.int4_matmul_dot(n, k, isa), target)
            new = compile_(int4_dot_gemm.int4_matmul_dot_tiled(n, k, isa, a.mt, a.rt), target)
            for m in a.m:
                args = [tvm.runtime.tensor(v) for v in (rng.standard_normal((m, k)).astype("float32"), w, s)]
                yo, yn = tvm.runtime.empty((m, n), "float32"), tvm.runtime.empty((m, n), "float32")
                t_old = min(cpu_s(lambda: old(*args, yo)) for _ in range(a.rounds))
                t_new = min(cpu_s(lambda: new(*args, yn)) for _ in range(a.rounds))
                assert np.allclose(yo.numpy(), yn.numpy(), rtol=1e-4, atol=1e-4 * np.abs(yo.numpy()).max())
                report(f"int4_matmul {name} {n}x{k}", m, 2 * m * n * k, t_old, t_new)

    if a.only in (None, "grouped"):
        e, top_k, ih = cfg.num_experts, cfg.top_k, cfg.expert_hidden
        lanes = lanes_for(target)
        for op, n, k in (("gate_up", 2 * ih, h), ("down_combine", h, ih)):
            w, s = weight(e, n, k, isa, seed=1)
            il = int4_dot.interleave_for(isa, n, k)
            build = getattr(moe_grouped, f"moe_grouped_{op}")
            old = compile_(build(e, n, k, top_k, lanes=lanes, interleave=il), target)
            new = compile_(int4_dot_gemm.moe_grouped_dot(op, e, n, k, top_k, isa, a.mt, a.rt), target)
            for m in a.m:
                offsets, order, rw = routing(m, e, top_k, rng)
                x = rng.standard_normal((m if op == "gate_up" else m * top_k, k)).astype("float32")
                ins = [x, offsets, order] + ([rw] if op == "down_combine" else []) + [w, s]
                args = [tvm.runtime.tensor(v) for v in ins]
                shape = (m * top_k, n) if op == "gate_up" else (m, n)
                yo, yn = tvm.runtime.empty(shape, "float32"), tvm.runtime.empty(shape, "float32")
                t_old = min(cpu_s(lambda: old(*args, yo)) for _ in range(a.rounds))
                t_new = min(cpu_s(lambda: new(*args, yn)) for _ in range(a.rounds))
                ref = yo.numpy()
                err = np.abs(yn.numpy() - ref).max() / np.abs(ref).max()
                assert err < 3e-2, err  # old: fp32 activations, new: int8
                report(f"moe_grouped_{op} {e}x{n}x{k} top{top_k}", m, 2 * m * top_k * n * k, t_old, t_new)


if __name__ == "__main__":
    main()
