"""AppendLastAxis: a 4-D concatenation along a symbolic last axis becomes the append_last kernel.

Before:
    k_all = R.concat((past_k, k_new), axis=3)   # past_k [1, nkv, D, P], k_new [1, nkv, D, S]
After:
    k_all = R.call_tir(append_last, (past_k, k_new), R.Tensor((1, nkv, D, P + S)))

That concat is the transposed key cache's per-step append (mobilemoe/model.py); append_last
(tir_kernels/append.py) copies each row in two vectorizable loops instead of one select per
element. Only concatenations of two tensors whose leading three dims are static and equal, and whose
first operand's last dim is symbolic, are rewritten (a static concat is left to the generic rules).
CPU targets only: the kernel is scheduled by hand for a CPU.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx

from tir_kernels.append import append_last

from .common import is_op, rewrite_relax_functions


def _dims(expr):
    ty = expr.ty
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    return list(shape.values)


def _append_operands(call):
    """(a, b, leading static dims, dtype) when `call` is a rewritable concat, else None."""
    if not is_op(call, "relax.concat") or not isinstance(call.args[0], relax.Tuple):
        return None
    parts = list(call.args[0].fields)
    if len(parts) != 2:
        return None
    dims = [_dims(p) for p in parts]
    if any(d is None or len(d) != 4 for d in dims):
        return None
    axis = int(call.attrs.axis) if call.attrs.axis is not None else 0
    if axis not in (3, -1):
        return None
    lead = [d[:3] for d in dims]
    if not all(isinstance(x, tirx.IntImm) for x in lead[0] + lead[1]):
        return None
    if [int(x) for x in lead[0]] != [int(x) for x in lead[1]] or isinstance(dims[0][3], tirx.IntImm):
        return None
    dtype = parts[0].ty.dtype
    if parts[1].ty.dtype != dtype:
        return None
    return parts[0], parts[1], tuple(int(x) for x in lead[0]), str(dtype)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.kernels: dict = {}

    def visit_call_(self, call):
        call = super().visit_call_(call)
        found = _append_operands(call)
        if found is None:
            return call
        a, b, dims, dtype = found
        key = (dims, dtype)
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(append_last(dims, dtype), "append_last")
        return relax.call_tir(self.kernels[key], [a, b], out_ty=call.ty)


@tvm.transform.module_pass(opt_level=0, name="AppendLastAxis")
class AppendLastAxis:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_relax_functions(_Rewriter(mod), mod)
