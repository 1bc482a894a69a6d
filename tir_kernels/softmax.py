"""Row softmax for CPUs: max, exp-and-sum and scale passes over each row in float32 vectors.

    softmax_rows(x [n, t]) -> y [n, t],  y[i] = exp(x[i] - max x[i]) / sum exp(x[i] - max x[i])

n and t are symbolic (the attention scores [1, nkv, rep, S, T] viewed as [nkv * rep * S, T]). TVM's
legalized softmax runs scalar loops with libm's expf (14% of a 512-token mobilemoe-s prefill); here
every pass is ``lanes`` wide with a scalar tail, the row maximum and sum are lane-wise then reduced
by a shuffle tree, and exp is a polynomial in vector arithmetic (Cephes expf: Cody-Waite reduction
x = n ln2 + r, |r| <= ln2 / 2, degree-7 polynomial, 2^n built in the exponent bits): relative error
~2e-7, no call. Arguments are x - max <= 0; below -87 (a masked score) exp is exactly 0, never a
denormal (a denormal probability makes every product of p.V take a microcode assist on x86).
Rows run in parallel, unless there are few (launch.py). Scheduled by hand (``tirx.is_scheduled``); passes/softmax_rows.py puts it in.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .launch import SERIAL_MAX_ELEMENTS
from .parse_cache import parsed_once

KERNEL = "softmax_rows"
_LOG2E, _C1, _C2 = 1.44269504088896341, 0.693359375, -2.12194440e-4
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def exp_le0(x, lanes: int):
    """exp(x) for float32 (x lanes) x <= 0, as TIR arithmetic (see the module doc)."""
    vt, it = (f"float32x{lanes}", f"int32x{lanes}") if lanes > 1 else ("float32", "int32")

    def c(v, dtype=vt):
        return tirx.Broadcast(tirx.const(v, dtype.split("x")[0]), lanes) if lanes > 1 else tirx.const(v, dtype)
    low = x < c(-87.0)
    x = tirx.Max(x, c(-87.0))
    n = tirx.floor(x * c(_LOG2E) + c(0.5))
    r = x - n * c(_C1) - n * c(_C2)
    p = c(_P[0])
    for coef in _P[1:]:
        p = p * r + c(coef)
    p = p * r * r + r + c(1.0)
    bits = (tirx.Cast(it, n) + c(127, it)) << c(23, it)
    # below -87 exactly 0 (exp there is < 1.7e-38): a masked score must not become a denormal
    # probability once divided by the row sum, since every product with a denormal then takes a
    # microcode assist on x86 (p.V of a 512-token prefill ran 80x slower: 0.6 GFLOP/s)
    return tirx.Select(low, c(0.0), p * tirx.reinterpret(vt, bits))


def lane_reduce(vec, lanes: int, op):
    """op (tirx.Max, tirx.Add, ...) over the `lanes` lanes of a vector: a halving tree of shuffles."""
    while lanes > 1:
        half = lanes // 2
        vec = op(tirx.Shuffle([vec], list(range(half))), tirx.Shuffle([vec], list(range(half, lanes))))
        lanes = half
    return vec


@parsed_once
def softmax_rows(lanes: int = 16) -> tirx.PrimFunc:
    """PrimFunc (x [n, t] float32) -> y [n, t], lanes-wide passes (16: AVX-512, 4: NEON)."""
    if lanes not in (1, 2, 4, 8, 16):
        raise ValueError(f"{KERNEL}: lanes must be 1, 2, 4, 8 or 16, got {lanes}")

    def vec(c):
        return tirx.Ramp(c * lanes, 1, lanes)

    @T.macro
    def row(x, y, t, i):
        acc = T.alloc_buffer((lanes,), "float32")  # default scope: on the stack (int4_dot._STACK_NOTE)
        red = T.alloc_buffer((2,), "float32")  # row max, row sum
        acc[T.ramp(0, 1, lanes)] = T.Broadcast(T.float32(-3.4028234663852886e38), lanes)
        for c in range(t // lanes):
            acc[T.ramp(0, 1, lanes)] = T.max(acc[T.ramp(0, 1, lanes)], x[i, vec(c)])
        red[0] = lane_reduce(acc[T.ramp(0, 1, lanes)], lanes, tirx.Max)
        for j in range(t // lanes * lanes, t):
            red[0] = T.max(red[0], x[i, j])
        acc[T.ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
        for c in range(t // lanes):
            y[i, vec(c)] = exp_le0(x[i, vec(c)] - T.Broadcast(red[0], lanes), lanes)
            acc[T.ramp(0, 1, lanes)] = acc[T.ramp(0, 1, lanes)] + y[i, vec(c)]
        red[1] = lane_reduce(acc[T.ramp(0, 1, lanes)], lanes, tirx.Add)
        for j in range(t // lanes * lanes, t):
            y[i, j] = exp_le0(x[i, j] - red[0], 1)
            red[1] = red[1] + y[i, j]
        for c in range(t // lanes):
            y[i, vec(c)] = y[i, vec(c)] * T.Broadcast(T.float32(1) / red[1], lanes)
        for j in range(t // lanes * lanes, t):
            y[i, j] = y[i, j] / red[1]

    @T.prim_func(private=True, s_tir=True)
    def func(x_handle: T.handle, y_handle: T.handle):
        T.func_attr({"mobilemoe.kernel": KERNEL, "op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        t = T.int64()
        x = T.match_buffer(x_handle, (n, t), "float32")
        y = T.match_buffer(y_handle, (n, t), "float32")
        with T.sblock("root"):  # a block body: Relax's reshape-pattern analysis expects one
            if n * t <= SERIAL_MAX_ELEMENTS:  # the routing weights of a few tokens: no parallel launch
                for i in range(n):
                    row(x, y, t, i)
            else:
                for i in T.parallel(n):
                    row(x, y, t, i)

    return func
