"""INT4 embedding lookup: rows of a packed table, dequantized on the fly (the tied LM head's table).

    embedding_int4(ids [T] int32/int64, w uint32 [V, H // 8], s fp16 [V, H // 32]) -> [T, H] float32
    y[t, h] = dequant(w[ids[t], h // 8], s[ids[t], h // 32], h)      (layout of mobilemoe.quant)

With ``interleave=(rows, lanes)`` the table's words are in mobilemoe.quant's interleaved order (the
layout the dot-product LM head reads the same tensor in), and word (v, j) is read at
``interleaved_index(v, j)``; likewise the scales with ``scales_interleave`` (row-lane ISAs). The kernel is opaque (op_pattern 8, attr ``mobilemoe.kernel``) so that
passes/select_dot_kernels.py can find it and swap the layout; its one spatial block is scheduled by
the generic rules (targets/cpu_rules.Injective on CPUs, dlight on GPUs).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from mobilemoe.quant import interleaved_index

from .dequant import GROUP_SIZE, NIBBLES_PER_WORD, check_int4_shape, dequant_int4
from .parse_cache import parsed_once

KERNEL = "embedding_int4"


@parsed_once
def embedding_int4(vocab: int, hidden: int, index_dtype: str = "int64",
                   interleave: tuple[int, int] | None = None,
                   scales_interleave: tuple[int, int] | None = None) -> tirx.PrimFunc:
    """PrimFunc (ids [T] int32/int64, w uint32 [vocab, hidden // 8], s fp16 [vocab, hidden // 32]) -> y [T, hidden]."""
    check_int4_shape(KERNEL, vocab, hidden, "float32")
    kw, kg = hidden // NIBBLES_PER_WORD, hidden // GROUP_SIZE

    def word(w, row, j):
        if interleave is None:
            return w[row, j]
        p = interleaved_index(row, j, kw, *interleave)
        return w[p // kw, p % kw]

    def scale(s, row, g):
        if scales_interleave is None:
            return s[row, g]
        p = interleaved_index(row, g, kg, *scales_interleave)
        return s[p // kg, p % kg]

    @T.prim_func(private=True, s_tir=True)
    def func(ids_handle: T.handle, w: T.Buffer((T.int64(vocab), T.int64(kw)), "uint32"),
             s: T.Buffer((T.int64(vocab), T.int64(kg)), "float16"), y_handle: T.handle):
        T.func_attr({"mobilemoe.kernel": KERNEL, "op_pattern": 8, "tirx.noalias": True,
                     "mobilemoe.dims": {"n": vocab, "k": hidden, "index_dtype": index_dtype}})
        t = T.int64()
        ids = T.match_buffer(ids_handle, (t,), index_dtype)
        y = T.match_buffer(y_handle, (t, T.int64(hidden)), "float32")
        for i, h in T.grid(t, T.int64(hidden)):
            with T.sblock("embedding_int4"):
                vi, vh = T.axis.remap("SS", [i, h])
                y[vi, vh] = dequant_int4(word(w, T.Cast("int64", ids[vi]), vh // NIBBLES_PER_WORD),
                                         scale(s, T.Cast("int64", ids[vi]), vh // GROUP_SIZE), vh)

    return func
