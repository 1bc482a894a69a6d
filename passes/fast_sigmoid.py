"""FastSigmoid: float32 R.sigmoid / R.nn.silu become arithmetic the CPU rules vectorize (no expf call).

Before:
    s = R.sigmoid(g)                                   # the shared expert's SiLU (g * sigmoid(g))
    a = R.nn.silu(g)                                   # the routed experts' SiLU
After:
    s = R.call_tir(fast_sigmoid, (g,), ...)            # e = exp(-|g|) (tir_kernels/softmax.exp_le0)
                                                       # s = 1 / (1 + e) if g >= 0 else e / (1 + e)
    a = R.call_tir(fast_silu, (g,), ...)               # g * the same

The legalized sigmoid calls expf per element, which keeps the fused SwiGLU kernels scalar (the
routed experts' slice + SiLU + multiply took 4.8 ms a layer in a 512-token mobilemoe-s prefill).
exp_le0 is the softmax kernel's polynomial exp (relative error < 5e-7). Computed in a TE compute,
so FuseOps still fuses it with the slices and the multiply. CPU targets only.
"""
from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from tir_kernels.softmax import exp_le0

from .common import is_op, rewrite_relax_functions


def _sigmoid(v):
    e = exp_le0(-tirx.abs(v), 1)
    return tirx.Select(v >= tirx.const(0, "float32"), tirx.const(1, "float32"), e) / (tirx.const(1, "float32") + e)


def fast_sigmoid(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: _sigmoid(x(*i)), name="fast_sigmoid", tag="elemwise")


def fast_silu(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: x(*i) * _sigmoid(x(*i)), name="fast_silu", tag="elemwise")


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if str(getattr(call.args[0].ty, "dtype", "")) != "float32" if call.args else True:
            return call
        if is_op(call, "relax.sigmoid"):
            return self.builder_.call_te(fast_sigmoid, call.args[0], primfunc_name_hint="fast_sigmoid")
        if is_op(call, "relax.nn.silu"):
            return self.builder_.call_te(fast_silu, call.args[0], primfunc_name_hint="fast_silu")
        return call


@tvm.transform.module_pass(opt_level=0, name="FastSigmoid")
class FastSigmoid:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_relax_functions(_Rewriter(mod), mod)
