"""int4_matmul for GPU targets: one reduction block, which dlight's GPU rules schedule.

    y[m, N] = x[m, K] @ dequant(W)^T      W: packed codes uint32 [N, K // 8], fp16 scales [N, K // 32]

The CPU kernel (int4_matmul.py) splits the rows of x into whole tiles and a tail, so its CPU
schedule can keep tiles in registers. No dlight GPU rule takes those blocks (dl.gpu.Fallback
returns None for them); an unscheduled kernel is then compiled into the *host* library, where on a
phone it would read OpenCL buffers through host pointers. And on a GPU the tile/tail split gains
nothing: one of the two blocks is always empty, an NDRange of size 0 (decode's m = 1 has no tile).

passes/use_gpu_int4_matmul.py (GPU lowering, before the dlight rules) swaps every int4_matmul
PrimFunc for this one: the same parameters (x, w, s, y), the same dequantization (dequant.py), one block
"matmul" that dlight's Matmul / GEMV / Fallback rules recognise as a dequantize-matmul.
"""
from tvm import tirx
from tvm.script import tirx as T

from .dequant import GROUP_SIZE, NIBBLES_PER_WORD, check_int4_shape, dequant_int4
from .parse_cache import parsed_once

KERNEL = "int4_matmul_gpu"


@parsed_once
def int4_matmul_gpu(n: int, k: int, dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc (x [m, k], w uint32 [n, k // 8], scales fp16 [n, k // 32]) -> y [m, n], m dynamic."""
    check_int4_shape(KERNEL, n, k, dtype)
    kw, kg = k // NIBBLES_PER_WORD, k // GROUP_SIZE

    @T.prim_func(private=True, s_tir=True)
    def func(
        x_handle: T.handle,
        w: T.Buffer((T.int64(n), T.int64(kw)), "uint32"),
        s: T.Buffer((T.int64(n), T.int64(kg)), "float16"),
        y_handle: T.handle,
    ):
        T.func_attr({"mobilemoe.kernel": KERNEL, "op_pattern": 4, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_handle, (m, T.int64(k)), dtype)
        y = T.match_buffer(y_handle, (m, T.int64(n)), dtype)
        for i, j, r in T.grid(m, T.int64(n), T.int64(k)):
            with T.sblock("matmul"):
                vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                with T.init():
                    y[vi, vj] = T.float32(0)
                y[vi, vj] = y[vi, vj] + x[vi, vr] * dequant_int4(
                    w[vj, vr // NIBBLES_PER_WORD], s[vj, vr // GROUP_SIZE], vr
                )

    return func
