"""SoftmaxRows: a float32 softmax over the last axis becomes the vectorized softmax_rows kernel.

Before:
    p = R.nn.softmax(scores, axis=-1)                 # scores [1, nkv, rep, S, T] (any rank >= 2)
After:
    s2 = R.reshape(scores, [-1, T])                   # a view
    p2 = R.call_tir(softmax_rows, (s2,), R.Tensor((n, T), "float32"))
    p  = R.reshape(p2, shape of scores)

tir_kernels/softmax.py has the kernel (vector passes, polynomial exp). CPU targets only, with
the vector width of the target (16 lanes with AVX-512, 8 with AVX2, 4 with NEON).
"""
from __future__ import annotations

import tvm
from tvm import relax

from tir_kernels.softmax import softmax_rows

from .common import is_op, rewrite_relax_functions


def _last_axis_softmax(call) -> bool:
    if not is_op(call, "relax.nn.softmax"):
        return False
    ty = call.args[0].ty
    ndim = getattr(ty, "ndim", -1)
    shape = getattr(ty, "shape", None)
    return (str(getattr(ty, "dtype", "")) == "float32" and ndim >= 2 and shape is not None
            and hasattr(shape, "values") and int(call.attrs.axis) in (-1, ndim - 1))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes, self.kernel = lanes, None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not _last_axis_softmax(call):
            return call
        if self.kernel is None:
            self.kernel = self.builder_.add_func(softmax_rows(self.lanes), "softmax_rows")
        x = call.args[0]
        dims = list(x.ty.shape.values)
        rows = self.builder_.emit(relax.op.reshape(x, [-1, dims[-1]]))
        y = self.builder_.emit(relax.call_tir(self.kernel, [rows], out_ty=rows.ty))
        return relax.op.reshape(y, dims)


@tvm.transform.module_pass(opt_level=0, name="SoftmaxRows")
class SoftmaxRows:
    def __init__(self, lanes: int = 16):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_relax_functions(_Rewriter(mod, self.lanes), mod)
