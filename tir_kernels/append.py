"""Append along the last axis: the transposed key cache's per-step concatenation, as two row copies.

    append_last(a [d0, d1, d2, P], b [d0, d1, d2, S]) -> out [d0, d1, d2, P + S]
    out[.., :P] = a,  out[.., P:] = b                         (P, S symbolic; d0, d1, d2 static)

The key cache is stored transposed, [1, nkv, D, P] (mobilemoe/model.py), so a decode step appends
one column to each of the nkv * D rows. TVM legalizes that R.concat into one loop nest whose every
element chooses its source (an if_then_else on t < P) over a symbolic inner extent that s_tir cannot
vectorize: ~7.7 GB/s at context 1024 (the value cache's concat, static inner D, runs ~25 GB/s).
Here each row is two plain copy loops (the first of P elements, which LLVM's loop vectorizer turns
into vector moves) and the rows run in parallel. The kernel is scheduled by hand
(``tirx.is_scheduled``): CPU only (passes/append_last_axis.py rewrites the concats on CPU targets).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from .parse_cache import parsed_once

KERNEL = "append_last"


@parsed_once
def append_last(dims: tuple[int, int, int], dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc (a [*dims, P], b [*dims, S]) -> out [*dims, P + S] for 3 static leading dims."""
    if len(dims) != 3 or not all(isinstance(d, int) and d > 0 for d in dims):
        raise ValueError(f"{KERNEL}: expected 3 static positive leading dims, got {dims}")
    d0, d1, d2 = (T.int64(d) for d in dims)
    rows = dims[0] * dims[1] * dims[2]

    @T.prim_func(private=True)
    def func(a_handle: T.handle, b_handle: T.handle, out_handle: T.handle):
        T.func_attr({"mobilemoe.kernel": KERNEL, "op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        p = T.int64()
        s = T.int64()
        a = T.match_buffer(a_handle, (d0, d1, d2, p), dtype)
        b = T.match_buffer(b_handle, (d0, d1, d2, s), dtype)
        out = T.match_buffer(out_handle, (d0, d1, d2, p + s), dtype)
        af = T.decl_buffer((T.int64(rows) * p,), dtype, data=a.data)
        bf = T.decl_buffer((T.int64(rows) * s,), dtype, data=b.data)
        of = T.decl_buffer((T.int64(rows) * (p + s),), dtype, data=out.data)
        for r in T.parallel(T.int64(rows)):
            for t in range(p):
                of[r * (p + s) + t] = af[r * p + t]
            for t in range(s):
                of[r * (p + s) + p + t] = bf[r * s + t]

    return func
