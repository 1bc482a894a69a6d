"""Sparse-dispatch INT4 expert kernels: each (token, slot) reads only its routed expert's weights.

Stacked experts use mobilemoe.quant's layout with a leading expert dim: packed codes uint32
[E, N, K // 8], fp16 scales [E, N, K // 32]. ``ids [T, top_k]`` (int32 or int64) picks the expert
of each slot and the kernel gathers that expert's rows itself, so unselected experts are never read
and no fp32 weight is stored. T (tokens) is dynamic.

- ``moe_gemv``: one input per token (gate/up projections)
  ``y[t, j, :] = x[t] @ dequant(W[ids[t, j]])^T`` -> [T, top_k, N]
- ``moe_gemv_per_slot``: one input per (token, slot) (down projection)
  ``y[t, j, :] = x[t, j] @ dequant(W[ids[t, j]])^T`` -> [T, top_k, N]
- ``moe_gemv_weighted_sum``: the down projection combined with the routing weights
  ``y[t, :] = sum_j rw[t, j] * (x[t, j] @ dequant(W[ids[t, j]])^T)`` -> [T, N]

Each has one reduction block named "moe_gemv" and the func attr ``mobilemoe.kernel`` set to its name,
which schedules.py dispatches on. They are GEMVs per slot, for decode: prefill uses the grouped
kernels of moe_grouped.py, which sort the tokens by expert and dequantize each weight once per call.
"""

from tvm import tirx
from tvm.script import tirx as T

from .dequant import GROUP_SIZE, NIBBLES_PER_WORD, check_int4_shape, dequant_int4
from .parse_cache import parsed_once

INDEX_DTYPES = ("int32", "int64")


def _check(kernel: str, num_experts: int, n: int, k: int, top_k: int, index_dtype: str, dtype: str):
    check_int4_shape(kernel, n, k, dtype)
    if num_experts <= 0 or not 0 < top_k <= num_experts:
        raise ValueError(f"{kernel}: need 0 < top_k <= num_experts, got {top_k} of {num_experts}")
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"{kernel}: expert ids must be one of {INDEX_DTYPES}, got {index_dtype!r}")


def _dims(num_experts: int, n: int, k: int, top_k: int, index_dtype: str) -> dict:
    """The func attr "mobilemoe.dims": what another implementation of the kernel needs (passes/select_dot_kernels.py)."""
    return {"num_experts": num_experts, "n": n, "k": k, "top_k": top_k, "index_dtype": index_dtype}


