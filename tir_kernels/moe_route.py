"""MoE routing in one CPU kernel: router logits, top-k and the routing weights of each token.

    moe_route(x [n, H], router [E, H] (, bias [E])) -> (weights [n, k] float32, ids [n, k] int64)

    logits[e] = x . router[e] (+ bias[e])
    scoring "softmax_topk":  p = softmax(logits); ids = top-k of p; weights = p[ids]
                             (/ their sum when norm_topk_prob)
    scoring "topk_softmax":  ids = top-k of logits; weights = softmax(logits[ids])

the meaning of mobilemoe.moe_op.route (passes/moe_op.emit_routing builds the same from R.matmul,
R.nn.softmax and R.topk). Those ops made four kernels a layer, one of them TVM's generic sort
(tvm.contrib.sort.topk: a packed call with heap allocations), and a parallel launch for the
softmax of one token's k weights; here it is one call. Top-k is k passes of an arg-max over the E
scores, ties to the lower expert id (torch.topk's choice on exact ties is unspecified; with float
logits ties do not occur in practice). The dot products are ``lanes`` wide; tokens run in
parallel only when there are many (launch.py). The router stays float32 (FLOAT_WEIGHTS).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .int4_dot import lane_sum
from .launch import SERIAL_MAX_ELEMENTS
from .softmax import exp_le0
from .parse_cache import parsed_once

KERNEL = "moe_route"
SCORINGS = ("topk_softmax", "softmax_topk")
NEG = -3.4028234663852886e38


@parsed_once
def moe_route(num_experts: int, hidden: int, top_k: int, scoring: str, norm_topk_prob: bool = False,
              bias: bool = False, lanes: int = 8) -> tirx.PrimFunc:
    """The fused routing PrimFunc (module doc): x [n, H], router [E, H], (bias [E]) -> (weights, ids)."""
    E, H, k = num_experts, hidden, top_k
    if scoring not in SCORINGS:
        raise ValueError(f"{KERNEL}: scoring must be one of {SCORINGS}, got {scoring!r}")
    if not 0 < k <= E:
        raise ValueError(f"{KERNEL}: top_k = {k} must lie in 1..{E} (the number of experts)")
    while H % lanes:
        lanes //= 2
    softmax_first = scoring == "softmax_topk"

    def bias_of(b, e):  # evaluated when the kernel is parsed: a load of b, or no term
        return b[e] if bias else tirx.const(0, "float32")

    @T.macro
    def row(x, w, b, rw, ids, i):
        s = T.alloc_buffer((E,), "float32")  # scores; default scope: on the stack (int4_dot._STACK_NOTE)
        acc = T.alloc_buffer((lanes,), "float32")
        red = T.alloc_buffer((2,), "float32")  # max, sum
        best = T.alloc_buffer((1,), "int64")
        for e in range(E):
            acc[T.ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
            for c in range(H // lanes):
                acc[T.ramp(0, 1, lanes)] = acc[T.ramp(0, 1, lanes)] + x[i, T.ramp(c * lanes, 1, lanes)] * w[
                    e, T.ramp(c * lanes, 1, lanes)]
            s[e] = lane_sum(acc[T.ramp(0, 1, lanes)], lanes) + bias_of(b, e)
        if softmax_first:
            red[0] = T.float32(NEG)
            for e in range(E):
                red[0] = T.max(red[0], s[e])
            red[1] = T.float32(0)
            for e in range(E):
                s[e] = exp_le0(s[e] - red[0], 1)
                red[1] = red[1] + s[e]
            for e in range(E):
                s[e] = s[e] / red[1]
        for j in range(k):  # arg-max, then masked out
            best[0] = T.int64(0)
            for e in range(1, E):
                if s[e] > s[best[0]]:
                    best[0] = T.Cast("int64", e)
            ids[i, j] = best[0]
            rw[i, j] = s[best[0]]
            s[best[0]] = T.float32(NEG)
        if not softmax_first:  # softmax of the k selected logits (the first is the largest)
            red[0] = rw[i, 0]
            red[1] = T.float32(0)
            for j in range(k):
                rw[i, j] = exp_le0(rw[i, j] - red[0], 1)
                red[1] = red[1] + rw[i, j]
            for j in range(k):
                rw[i, j] = rw[i, j] / red[1]
        elif norm_topk_prob:
            red[1] = T.float32(0)
            for j in range(k):
                red[1] = red[1] + rw[i, j]
            for j in range(k):
                rw[i, j] = rw[i, j] / red[1]

    @T.macro
    def body(x, w, b, rw, ids, n):
        if n * E <= SERIAL_MAX_ELEMENTS:  # decode and short prompts: no parallel launch
            for i in range(n):
                row(x, w, b, rw, ids, i)
        else:
            for i in T.parallel(n):
                row(x, w, b, rw, ids, i)

    attrs = {"mobilemoe.kernel": KERNEL, "op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True}

    if bias:
        @T.prim_func(private=True)
        def func(x_handle: T.handle, w: T.Buffer((T.int64(E), T.int64(H)), "float32"),
                 b: T.Buffer((T.int64(E),), "float32"), rw_handle: T.handle, ids_handle: T.handle):
            T.func_attr(attrs)
            n = T.int64()
            x = T.match_buffer(x_handle, (n, T.int64(H)), "float32")
            rw = T.match_buffer(rw_handle, (n, T.int64(k)), "float32")
            ids = T.match_buffer(ids_handle, (n, T.int64(k)), "int64")
            body(x, w, b, rw, ids, n)
        return func

    @T.prim_func(private=True)
    def func_nobias(x_handle: T.handle, w: T.Buffer((T.int64(E), T.int64(H)), "float32"), rw_handle: T.handle,
                    ids_handle: T.handle):
        T.func_attr(attrs)
        n = T.int64()
        x = T.match_buffer(x_handle, (n, T.int64(H)), "float32")
        rw = T.match_buffer(rw_handle, (n, T.int64(k)), "float32")
        ids = T.match_buffer(ids_handle, (n, T.int64(k)), "int64")
        body(x, w, w, rw, ids, n)
    return func_nobias
