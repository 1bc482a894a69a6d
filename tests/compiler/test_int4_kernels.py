"""kernels: INT4 matmul and MoE expert kernels against numpy on mobilemoe.quant's dequant."""

import numpy as np
import pytest
import torch
import tvm
from tvm import tirx
from tvm.target import Target

from tir_kernels import (
    int4_matmul,
    moe_gemv,
    moe_gemv_per_slot,
    moe_gemv_weighted_sum,
    schedule_int4_kernels,
    schedule_row_reduction,
)
from mobilemoe.quant import dequantize_int4, pack_int4, quantize_int4

HOST = Target({"kind": "llvm", "num-cores": 2})
ANDROID = Target({"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon", "+dotprod"]})
RTOL = 1e-4
DEV = tvm.cpu()


def int4_weight(*shape, seed=0):
    """Packed uint32 codes, fp16 scales and the float64 dequantized reference of a random weight."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    codes, scales = quantize_int4(w)
    return pack_int4(codes).numpy(), scales.numpy(), dequantize_int4(codes, scales).double().numpy()


# None: the kernel as written; 8 / 4: scheduled with 8 word lanes (AVX2+) or 4 (NEON's choice).
SCHEDULES = pytest.mark.parametrize("lanes", [None, 8, 4], ids=["unscheduled", "lanes8", "lanes4"])


def build(func: tirx.PrimFunc, lanes: int | None, target: Target = HOST):
    if lanes is not None:
        func = schedule_row_reduction(func, lanes=lanes)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def run(ex, out_shape, *arrays):
    args = [tvm.runtime.tensor(a, DEV) for a in arrays]
    out = tvm.runtime.empty(out_shape, "float32", DEV)
    ex["main"](*args, out)
    return out.numpy()


def assert_close(got, ref):
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= RTOL * scale, np.abs(got - ref).max() / scale


@SCHEDULES
# (34, 96): ragged row blocks (2 rows) and K % 64 != 0 (4 lanes) in the schedule.
@pytest.mark.parametrize("n,k", [(64, 128), (34, 96), (256, 512)])
def test_int4_matmul(n, k, lanes):
    w, s, w_ref = int4_weight(n, k)
    ex = build(int4_matmul(n, k), lanes)
    rng = np.random.default_rng(0)
    for m in (1, 7, 64):  # one compiled kernel, dynamic M
        x = rng.standard_normal((m, k)).astype(np.float32)
        assert_close(run(ex, (m, n), x, w, s), x @ w_ref.T)


def routing(t, top_k, num_experts, index_dtype, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(t)])
    rw = rng.random((t, top_k)).astype(np.float32)
    return ids.astype(index_dtype), rw / rw.sum(-1, keepdims=True)


def poison_unselected(s, ids):
    """NaN scales for every expert no token routes to: a kernel reading them would return NaN."""
    s = s.copy()
    s[np.setdiff1d(np.arange(s.shape[0]), ids)] = np.nan
    return s


E, N, K, TOP_K = 6, 64, 128, 2


@SCHEDULES
@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
def test_moe_gemv(lanes, index_dtype):
    w, s, w_ref = int4_weight(E, N, K, seed=1)
    ex = build(moe_gemv(E, N, K, TOP_K, index_dtype), lanes)
    for t in (1, 5):
        ids, _ = routing(t, TOP_K, E, index_dtype, seed=t)
        x = np.random.default_rng(t).standard_normal((t, K)).astype(np.float32)
        ref = np.einsum("tk,tjnk->tjn", x, w_ref[ids])
        assert_close(run(ex, (t, TOP_K, N), x, ids, w, poison_unselected(s, ids)), ref)


@SCHEDULES
def test_moe_gemv_per_slot(lanes):
    w, s, w_ref = int4_weight(E, N, K, seed=2)
    ex = build(moe_gemv_per_slot(E, N, K, TOP_K), lanes)
    for t in (1, 5):
        ids, _ = routing(t, TOP_K, E, "int32", seed=t)
        x = np.random.default_rng(t).standard_normal((t, TOP_K, K)).astype(np.float32)
        ref = np.einsum("tjk,tjnk->tjn", x, w_ref[ids])
        assert_close(run(ex, (t, TOP_K, N), x, ids, w, poison_unselected(s, ids)), ref)


@SCHEDULES
def test_moe_gemv_weighted_sum(lanes):
    w, s, w_ref = int4_weight(E, N, K, seed=3)
    ex = build(moe_gemv_weighted_sum(E, N, K, TOP_K), lanes)
    for t in (1, 5):
        ids, rw = routing(t, TOP_K, E, "int32", seed=t)
        x = np.random.default_rng(t).standard_normal((t, TOP_K, K)).astype(np.float32)
        ref = np.einsum("tj,tjk,tjnk->tn", rw, x, w_ref[ids])
        assert_close(run(ex, (t, N), x, ids, rw, w, poison_unselected(s, ids)), ref)


def test_schedule_int4_kernels_picks_kernels_by_attr():
    @tvm.script.tirx.prim_func(private=True, s_tir=True)
    def other(a: tvm.script.tirx.Buffer((4,), "float32")):
        a[0] = tvm.script.tirx.float32(1)

    mod = tvm.IRModule({"mm": int4_matmul(64, 128), "moe": moe_gemv(E, N, K, TOP_K), "other": other})
    mod = schedule_int4_kernels(mod, HOST)
    assert mod["mm"].attrs["tirx.is_scheduled"] and mod["moe"].attrs["tirx.is_scheduled"]
    assert mod["other"].same_as(other)
    again = schedule_int4_kernels(mod, HOST)  # already scheduled: left alone
    assert again["mm"].same_as(mod["mm"])


@pytest.mark.parametrize(
    "func",
    [int4_matmul(256, 512), moe_gemv(E, N, K, TOP_K), moe_gemv_weighted_sum(E, N, K, TOP_K)],
    ids=["int4_matmul", "moe_gemv", "moe_gemv_weighted_sum"],
)
def test_android_arm64_codegen(func):
    mod = schedule_int4_kernels(tvm.IRModule({"main": func}), ANDROID)
    mod["main"] = mod["main"].with_attr("global_symbol", "main")
    asm = tvm.compile(mod, target=ANDROID).mod.inspect_source("asm")
    assert "fmla" in asm and "ushr" in asm  # NEON FMA, nibbles unpacked by constant shifts


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"int4_matmul: weight \[N=64, K=48\].*multiple of 32"):
        int4_matmul(64, 48)
    with pytest.raises(ValueError, match="top_k <= num_experts"):
        moe_gemv(2, 64, 64, 3)
    with pytest.raises(ValueError, match="expert ids must be one of"):
        moe_gemv(4, 64, 64, 2, index_dtype="int16")
    with pytest.raises(ValueError, match="activations must be float32"):
        int4_matmul(64, 64, dtype="float16")
