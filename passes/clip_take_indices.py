"""ClipTakeIndices: R.take(x, ids, mode="fast") -> R.take(x, ids, mode="clip").

Before:
    e = R.take(embed, tokens, axis=0)                 # the importer's default mode, "fast"
After:
    e = R.take(embed, tokens, axis=0, mode="clip")

TVM's PyTorch importer emits every gather (the embedding lookup, expert ids) in "fast" mode: no
bounds check, so an out-of-range token id reads arbitrary memory, and legalizing it prints "Fast mode
segfaults when there are out-of-bounds indices" for each take, a warning the user cannot act on.
"clip" clamps the index into range (one min/max per gathered row, not per element), which makes a
bad token id harmless and the build quiet.
"""
from __future__ import annotations

import tvm
from tvm import relax

from .common import is_op, rewrite_relax_functions


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if is_op(call, "relax.take") and str(call.attrs.mode) == "fast":
            axis = call.attrs.axis
            return relax.op.take(call.args[0], call.args[1], axis=None if axis is None else int(axis), mode="clip")
        return call


@tvm.transform.module_pass(opt_level=0, name="ClipTakeIndices")
class ClipTakeIndices:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_relax_functions(_Rewriter(mod), mod)
