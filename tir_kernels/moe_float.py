"""Float sparse-dispatch expert kernels (TE), used when weights stay float (`--quant none`).

Same contracts as the INT4 kernels in moe_gemv.py, with float stacked weights:
    moe_gate_up(x [T, H], ids [T, k], w13 [E, 2I, H])              -> [T, k, 2I]
        y[t, j, i] = sum_h x[t, h] * w13[ids[t, j], i, h]
    moe_down_combine(a [T, k, I], ids [T, k], rw [T, k], w2 [E, H, I]) -> [T, H]
        y[t, o] = sum_j rw[t, j] * sum_i a[t, j, i] * w2[ids[t, j], o, i]
Only the selected experts' rows are read (gather by expert id inside the reduction). T is dynamic.
"""
from __future__ import annotations

from tvm import te


def moe_gate_up(x: te.Tensor, ids: te.Tensor, w13: te.Tensor) -> te.Tensor:
    T, H = x.shape
    k = ids.shape[1]
    N = w13.shape[1]
    h = te.reduce_axis((0, H), name="h")
    return te.compute((T, k, N), lambda t, j, i: te.sum(x[t, h] * w13[ids[t, j], i, h], axis=h),
                      name="moe_gate_up")


def moe_down_combine(a: te.Tensor, ids: te.Tensor, rw: te.Tensor, w2: te.Tensor) -> te.Tensor:
    T, k, I = a.shape
    H = w2.shape[1]
    j = te.reduce_axis((0, k), name="j")
    i = te.reduce_axis((0, I), name="i")
    return te.compute((T, H), lambda t, o: te.sum(rw[t, j] * a[t, j, i] * w2[ids[t, j], o, i], axis=[j, i]),
                      name="moe_down_combine")
