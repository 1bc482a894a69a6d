"""SparseMoEDispatch: routed experts read only the k selected experts' weights.

Before (after FuseExpertGateUp; the dense form computes all E experts for every token):
    combine = R.sum(R.multiply(onehot(ids) as float, R.expand_dims(w, [2])), axis=[1])   # [N, E]
    gu  = R.einsum((x, W13), "nh,eih->nei")                                           # [N, E, 2I]
    a   = silu(gu[..., :I]) * gu[..., I:]
    y   = R.einsum((a, W2), "nei,ehi->neh")                                            # [N, E, H]
    out = R.einsum((y, combine), "neh,ne->nh")                                         # [N, H]
After, static N (decode; ids [N, k], w [N, k] from the router's top-k): per-token GEMVs
    gu  = call_tir(moe_gate_up, (x, ids, W13))                  # [N, k, 2I], gathers experts
    a   = silu(gu[..., :I]) * gu[..., I:]                          # [N, k, I]
    out = call_tir(moe_down_combine, (a, ids, w, W2))           # [N, H], routing weights applied
After, symbolic N (prefill): tokens grouped by expert, one GEMM per non-empty expert
    plan    = call_tir(moe_route_plan, (ids,))                  # (offsets [E + 1], order [N * k])
    gu  = call_tir(moe_grouped_gate_up, (x, plan[0], plan[1], W13))       # [N * k, 2I], sorted rows
    a   = silu(gu[:, :I]) * gu[:, I:]                                      # [N * k, I]
    out = call_tir(moe_grouped_down_combine, (a, plan[0], plan[1], w, W2)) # [N, H], scattered back
The kernels come from tir_kernels/moe_float.py (TE) and moe_grouped.py (float32 only: other
dtypes keep the GEMVs); QuantizeInt4Weights later swaps them for the INT4 kernels. The one-hot chain
and dense einsums become dead and are removed by DCE.
"""
from __future__ import annotations

import tvm
from tvm import relax

from tir_kernels import moe_float
from tir_kernels.moe_grouped import moe_grouped_down_combine, moe_grouped_gate_up, moe_route_plan

from .common import bindings, einsum_parts, emit_like, is_op, static_dim, tensor_shape, weight_params


def _strip_casts(b, e):
    while isinstance(e, relax.Var) and is_op(b.get(e), "relax.astype"):
        e = b[e].args[0]
    return e


def _routing_of(b, combine):
    """(ids, w) if `combine` is sum_j onehot(ids[:, j]) * w[:, j], else None."""
    s = b.get(combine)
    if not is_op(s, "relax.sum"):
        return None
    mul = b.get(s.args[0])
    if not is_op(mul, "relax.multiply"):
        return None
    for onehot, wexp in (mul.args, mul.args[::-1]):
        eq = b.get(_strip_casts(b, onehot))
        ex = b.get(wexp)
        if is_op(eq, "relax.equal") and is_op(ex, "relax.expand_dims") and is_op(b.get(eq.args[0]), "relax.expand_dims"):
            return b[eq.args[0]].args[0], ex.args[0]
    return None


def _swiglu_of(b, act):
    """(gu, I) if act = (g * sigmoid(g)) * u with g, u the two halves of one tensor gu."""
    m = b.get(act)
    if not is_op(m, "relax.multiply"):
        return None
    silu, u = m.args
    sm = b.get(silu)
    if not (is_op(sm, "relax.multiply") and is_op(b.get(sm.args[1]), "relax.sigmoid")
            and b[sm.args[1]].args[0].same_as(sm.args[0])):
        return None
    g_slice, u_slice = b.get(sm.args[0]), b.get(u)
    if not (is_op(g_slice, "relax.strided_slice") and is_op(u_slice, "relax.strided_slice")
            and g_slice.args[0].same_as(u_slice.args[0])):
        return None
    I = static_dim(sm.args[0], -1)
    return g_slice.args[0], I


