"""tir_kernels/moe_grouped.py: routing plan and grouped prefill GEMMs against a numpy reference."""

import numpy as np
import pytest
import torch
import tvm
from tvm.target import Target

from tir_kernels import schedule_int4_kernels
from tir_kernels.moe_grouped import (
    moe_grouped_down_combine,
    moe_grouped_gate_up,
    moe_route_plan,
    schedule_grouped,
)
from mobilemoe.quant import dequantize_int4, pack_int4, quantize_int4

HOST = Target({"kind": "llvm", "num-cores": 2})
ANDROID = Target({"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon", "+dotprod"]})
DEV = tvm.cpu()
RTOL = 1e-4
E, TOP_K = 6, 2


def build(func, lanes=None, target=HOST):
    if lanes is not None:
        func = schedule_grouped(func, lanes)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def call(ex, outs, *arrays):
    """Run ex["main"] on numpy inputs and fresh outputs [(shape, dtype)]; -> output arrays."""
    outs = [tvm.runtime.empty(shape, dtype, DEV) for shape, dtype in outs]
    ex["main"](*[tvm.runtime.tensor(a, DEV) for a in arrays], *outs)
    return [o.numpy() for o in outs]


def weights(fmt, e, n, k, seed):
    """(kernel weight args, float64 reference [e, n, k])."""
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    if fmt == "float32":
        return [w.numpy()], w.double().numpy()
    codes, scales = quantize_int4(w)
    return [pack_int4(codes).numpy(), scales.numpy()], dequantize_int4(codes, scales).double().numpy()


def poison(args, unused):
    """NaN in the weights (float) or scales (INT4) of experts no token routes to."""
    args = [a.copy() for a in args]
    args[-1][unused] = np.nan
    return args


# (tokens, experts the tokens may route to): T=1, T=2, a ragged T=37 over all experts, and T=37
# crowded onto two experts (every other expert empty).
CASES = [(1, None), (2, None), (37, None), (37, [1, 4])]


def routing(t, allowed, seed, index_dtype="int64"):
    rng = np.random.default_rng(seed)
    pool = np.arange(E) if allowed is None else np.asarray(allowed)
    ids = np.stack([rng.choice(pool, TOP_K, replace=False) for _ in range(t)]).astype(index_dtype)
    rw = rng.random((t, TOP_K)).astype(np.float32)
    return ids, rw / rw.sum(1, keepdims=True)


def plan(ids):
    order = np.argsort(ids.reshape(-1), kind="stable").astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(ids.reshape(-1), minlength=E))]).astype(np.int32)
    return offsets, order


def assert_close(got, ref):
    assert np.isfinite(got).all()
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= RTOL * scale, np.abs(got - ref).max() / scale


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
def test_route_plan_is_a_stable_counting_sort(index_dtype):
    ex = build(moe_route_plan(E, TOP_K, index_dtype))
    for t, allowed in CASES:
        ids, _ = routing(t, allowed, seed=t, index_dtype=index_dtype)
        offsets, order = call(ex, [((E + 1,), "int32"), ((t * TOP_K,), "int32")], ids)
        ref_offsets, ref_order = plan(ids)
        np.testing.assert_array_equal(offsets, ref_offsets)
        np.testing.assert_array_equal(order, ref_order)


SCHEDULES = pytest.mark.parametrize("lanes", [None, 8, 4], ids=["naive", "lanes8", "lanes4"])
FORMATS = pytest.mark.parametrize("fmt", ["int4", "float32"])


