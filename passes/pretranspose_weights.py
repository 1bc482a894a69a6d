"""PretransposeWeights: a float weight read only through R.permute_dims becomes a transposed parameter.

Before (the router, which stays float: FLOAT_WEIGHTS of passes/common.py):
    wt = R.permute_dims(W, axes=[1, 0])        # W [N, K] param: a transpose kernel on every call
    y  = R.matmul(x, wt)
After:
    y  = R.matmul(x, W__t)                     # W__t [K, N] param
    transform {"out": "W__t", "op": "transpose", "inputs": ["W"]} (replayed by compiler/params.py)

Only 2-D weight parameters (after the "num_input" user inputs) whose every use is such a transpose
are rewritten; measured on a 2-layer mobilemoe-s decode step the router's [32, 1024] transpose was
85% of the router's time (0.06 ms a layer).
"""
from __future__ import annotations

import tvm
from tvm import relax

from .common import bindings, is_op, rebuild, tensor_shape, users, weight_params


def _is_transpose_2d(value) -> bool:
    if not is_op(value, "relax.permute_dims"):
        return False
    axes = value.attrs.axes
    return axes is None or [int(a) for a in axes] == [1, 0]


def _transposed_params(func: relax.Function) -> dict:
    """weight param -> [binding vars of its transposes], for params read only through transposes."""
    binds, uses = bindings(func), users(func)
    out = {}
    for w in weight_params(func):
        shape = tensor_shape(w)
        readers = uses.get(w, [])
        if shape is None or len(shape) != 2 or not readers:
            continue
        if all(_is_transpose_2d(binds.get(r)) and binds[r].args[0].same_as(w) for r in readers):
            out[w] = readers
    return out


@tvm.transform.module_pass(opt_level=0, name="PretransposeWeights")
class PretransposeWeights:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        out = mod.clone()
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            found = _transposed_params(func)
            if not found:
                continue
            replace, transforms, subst = {}, [], {}
            for w, readers in found.items():
                n, k = tensor_shape(w)
                wt = relax.Var(w.name + "__t", relax.TensorType([k, n], w.ty.dtype))
                replace[w] = [wt]
                transforms.append({"out": wt.name, "op": "transpose", "inputs": [w.name]})
                subst.update({r: wt for r in readers})
            new = _Subst(subst).visit_expr(func)
            out[gv] = rebuild(func, new, replace, transforms)
        return relax.transform.CanonicalizeBindings()(relax.transform.DeadCodeElimination()(out))


@relax.expr_functor.mutator
class _Subst(relax.PyExprMutator):
    """Uses of the transposes' vars read the new parameter; the transposes become dead code."""

    def __init__(self, subst: dict):
        super().__init__()
        self.subst = subst

    def visit_var_(self, var):
        return self.subst.get(var, var)

    def visit_dataflow_var_(self, var):
        return self.subst.get(var, var)
