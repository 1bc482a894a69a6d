"""FuseExpertGateUp: one stacked gate+up weight per MoE layer instead of two.

Before (as imported; W1, W3 stacked expert params [E, I, H], passes/moe_op.py):
    y = mobilemoe.moe(x, router_weight, W1, W3, W2, ...)            gate_up="separate"
After (W13 [E, 2I, H] = concat(W1, W3, axis=1), a new parameter recorded as a transform):
    y = mobilemoe.moe(x, router_weight, W13, W2, ...)               gate_up="fused"
so that the expert kernels compute gate and up in one pass over the input. Fires when W1 and W3 are
parameters of equal static shape that nothing but that call reads.
"""
from __future__ import annotations

import dataclasses

import tvm
from tvm import relax

from . import moe_op
from .common import bindings, rebuild, tensor_shape, users, weight_params


def find_gate_up_pairs(func: relax.Function) -> list[tuple]:
    """[(W1, W3)] of each separate-form mobilemoe.moe call whose gate and up weights can be fused."""
    params, uses = set(weight_params(func)), users(func)
    pairs = []
    for var, value in bindings(func).items():
        found = moe_op.match(value)
        if found is None or found[0].gate_up != "separate":
            continue
        w1, w3 = found[1]["w1"], found[1]["w3"]
        if (w1 in params and w3 in params and not w1.same_as(w3) and tensor_shape(w1) is not None
                and tensor_shape(w1) == tensor_shape(w3) and uses.get(w1) == [var] and uses.get(w3) == [var]):
            pairs.append((w1, w3))
    return pairs


def fused_name(w1: relax.Var) -> str:
    name = w1.name
    return name[:-3] + "_w13" if name.endswith("_w1") else name + "__gate_up"


@tvm.transform.module_pass(opt_level=0, name="FuseExpertGateUp")
class FuseExpertGateUp:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        fused = {}  # W1 -> (W13, W3), over every function (a Var belongs to one function)
        for func in mod.functions.values():
            if isinstance(func, relax.Function):
                for w1, w3 in find_gate_up_pairs(func):
                    E, I, H = tensor_shape(w1)
                    fused[w1] = (relax.Var(fused_name(w1), relax.TensorType([E, 2 * I, H], w1.ty.dtype)), w3)
        if not fused:
            return mod

        def lower(bb, attrs, ops):
            if attrs.gate_up != "separate" or ops["w1"] not in fused:
                return None
            rest = {r: e for r, e in ops.items() if r not in ("w1", "w3")}
            return moe_op.make(dataclasses.replace(attrs, gate_up="fused"), {**rest, "w13": fused[ops["w1"]][0]})

        out = moe_op.rewrite_calls(lower, mod)
        for gv, func in mod.functions_items():
            mine = [(w1, *fused[w1]) for w1 in weight_params(func) if w1 in fused] if isinstance(func, relax.Function) else []
            if mine:
                replace = {p: q for w1, w13, w3 in mine for p, q in ((w1, [w13]), (w3, []))}
                transforms = [{"out": w13.name, "op": "concat", "inputs": [w1.name, w3.name], "axis": 1}
                              for w1, w13, w3 in mine]
                out[gv] = rebuild(func, out[gv], replace, transforms)
        return out
