"""PruneUnusedParams: drop weight parameters an entry function no longer reads.

Before: def decode(tokens, positions, kv, p_embed, p_lm_head, ...)  # p_embed unused (tied weights)
After:  def decode(tokens, positions, kv, p_lm_head, ...)
Only weight parameters (after the attr "num_input" user inputs) are dropped; user inputs stay, so
the calling convention of every entry point is unchanged. The artifact then ships only what runs.
"""
from __future__ import annotations

import tvm
from tvm import relax

from .common import weight_params


@tvm.transform.module_pass(opt_level=0, name="PruneUnusedParams")
class PruneUnusedParams:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions_items()), mod.attrs)
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            used = set(relax.analysis.free_vars(relax.analysis.remove_all_unused(func.body)))
            drop = [p for p in weight_params(func) if p not in used]
            if drop:
                params = [p for p in func.params if p not in drop]
                out[gv] = relax.Function(params, func.body, func.ret_ty, func.is_pure, func.attrs)
        return out