def find_moe_layers(func: relax.Function) -> dict:
    """out var -> dict(x, ids, w, w13, w2, I) for each fused dense-form MoE layer."""
    b = bindings(func)
    params = set(weight_params(func))
    found = {}
    for var, value in b.items():
        parts = einsum_parts(value)
        if not parts or parts[0] != "neh,ne->nh":
            continue
        y, combine = parts[1]
        routing = _routing_of(b, combine)
        down = einsum_parts(b.get(y))
        if routing is None or not down or down[0] != "nei,ehi->neh" or down[1][1] not in params:
            continue
        sw = _swiglu_of(b, down[1][0])
        up = einsum_parts(b.get(sw[0])) if sw else None
        if not up or up[0] != "nh,eih->nei" or up[1][1] not in params:
            continue
        found[var] = {"x": up[1][0], "w13": up[1][1], "w2": down[1][1], "ids": routing[0],
                      "w": routing[1], "I": sw[1]}
    return found


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, layers, group_prefill):
        super().__init__(mod)
        self.layers, self.group_prefill = layers, group_prefill

    def visit_var_binding_(self, binding):
        m = self.layers.get(binding.var)
        if m is None:
            return super().visit_var_binding_(binding)
        bb, I = self.builder_, m["I"]
        x, ids, w = (self.visit_expr(m[k]) for k in ("x", "ids", "w"))
        if (self.group_prefill and static_dim(x, 0) is None
                and all(v.ty.dtype == "float32" for v in (x, w, m["w13"], m["w2"]))):
            self.set_var_remap(binding.var, self._grouped(x, ids, w, m["w13"], m["w2"], I, binding.var))
            return
        gu = bb.emit(bb.call_te(moe_float.moe_gate_up, x, ids, m["w13"], primfunc_name_hint="moe_gate_up"))
        g = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[0], end=[I]))
        u = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[I], end=[2 * I]))
        a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
        out = emit_like(bb, bb.call_te(moe_float.moe_down_combine, a, ids, w, m["w2"],
                                       primfunc_name_hint="moe_down_combine"), binding.var)
        self.set_var_remap(binding.var, out)

    def _grouped(self, x, ids, w, w13, w2, I, var):
        """Prefill: sort the (token, slot) rows by expert, grouped GEMMs, scatter back (moe_grouped.py)."""
        bb = self.builder_
        (E, N13, H), k, T = tensor_shape(w13), static_dim(ids, 1), x.ty.shape.values[0]
        plan = bb.add_func(moe_route_plan(E, k, ids.ty.dtype), "moe_route_plan")
        plan = bb.emit(relax.call_tir(plan, [ids], [relax.TensorType([E + 1], "int32"),
                                                    relax.TensorType([T * k], "int32")]))
        offsets, order = bb.emit(relax.TupleGetItem(plan, 0)), bb.emit(relax.TupleGetItem(plan, 1))
        gate_up = bb.add_func(moe_grouped_gate_up(E, N13, H, k, "float32"), "moe_grouped_gate_up")
        gu = bb.emit(relax.call_tir(gate_up, [x, offsets, order, w13], relax.TensorType([T * k, N13], "float32")))
        g = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[0], end=[I]))
        u = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[I], end=[2 * I]))
        a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
        down = bb.add_func(moe_grouped_down_combine(E, H, I, k, "float32"), "moe_grouped_down_combine")
        return emit_like(bb, relax.call_tir(down, [a, offsets, order, w, w2], relax.TensorType([T, H], "float32")),
                         var)


@tvm.transform.module_pass(opt_level=0, name="SparseMoEDispatch")
class SparseMoEDispatch:
    """group_prefill=False keeps the per-token GEMVs for symbolic N too: the grouped kernels are
    CPU (llvm) kernels, scheduled by hand, with no GPU schedule."""

    def __init__(self, group_prefill: bool = True):
        self.group_prefill = group_prefill

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        rw = _Rewriter(mod, {}, self.group_prefill)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                layers = find_moe_layers(func)
                if layers:
                    rw.layers = layers
                    rw.builder_.update_func(gv, rw.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rw.builder_.get())
