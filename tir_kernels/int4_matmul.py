"""INT4 weight-only matmul: Y[m, N] = X[m, K] @ dequant(W)^T, with m dynamic.

W is mobilemoe.quant's layout: packed codes uint32 [N, K // 8] and fp16 scales [N, K // 32]. The
dequantization is fused into the reduction (tir_kernels/dequant.py); the fp32 weight is never
stored. Two reduction blocks with the same body split the rows of X: "matmul" takes rows
[0, m - m % M_TILE) as whole tiles of M_TILE rows, "matmul_tail" the rest (all of them when m = 1);
"store" and "store_tail" copy their results ([m, N] floats) into y. The tiles let a schedule reuse
each dequantized weight vector for M_TILE rows with no bounds checks (a guarded dynamic tile does not
stay in registers). schedules.py finds the function by its attr ``mobilemoe.kernel = "int4_matmul"``.
"""

from tvm import tirx
from tvm.script import tirx as T

from .dequant import GROUP_SIZE, NIBBLES_PER_WORD, check_int4_shape, dequant_int4
from .parse_cache import parsed_once

KERNEL = "int4_matmul"
M_TILE = 4


@parsed_once
def int4_matmul(n: int, k: int, dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc (x [m, k], w uint32 [n, k // 8], scales fp16 [n, k // 32]) -> y [m, n]."""
    check_int4_shape(KERNEL, n, k, dtype)
    kw, kg = k // NIBBLES_PER_WORD, k // GROUP_SIZE

    @T.prim_func(private=True, s_tir=True)
    def func(
        x_handle: T.handle,
        w: T.Buffer((T.int64(n), T.int64(kw)), "uint32"),
        s: T.Buffer((T.int64(n), T.int64(kg)), "float16"),
        y_handle: T.handle,
    ):
        T.func_attr({"mobilemoe.kernel": KERNEL, "op_pattern": 8, "tirx.noalias": True,
                     "mobilemoe.dims": {"n": n, "k": k}})
        m = T.int64()
        x = T.match_buffer(x_handle, (m, T.int64(k)), dtype)
        y = T.match_buffer(y_handle, (m, T.int64(n)), dtype)
        # rows [0, m - m % M_TILE) in whole tiles, the rest in a tail; each block is the sole writer
        # of its rows (schedules need that), copied into y at the end.
        y_tiles = T.sblock_alloc_buffer((m // M_TILE * M_TILE, T.int64(n)), dtype)
        y_tail = T.sblock_alloc_buffer((m % M_TILE, T.int64(n)), dtype)
        for i_tile, i, j, r in T.grid(m // M_TILE, T.int64(M_TILE), T.int64(n), T.int64(k)):
            with T.sblock("matmul"):
                vi = T.axis.spatial(m // M_TILE * M_TILE, i_tile * M_TILE + i)
                vj, vr = T.axis.remap("SR", [j, r])
                with T.init():
                    y_tiles[vi, vj] = T.float32(0)
                y_tiles[vi, vj] = y_tiles[vi, vj] + x[vi, vr] * dequant_int4(
                    w[vj, vr // NIBBLES_PER_WORD], s[vj, vr // GROUP_SIZE], vr
                )
        for i, j, r in T.grid(m % M_TILE, T.int64(n), T.int64(k)):
            with T.sblock("matmul_tail"):
                vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                with T.init():
                    y_tail[vi, vj] = T.float32(0)
                y_tail[vi, vj] = y_tail[vi, vj] + x[m // M_TILE * M_TILE + vi, vr] * dequant_int4(
                    w[vj, vr // NIBBLES_PER_WORD], s[vj, vr // GROUP_SIZE], vr
                )
        for i, j in T.grid(m // M_TILE * M_TILE, T.int64(n)):
            with T.sblock("store"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = y_tiles[vi, vj]
        for i, j in T.grid(m % M_TILE, T.int64(n)):
            with T.sblock("store_tail"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[m // M_TILE * M_TILE + vi, vj] = y_tail[vi, vj]

    return func
