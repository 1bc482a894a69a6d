"""Prefill MoE expert kernels: grouped by expert (moe_grouped.py) vs the per-token GEMV baseline.

    python -m bench.moe_prefill [--tokens 128 512] [--experts 32] [--top-k 4] [--hidden 1024]
                                [--expert-hidden 512] [--rounds 5] [--skew 0]

Baseline (what prefill ran before grouping): moe_gemv (gate/up) + moe_gemv_weighted_sum (down and
combine), each (token, slot) reading its expert's INT4 weights. Grouped: moe_route_plan + grouped
gate/up + grouped down/combine. Both INT4 (mobilemoe.quant layout), scheduled by
schedule_int4_kernels for the host target (targets.get_target("host")), timed in this process with
time_evaluator. The SwiGLU between the projections is the same elementwise op on both sides and is
not timed. Kernels are timed in interleaved rounds (min per kernel) because a shared host is noisy.
--skew S routes with logits + S * log-rank bias (0: uniform; 2+: most tokens go to a few experts).
"""

import argparse

import numpy as np
import torch
import tvm

from tir_kernels import moe_gemv, moe_gemv_weighted_sum, schedule_int4_kernels
from tir_kernels.moe_grouped import moe_grouped_down_combine, moe_grouped_gate_up, moe_route_plan
from mobilemoe.quant import pack_int4, quantize_int4
from targets import get_target

DEV = tvm.cpu()


def compile_kernel(func, target):
    mod = schedule_int4_kernels(tvm.IRModule({"main": func}), target)
    mod["main"] = mod["main"].with_attr("global_symbol", "main")
    return tvm.compile(mod, target=target).mod


def int4_weight(e, n, k, seed):
    codes, scales = quantize_int4(torch.randn(e, n, k, generator=torch.Generator().manual_seed(seed)) * 0.02)
    return tvm.runtime.tensor(pack_int4(codes).numpy(), DEV), tvm.runtime.tensor(scales.numpy(), DEV)


def routing(t, e, top_k, skew, rng):
    logits = rng.standard_normal((t, e)) - skew * np.log1p(np.arange(e))
    ids = np.argsort(-logits, axis=1)[:, :top_k].astype("int64")
    rw = rng.random((t, top_k)).astype("float32")
    return ids, rw / rw.sum(1, keepdims=True)


def empty(shape, dtype="float32"):
    return tvm.runtime.empty(shape, dtype, DEV)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--expert-hidden", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skew", type=float, default=0.0)
    a = ap.parse_args()
    E, k, H, I = a.experts, a.top_k, a.hidden, a.expert_hidden
    target = get_target("host").tvm_target()
    print(f"target {target}; E={E} top_k={k} H={H} I={I} INT4; threads {tvm.runtime.num_threads()}")

    kernels = {  # name -> compiled module
        "gemv gate/up": compile_kernel(moe_gemv(E, 2 * I, H, k, "int64"), target),
        "gemv down+combine": compile_kernel(moe_gemv_weighted_sum(E, H, I, k, "int64"), target),
        "route plan": compile_kernel(moe_route_plan(E, k, "int64"), target),
        "grouped gate/up": compile_kernel(moe_grouped_gate_up(E, 2 * I, H, k), target),
        "grouped down+combine": compile_kernel(moe_grouped_down_combine(E, H, I, k), target),
    }
    w13, s13 = int4_weight(E, 2 * I, H, seed=0)
    w2, s2 = int4_weight(E, H, I, seed=1)
    rng = np.random.default_rng(0)
    for t in a.tokens:
        ids, rw = routing(t, E, k, a.skew, rng)
        x = rng.standard_normal((t, H)).astype("float32")
        act = rng.standard_normal((t, k, I)).astype("float32")  # SwiGLU output, (token, slot) order
        ids_t, rw_t, x_t = (tvm.runtime.tensor(v, DEV) for v in (ids, rw, x))
        offsets, order = empty((E + 1,), "int32"), empty((t * k,), "int32")
        kernels["route plan"]["main"](ids_t, offsets, order)  # the grouped down input is sorted rows
        act_sorted = tvm.runtime.tensor(act.reshape(t * k, I)[order.numpy()], DEV)
        args = {
            "gemv gate/up": [x_t, ids_t, w13, s13, empty((t, k, 2 * I))],
            "gemv down+combine": [tvm.runtime.tensor(act, DEV), ids_t, rw_t, w2, s2, empty((t, H))],
            "route plan": [ids_t, offsets, order],
            "grouped gate/up": [x_t, offsets, order, w13, s13, empty((t * k, 2 * I))],
            "grouped down+combine": [act_sorted, offsets, order, rw_t, w2, s2, empty((t, H))],
        }
        best = {name: float("inf") for name in kernels}
        for _ in range(a.rounds):
            for name, lib in kernels.items():
                timer = lib.time_evaluator("main", DEV, number=1, repeat=3, min_repeat_ms=100)
                best[name] = min(best[name], min(timer(*args[name]).results) * 1e3)
        # same results: the grouped rows are the GEMV's (token, slot) rows in sorted order
        gu_ref = args["gemv gate/up"][-1].numpy().reshape(t * k, 2 * I)[order.numpy()]
        gu_err = np.abs(args["grouped gate/up"][-1].numpy() - gu_ref).max() / np.abs(gu_ref).max()
        dn_ref = args["gemv down+combine"][-1].numpy()
        dn_err = np.abs(args["grouped down+combine"][-1].numpy() - dn_ref).max() / np.abs(dn_ref).max()
        counts = np.diff(offsets.numpy())
        print(f"\nT={t}: rows per expert min/median/max {counts.min()}/{int(np.median(counts))}/{counts.max()}, "
              f"{int((counts == 0).sum())} empty; grouped vs GEMV max rel err {max(gu_err, dn_err):.1e}")
        for name, ms in best.items():
            print(f"  {name:<22} {ms:8.3f} ms")
        base = best["gemv gate/up"] + best["gemv down+combine"]
        grouped = best["route plan"] + best["grouped gate/up"] + best["grouped down+combine"]
        flop = 2 * t * k * (2 * I * H + H * I)
        print(f"  baseline (per-token GEMV) {base:8.3f} ms {flop / base / 1e6:6.1f} GFLOP/s")
        print(f"  grouped                   {grouped:8.3f} ms {flop / grouped / 1e6:6.1f} GFLOP/s")
        print(f"  ratio baseline / grouped: {base / grouped:.2f}x (T={t})")


if __name__ == "__main__":
    main()