@SCHEDULES
@FORMATS
@pytest.mark.parametrize("n,k", [(64, 128), (34, 96)])  # (34, 96): 2-row blocks, 4 lanes only
def test_grouped_gate_up(fmt, lanes, n, k):
    w_args, w_ref = weights(fmt, E, n, k, seed=1)
    ex = build(moe_grouped_gate_up(E, n, k, TOP_K, fmt), lanes)
    for t, allowed in CASES:
        ids, _ = routing(t, allowed, seed=t)
        offsets, order = plan(ids)
        x = np.random.default_rng(t).standard_normal((t, k)).astype(np.float32)
        unused = np.setdiff1d(np.arange(E), ids)
        (y,) = call(ex, [((t * TOP_K, n), "float32")], x, offsets, order, *poison(w_args, unused))
        # sorted row r: token order[r] // k through expert ids.flat[order[r]]
        ref = np.einsum("rk,rnk->rn", x[order // TOP_K], w_ref[ids.reshape(-1)[order]])
        assert_close(y, ref)


@SCHEDULES
@FORMATS
@pytest.mark.parametrize("n,k", [(64, 128), (34, 64)])
def test_grouped_down_combine(fmt, lanes, n, k):
    w_args, w_ref = weights(fmt, E, n, k, seed=2)
    ex = build(moe_grouped_down_combine(E, n, k, TOP_K, fmt), lanes)
    for t, allowed in CASES:
        ids, rw = routing(t, allowed, seed=t)
        offsets, order = plan(ids)
        a = np.random.default_rng(t).standard_normal((t, TOP_K, k)).astype(np.float32)  # (token, slot)
        unused = np.setdiff1d(np.arange(E), ids)
        (y,) = call(ex, [((t, n), "float32")], a.reshape(t * TOP_K, k)[order], offsets, order, rw,
                    *poison(w_args, unused))
        assert_close(y, np.einsum("tj,tjk,tjnk->tn", rw, a, w_ref[ids]))


def test_float_k_without_whole_groups_stays_naive():
    func = schedule_grouped(moe_grouped_gate_up(E, 16, 40, TOP_K, "float32"), 8)
    assert func.attrs["tirx.is_scheduled"] and "T.parallel" not in func.script()
    w_args, w_ref = weights("float32", E, 16, 40, seed=3)
    ids, _ = routing(5, None, seed=0)
    offsets, order = plan(ids)
    x = np.random.default_rng(0).standard_normal((5, 40)).astype(np.float32)
    (y,) = call(build(func), [((5 * TOP_K, 16), "float32")], x, offsets, order, *w_args)
    assert_close(y, np.einsum("rk,rnk->rn", x[order // TOP_K], w_ref[ids.reshape(-1)[order]]))


def test_schedule_int4_kernels_schedules_grouped_kernels():
    mod = tvm.IRModule({"gu": moe_grouped_gate_up(E, 64, 128, TOP_K), "plan": moe_route_plan(E, TOP_K),
                        "down": moe_grouped_down_combine(E, 64, 128, TOP_K, "float32")})
    out = schedule_int4_kernels(mod, HOST)
    assert out["gu"].attrs["tirx.is_scheduled"] and "T.parallel" in out["gu"].script()
    assert out["down"].attrs["tirx.is_scheduled"] and "T.parallel" in out["down"].script()
    assert out["plan"].same_as(mod["plan"])  # serial by design, already marked scheduled


@pytest.mark.parametrize("make", [moe_grouped_gate_up, moe_grouped_down_combine])
def test_android_arm64_codegen(make):
    mod = schedule_int4_kernels(tvm.IRModule({"main": make(32, 256, 512, 4)}), ANDROID)
    mod["main"] = mod["main"].with_attr("global_symbol", "main")
    asm = tvm.compile(mod, target=ANDROID).mod.inspect_source("asm")
    assert "fmla" in asm and "ushr" in asm  # NEON FMA, nibbles unpacked by constant shifts


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"moe_grouped_gate_up_int4: weight \[N=64, K=48\]"):
        moe_grouped_gate_up(E, 64, 48, TOP_K)
    with pytest.raises(ValueError, match="top_k <= num_experts"):
        moe_grouped_down_combine(2, 64, 64, 3)
    with pytest.raises(ValueError, match="weights must be one of"):
        moe_grouped_gate_up(E, 64, 64, TOP_K, "int8")
    with pytest.raises(ValueError, match="expert ids must be one of"):
        moe_route_plan(E, TOP_K, "int16")
    with pytest.raises(ValueError, match="not a grouped kernel"):
        schedule_grouped(moe_route_plan(E, TOP_K), 8)