@parsed_once
def moe_gemv(
    num_experts: int, n: int, k: int, top_k: int, index_dtype: str = "int32", dtype: str = "float32"
) -> tirx.PrimFunc:
    """PrimFunc (x [T, k], ids [T, top_k], w [E, n, k // 8], scales [E, n, k // 32]) -> y [T, top_k, n]."""
    _check("moe_gemv", num_experts, n, k, top_k, index_dtype, dtype)
    kw, kg = k // NIBBLES_PER_WORD, k // GROUP_SIZE
    dims = _dims(num_experts, n, k, top_k, index_dtype)

    @T.prim_func(private=True, s_tir=True)
    def func(
        x_handle: T.handle,
        ids_handle: T.handle,
        w: T.Buffer((T.int64(num_experts), T.int64(n), T.int64(kw)), "uint32"),
        s: T.Buffer((T.int64(num_experts), T.int64(n), T.int64(kg)), "float16"),
        y_handle: T.handle,
    ):
        T.func_attr({"mobilemoe.kernel": "moe_gemv", "op_pattern": 8, "tirx.noalias": True, "mobilemoe.dims": dims})
        t = T.int64()
        x = T.match_buffer(x_handle, (t, T.int64(k)), dtype)
        ids = T.match_buffer(ids_handle, (t, T.int64(top_k)), index_dtype)
        y = T.match_buffer(y_handle, (t, T.int64(top_k), T.int64(n)), dtype)
        for it, ij, i_n, ir in T.grid(t, T.int64(top_k), T.int64(n), T.int64(k)):
            with T.sblock("moe_gemv"):
                vt, vj, vn, vr = T.axis.remap("SSSR", [it, ij, i_n, ir])
                with T.init():
                    y[vt, vj, vn] = T.float32(0)
                y[vt, vj, vn] = y[vt, vj, vn] + x[vt, vr] * dequant_int4(
                    w[T.Cast("int64", ids[vt, vj]), vn, vr // NIBBLES_PER_WORD],
                    s[T.Cast("int64", ids[vt, vj]), vn, vr // GROUP_SIZE],
                    vr,
                )

    return func


@parsed_once
def moe_gemv_per_slot(
    num_experts: int, n: int, k: int, top_k: int, index_dtype: str = "int32", dtype: str = "float32"
) -> tirx.PrimFunc:
    """PrimFunc (x [T, top_k, k], ids [T, top_k], w, scales) -> y [T, top_k, n]."""
    _check("moe_gemv_per_slot", num_experts, n, k, top_k, index_dtype, dtype)
    kw, kg = k // NIBBLES_PER_WORD, k // GROUP_SIZE
    dims = _dims(num_experts, n, k, top_k, index_dtype)

    @T.prim_func(private=True, s_tir=True)
    def func(
        x_handle: T.handle,
        ids_handle: T.handle,
        w: T.Buffer((T.int64(num_experts), T.int64(n), T.int64(kw)), "uint32"),
        s: T.Buffer((T.int64(num_experts), T.int64(n), T.int64(kg)), "float16"),
        y_handle: T.handle,
    ):
        T.func_attr(
            {"mobilemoe.kernel": "moe_gemv_per_slot", "op_pattern": 8, "tirx.noalias": True,
             "mobilemoe.dims": dims}
        )
        t = T.int64()
        x = T.match_buffer(x_handle, (t, T.int64(top_k), T.int64(k)), dtype)
        ids = T.match_buffer(ids_handle, (t, T.int64(top_k)), index_dtype)
        y = T.match_buffer(y_handle, (t, T.int64(top_k), T.int64(n)), dtype)
        for it, ij, i_n, ir in T.grid(t, T.int64(top_k), T.int64(n), T.int64(k)):
            with T.sblock("moe_gemv"):
                vt, vj, vn, vr = T.axis.remap("SSSR", [it, ij, i_n, ir])
                with T.init():
                    y[vt, vj, vn] = T.float32(0)
                y[vt, vj, vn] = y[vt, vj, vn] + x[vt, vj, vr] * dequant_int4(
                    w[T.Cast("int64", ids[vt, vj]), vn, vr // NIBBLES_PER_WORD],
                    s[T.Cast("int64", ids[vt, vj]), vn, vr // GROUP_SIZE],
                    vr,
                )

    return func


@parsed_once
def moe_gemv_weighted_sum(
    num_experts: int, n: int, k: int, top_k: int, index_dtype: str = "int32", dtype: str = "float32"
) -> tirx.PrimFunc:
    """PrimFunc (x [T, top_k, k], ids [T, top_k], routing weights [T, top_k], w, scales) -> y [T, n]."""
    _check("moe_gemv_weighted_sum", num_experts, n, k, top_k, index_dtype, dtype)
    kw, kg = k // NIBBLES_PER_WORD, k // GROUP_SIZE
    dims = _dims(num_experts, n, k, top_k, index_dtype)

    @T.prim_func(private=True, s_tir=True)
    def func(
        x_handle: T.handle,
        ids_handle: T.handle,
        rw_handle: T.handle,
        w: T.Buffer((T.int64(num_experts), T.int64(n), T.int64(kw)), "uint32"),
        s: T.Buffer((T.int64(num_experts), T.int64(n), T.int64(kg)), "float16"),
        y_handle: T.handle,
    ):
        T.func_attr(
            {"mobilemoe.kernel": "moe_gemv_weighted_sum", "op_pattern": 8, "tirx.noalias": True,
             "mobilemoe.dims": dims}
        )
        t = T.int64()
        x = T.match_buffer(x_handle, (t, T.int64(top_k), T.int64(k)), dtype)
        ids = T.match_buffer(ids_handle, (t, T.int64(top_k)), index_dtype)
        rw = T.match_buffer(rw_handle, (t, T.int64(top_k)), dtype)
        y = T.match_buffer(y_handle, (t, T.int64(n)), dtype)
        for it, i_n, ij, ir in T.grid(t, T.int64(n), T.int64(top_k), T.int64(k)):
            with T.sblock("moe_gemv"):
                vt, vn, vj, vr = T.axis.remap("SSRR", [it, i_n, ij, ir])
                with T.init():
                    y[vt, vn] = T.float32(0)
                y[vt, vn] = y[vt, vn] + rw[vt, vj] * x[vt, vj, vr] * dequant_int4(
                    w[T.Cast("int64", ids[vt, vj]), vn, vr // NIBBLES_PER_WORD],
                    s[T.Cast("int64", ids[vt, vj]), vn, vr // GROUP_SIZE],
                    vr,
                )

    return func
