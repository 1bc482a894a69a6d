"""MakeDataflow: mark an entry function pure once nothing impure is left, and wrap its bindings in
dataflow blocks.

The PyTorch importer emits every function as ``@R.function(pure=False)`` with plain binding blocks
(the graph holds ``R.assert_op`` range checks). TVM's graph optimisations only act inside dataflow
blocks: FuseOps fuses nothing and RewriteDataflowReshape turns no reshape into a view without them,
so every elementwise op and every reshape (one was a 2.4 ms copy per layer per decode step, with an
int64 division per element) ran as its own kernel into its own allocation. After StripAssertions
nothing impure is left:

Before:
    @R.function(pure=False)
    def decode(tokens, positions, kv, *params):
        lv = R.reshape(...)
        ...
        return (logits, kv_new)
After:
    @R.function                      # pure
    def decode(tokens, positions, kv, *params):
        with R.dataflow():
            lv = R.reshape(...)
            ...
            R.output(logits, kv_new)
        return (logits, kv_new)

A function that still contains an impure call is left as it was.
"""
from __future__ import annotations

import tvm
from tvm import relax


@tvm.transform.module_pass(opt_level=0, name="MakeDataflow")
class MakeDataflow:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions_items()), mod.attrs)
        changed = False
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and not func.is_pure \
                    and not relax.analysis.contains_impure_call(func.body):
                out[gv] = relax.Function(func.params, func.body, func.ret_ty, True, func.attrs)
                changed = True
        return relax.transform.ConvertToDataflow(min_size=1)(out) if changed else out
