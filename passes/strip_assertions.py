"""StripAssertions: drop R.assert_op bindings (the importer's one_hot range checks).

Before:
    c = R.logical_not(R.astype(R.max(R.astype(R.logical_not(R.less(ids, 8)), "int8")), "bool"))
    _ = R.assert_op(c, "one_hot: Class values must be smaller than num_classes.")
After: the assert binding is gone (its condition chain becomes dead and DCE removes it).

The checks guard one_hot(ids) where ids come from top-k over E router logits, so they always hold;
after SparseMoEDispatch nothing reads the one-hot tensor at all. They cost a reduction per layer per
call, and a runtime-only TVM (phones, the emulated device) has no `relax.run.assert_op` builtin.
"""
from __future__ import annotations

import tvm
from tvm import relax

from .common import is_op, rewrite_relax_functions


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_var_binding_(self, binding):
        if is_op(binding.value, "relax.assert_op"):
            return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="StripAssertions")
class StripAssertions:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return relax.transform.DeadCodeElimination()(rewrite_relax_functions(_Rewriter(mod), mod))
