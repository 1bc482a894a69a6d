"""FuseSiblingMatmuls: matmuls of one input by several weights become one matmul by their concatenation.

Before (attention's q, k and v; the shared expert's gate and up), W* [N*, K] weight parameters:
    q = R.matmul(R.reshape(h, s), R.permute_dims(Wq, axes=[1, 0]))
    k = R.matmul(R.reshape(h, s), R.permute_dims(Wk, axes=[1, 0]))     # the same input (same h, same shape)
    v = R.matmul(R.reshape(h, s), R.permute_dims(Wv, axes=[1, 0]))
After (Wq__siblings [Nq + Nk + Nv, K] = concat(Wq, Wk, Wv, axis=0), a new parameter recorded as a transform):
    y = R.matmul(R.reshape(h, s), R.permute_dims(Wq__siblings, axes=[1, 0]))
    q = R.strided_slice(y, axes=[-1], begin=[0], end=[Nq])
    k = R.strided_slice(y, axes=[-1], begin=[Nq], end=[Nq + Nk])
    v = R.strided_slice(y, axes=[-1], begin=[Nq + Nk], end=[Nq + Nk + Nv])
so decode runs one weight-streaming kernel (one parallel launch) instead of three, and prefill one GEMM
over the input. INT4 quantization is per output row, so QuantizeInt4Weights (which runs after) gives the
fused weight exactly the codes and scales of its parts. A weight fuses when it is a 2-D parameter read
only through one such transpose + matmul, is not a float weight (FLOAT_WEIGHTS: the router), and its
siblings have the same K, dtype and matmul out_dtype.
"""
from __future__ import annotations

import tvm
from tvm import relax

from .common import bindings, emit_like, float_weights, is_op, rebuild, tensor_shape, users, weight_params

SUFFIX = "__siblings"


def _weight_of(binds, uses, params, y):
    """W if `y` = matmul(a, permute_dims(W, [1, 0])) with W a 2-D param read only there, else None."""
    value = binds.get(y)
    if not is_op(value, "relax.matmul") or not isinstance(value.args[1], relax.Var):
        return None
    pt = value.args[1]
    t = binds.get(pt)
    if not is_op(t, "relax.permute_dims") or (t.attrs.axes is not None and [int(a) for a in t.attrs.axes] != [1, 0]):
        return None
    w = t.args[0]
    if w not in params or tensor_shape(w) is None or len(tensor_shape(w)) != 2:
        return None
    return w if uses.get(w) == [pt] and uses.get(pt) == [y] else None


def _input_key(binds, a):
    """What a matmul input is: a var, or (for R.reshape(h, s)) the pair h and s, so that separate
    reshapes of one tensor to one shape count as one input."""
    value = binds.get(a)
    if is_op(value, "relax.reshape") and isinstance(value.args[0], relax.Var):
        return value.args[0], str(value.args[1])
    return a, None


def find_siblings(func: relax.Function) -> list[list[tuple]]:
    """Groups (>= 2, in binding order) of (matmul var, weight) reading one input, fusable (module doc)."""
    binds, uses = bindings(func), users(func)
    params = set(weight_params(func)) - {p for p in func.params if p.name in float_weights(func)}
    groups: dict = {}
    for y, value in binds.items():
        w = _weight_of(binds, uses, params, y)
        if w is None:
            continue
        a = value.args[0]
        key = (_input_key(binds, a), tensor_shape(w)[1], w.ty.dtype, str(value.attrs.out_dtype))
        groups.setdefault(key, []).append((y, w))
    return [g for g in groups.values() if len(g) > 1]


@relax.expr_functor.mutator
class _Fuse(relax.PyExprMutator):
    """The first matmul of a group becomes the fused matmul + its slice; the others, slices of it."""

    def __init__(self, mod, plan: dict):
        super().__init__(mod)
        self.plan = plan  # matmul var -> (fused weight, group [(var, weight)], index in group)
        self.fused = {}  # group's first var -> the fused matmul's new var

    def visit_var_binding_(self, binding):
        if binding.var not in self.plan:
            return super().visit_var_binding_(binding)
        wf, group, i = self.plan[binding.var]
        first = group[0][0]
        if i == 0:
            mm = binding.value
            pt = self.builder_.emit(relax.op.permute_dims(wf, [1, 0]), wf.name + "_t")
            self.fused[first] = self.builder_.emit(
                relax.op.matmul(self.visit_expr(mm.args[0]), pt, out_dtype=mm.attrs.out_dtype), wf.name + "_y")
        y = self.fused[first]
        begin = sum(tensor_shape(w)[0] for _, w in group[:i])
        end = begin + tensor_shape(group[i][1])[0]
        axis = len(y.ty.shape.values) - 1
        new = emit_like(self.builder_, relax.op.strided_slice(y, axes=[axis], begin=[begin], end=[end]), binding.var)
        self.set_var_remap(binding.var, new)


@tvm.transform.module_pass(opt_level=0, name="FuseSiblingMatmuls")
class FuseSiblingMatmuls:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        out = mod.clone()
        changed = False
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            groups = find_siblings(func)
            if not groups:
                continue
            plan, replace, transforms = {}, {}, []
            for group in groups:
                w0 = group[0][1]
                n = sum(tensor_shape(w)[0] for _, w in group)
                wf = relax.Var(w0.name + SUFFIX, relax.TensorType([n, tensor_shape(w0)[1]], w0.ty.dtype))
                replace.update({w: [] for _, w in group[1:]})
                replace[w0] = [wf]
                transforms.append({"out": wf.name, "op": "concat", "inputs": [w.name for _, w in group], "axis": 0})
                plan.update({y: (wf, group, i) for i, (y, _) in enumerate(group)})
            mutator = _Fuse(mod, plan)
            new = mutator.visit_expr(func)
            out[gv] = rebuild(func, new, replace, transforms)
            changed = True
        if not changed:
            return mod
        return relax.transform.CanonicalizeBindings()(relax.transform.DeadCodeElimination()(out))
