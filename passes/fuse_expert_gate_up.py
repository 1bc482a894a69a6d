"""FuseExpertGateUp: one stacked gate+up projection per MoE layer instead of two.

Before (the exported dense MoE form; W1, W3 stacked expert params [E, I, H]):
    g = R.einsum((x, W1), "nh,eih->nei")          # gate
    u = R.einsum((x, W3), "nh,eih->nei")          # up
    a = R.multiply(R.multiply(g, R.sigmoid(g)), u)
After (W13 [E, 2I, H] = concat(W1, W3, axis=1), a new parameter recorded as a transform):
    gu = R.einsum((x, W13), "nh,eih->nei")        # [N, E, 2I]
    g = R.strided_slice(gu, [2], [0], [I]);  u = R.strided_slice(gu, [2], [I], [2I])
The gate is the projection that feeds R.sigmoid (SiLU); the rewrite fires only when both projections
read the same input and stacked parameters of equal shape.
"""
from __future__ import annotations

import tvm
from tvm import relax

from .common import bindings, einsum_parts, emit_like, is_op, rebuild, tensor_shape, weight_params

EXPERT_IN = "nh,eih->nei"


def find_gate_up_pairs(func: relax.Function) -> list[tuple]:
    """[(gate_var, up_var, x, W1, W3)] for each stacked gate/up einsum pair on parameters."""
    b = bindings(func)
    params = set(weight_params(func))
    sig_inputs = {v.args[0] for v in b.values() if is_op(v, "relax.sigmoid")}
    by_input: dict = {}
    for var, value in b.items():
        parts = einsum_parts(value)
        if parts and parts[0] == EXPERT_IN and parts[1][1] in params:
            by_input.setdefault(parts[1][0], []).append(var)
    pairs = []
    for x, vs in by_input.items():
        gates = [v for v in vs if v in sig_inputs]
        ups = [v for v in vs if v not in sig_inputs]
        if len(gates) == 1 and len(ups) == 1:
            w1, w3 = einsum_parts(b[gates[0]])[1][1], einsum_parts(b[ups[0]])[1][1]
            if tensor_shape(w1) is not None and tensor_shape(w1) == tensor_shape(w3):
                pairs.append((gates[0], ups[0], x, w1, w3))
    return pairs


def fused_name(w1: relax.Var) -> str:
    name = w1.name
    return name[:-3] + "_w13" if name.endswith("_w1") else name + "__gate_up"


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, pairs):
        super().__init__(mod)
        self.gate = {g: (x, w1, w3) for g, _, x, w1, w3 in pairs}
        self.up = {u: g for g, u, *_ in pairs}
        self.fused: dict = {}  # gate var -> emitted gu var
        self.new_params: dict = {}  # w1 -> w13 var

    def _gu(self, gate_var):
        if gate_var not in self.fused:
            x, w1, w3 = self.gate[gate_var]
            E, I, H = tensor_shape(w1)
            w13 = relax.Var(fused_name(w1), relax.TensorType([E, 2 * I, H], w1.ty.dtype))
            self.new_params[w1] = (w13, w3)
            self.fused[gate_var] = self.builder_.emit(relax.op.einsum([self.visit_expr(x), w13], EXPERT_IN))
        return self.fused[gate_var], tensor_shape(self.gate[gate_var][1])[1]

    def visit_var_binding_(self, binding):
        var = binding.var
        if var in self.gate or var in self.up:
            gate_var = var if var in self.gate else self.up[var]
            gu, I = self._gu(gate_var)
            lo, hi = (0, I) if var in self.gate else (I, 2 * I)
            new = emit_like(self.builder_, relax.op.strided_slice(gu, axes=[2], begin=[lo], end=[hi]), var)
            self.set_var_remap(var, new)
            return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="FuseExpertGateUp")
class FuseExpertGateUp:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions_items()), mod.attrs)  # never mutate the input module
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            pairs = find_gate_up_pairs(func)
            if not pairs:
                continue
            rw = _Rewriter(mod, pairs)
            body = rw.visit_expr(func)
            replace, transforms = {}, []
            for w1, (w13, w3) in rw.new_params.items():
                replace[w1], replace[w3] = [w13], []
                transforms.append({"out": w13.name, "op": "concat", "inputs": [w1.name, w3.name], "axis": 1})
            out[gv] = rebuild(func, body, replace, transforms)
        return out
