"""UseExpertSlots: routed experts read from a runtime-filled cache of S slots instead of resident weights.

Runs after the graph phases, for builds under a memory budget (compiler/residency.py). Before, per
MoE layer l (the INT4 kernels SparseMoEDispatch made of a PackMoEExpertsInt4-packed call):
    ids  = topk(...)[1]                                                   # [N, k] expert ids
    decode:  call_tir(moe_gemv_int4, (x, ids, W13__q4, W13__s))            # W* [E, ...] parameters
             call_tir(moe_gemv_weighted_sum_int4, (a, ids, w, W2__q4, W2__s))
    prefill: plan = call_tir(moe_route_plan, (ids,))                     # offsets [E + 1]
             call_tir(moe_grouped_*_int4, (.., plan[0], plan[1], .., W__q4, W__s))
After:
    slots = call_pure_packed("mobilemoe.expert_slots", ids, l, pool_0, .., pool_3)   # [N, k], same dtype
    the same kernels, built for S "experts" (named <kernel>_slots), reading (slots, pool_i) in place of (ids, W*)
where pool_i [S, ...] is one cache for all layers (the i-th expert tensor of every layer: the
layers' expert tensors must agree in shape) and the runtime's packed function
(mobilemoe/runtimes/expert_cache.py) makes layer l's chosen experts resident in the pools and
returns their slots. The kernels are today's, with E replaced by S: fully resident speed when every
expert has a slot. The layer's expert parameters are dropped; the pools are appended as parameters
named POOL_NAME.format(i). What was replaced goes into `report` (a dict): "layers" (per layer, its
expert parameters' names, in pool order) and "pools" ({"name", "dtype", "shape"}).
"""
from __future__ import annotations

import json

import tvm
from tvm import relax

from tir_kernels import moe_gemv, moe_gemv_weighted_sum
from tir_kernels.moe_grouped import ARGS_ATTR, moe_grouped_down_combine, moe_grouped_gate_up, moe_route_plan

from .common import WEIGHT_PARTS, bindings, emit_like, is_op, tensor_shape, weight_params

CALLBACK = "mobilemoe.expert_slots"
POOL_NAME = "expert_pool_{}"
GEMV = {"moe_gemv": moe_gemv, "moe_gemv_weighted_sum": moe_gemv_weighted_sum}
GROUPED = {"moe_grouped_gate_up_int4": moe_grouped_gate_up, "moe_grouped_down_combine_int4": moe_grouped_down_combine}
PLAN = "moe_route_plan"


class ExpertSlotsError(ValueError):
    """A graph whose routed experts cannot be read through slots (names the function and parameter)."""


def _kernel(mod, call) -> str | None:
    """The `mobilemoe.kernel` attribute of the PrimFunc a call_tir calls, else None."""
    if not (is_op(call, "relax.call_tir") and isinstance(call.args[0], tvm.ir.GlobalVar)):
        return None
    attrs = mod[call.args[0]].attrs
    return str(attrs["mobilemoe.kernel"]) if attrs is not None and "mobilemoe.kernel" in attrs else None


def _routing_ids(mod, b: dict, call):
    """The expert ids var an expert kernel's call reads (through the route plan for grouped kernels)."""
    kernel = _kernel(mod, call)
    if kernel in GEMV:
        return call.args[1].fields[1]
    if kernel in GROUPED:
        offsets = call.args[1].fields[1]
        plan = b.get(b.get(offsets).tuple_value)
        if _kernel(mod, plan) == PLAN:
            return plan.args[1].fields[0]
    return None


def find_expert_layers(mod: tvm.IRModule, func: relax.Function) -> dict:
    """{ids var: [expert weight params, in order of use]}, one entry per MoE layer, in layer order."""
    b, params, layers = bindings(func), set(weight_params(func)), {}
    for value in b.values():
        ids = _routing_ids(mod, b, value)
        if ids is None:
            continue
        ws = layers.setdefault(ids, [])
        for w in value.args[1].fields[-2:]:
            if w not in params:
                raise ExpertSlotsError(f"UseExpertSlots: {_kernel(mod, value)} reads expert weights {w} that are "
                                       f"not parameters of the function; only parameters can move to the expert file")
            if not any(w.same_as(x) for x in ws):
                ws.append(w)
    return layers


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, slots: int):
        super().__init__(mod)
        self.mod, self.slots = mod, slots
        self.func_bindings: dict = {}
        self.layer_of: dict = {}  # ids var -> layer index
        self.layer_params: dict = {}  # ids var -> the layer's expert params, in pool order
        self.pools: list = []  # this function's pool params
        self.slot_vars: dict = {}  # ids var -> emitted slots var

    def _slots(self, ids):
        if ids not in self.slot_vars:
            call = relax.call_pure_packed(CALLBACK, self.visit_expr(ids), relax.prim_value(self.layer_of[ids]),
                                          *self.pools, ty_args=ids.ty)
            self.slot_vars[ids] = self.builder_.emit(call, "expert_slots")
        return self.slot_vars[ids]

    def _add(self, prim, name):
        return self.builder_.add_func(prim, name)

    def visit_var_binding_(self, binding):
        call, b = binding.value, self.func_bindings
        kernel = _kernel(self.mod, call)
        new = None
        if kernel == PLAN and call.args[1].fields[0] in self.layer_of:
            ids = call.args[1].fields[0]
            k = int(ids.ty.shape.values[1])
            prim = moe_route_plan(self.slots, k, str(ids.ty.dtype))
            order_ty = call.ty_args[0].fields[1]
            new = relax.call_tir(self._add(prim, PLAN + "_slots"), [self._slots(ids)],
                                 [relax.TensorType([self.slots + 1], "int32"), order_ty])
        elif kernel in GEMV or kernel in GROUPED:
            ids = _routing_ids(self.mod, b, call)
            if ids in self.layer_of:
                args = [self.visit_expr(a) for a in call.args[1].fields]
                attrs = self.mod[call.args[0]].attrs
                ws = self.layer_params[ids]
                args[-2:] = [self.pools[next(i for i, p in enumerate(ws) if p.same_as(w))]
                             for w in call.args[1].fields[-2:]]
                if kernel in GEMV:
                    dims = {key: (str(v) if key == "index_dtype" else int(v)) for key, v in attrs["mobilemoe.dims"].items()}
                    prim = GEMV[kernel](**{**dims, "num_experts": self.slots})
                    args[1] = self._slots(ids)
                else:
                    kargs = {key: int(v) for key, v in attrs[ARGS_ATTR].items()}
                    prim = GROUPED[kernel](**{**kargs, "num_experts": self.slots}, weights="int4")
                new = relax.call_tir(self._add(prim, call.args[0].name_hint + "_slots"), args, call.ty_args[0])
        if new is None:
            return super().visit_var_binding_(binding)
        self.set_var_remap(binding.var, emit_like(self.builder_, new, binding.var))


def _pool_types(func_name: str, layers: list[list]) -> list[tuple[str, list[int]]]:
    """(dtype, per-expert shape) of each pool: the layers' i-th expert tensors, checked to agree."""
    first = [(str(w.ty.dtype), tensor_shape(w)[1:]) for w in layers[0]]
    for ws in layers[1:]:
        got = [(str(w.ty.dtype), tensor_shape(w)[1:]) for w in ws]
        if got != first:
            raise ExpertSlotsError(f"UseExpertSlots: {func_name}: expert tensors {[w.name for w in ws]} are "
                                   f"{got}, the first layer's {first}; one cache needs every layer's experts alike")
    return first


@tvm.transform.module_pass(opt_level=0, name="UseExpertSlots")
class UseExpertSlots:
    """slots: S, the cache's capacity in experts (all layers together); report: a dict, filled."""

    def __init__(self, slots: int, report: dict | None = None):
        self.slots, self.report = slots, {} if report is None else report

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        rw = _Rewriter(mod, self.slots)
        updates = []
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            layers = find_expert_layers(mod, func)
            if not layers:
                continue
            ws = list(layers.values())
            names = [[w.name for w in layer] for layer in ws]
            if self.report.setdefault("layers", names) != names:
                raise ExpertSlotsError(f"UseExpertSlots: {gv.name_hint} reads expert parameters {names}, another "
                                       f"entry point {self.report['layers']}")
            types = _pool_types(gv.name_hint, ws)
            self.report["pools"] = [{"name": POOL_NAME.format(i), "dtype": d, "shape": [self.slots, *s]}
                                    for i, (d, s) in enumerate(types)]
            rw.func_bindings, rw.slot_vars = bindings(func), {}
            rw.layer_of = {ids: i for i, ids in enumerate(layers)}
            rw.layer_params = dict(layers)
            rw.pools = [relax.Var(p["name"], relax.TensorType(p["shape"], p["dtype"])) for p in self.report["pools"]]
            body = rw.visit_expr(func)
            experts = {w for layer in ws for w in layer}
            updates.append((gv, [p for p in func.params if p not in experts] + rw.pools, body))
        out = rw.builder_.get()
        for gv, params, body in updates:
            func = relax.Function(params, body.body, body.ret_ty, body.is_pure, body.attrs)
            parts = {} if func.attrs is None or WEIGHT_PARTS not in func.attrs else json.loads(str(func.attrs[WEIGHT_PARTS]))
            parts.update({p.name: "routed experts" for p in rw.pools})  # RecordKernelCalls, bench/common.py
            out[gv] = func.with_attr(WEIGHT_PARTS, json.dumps(parts))
        return relax.transform.DeadCodeElimination()(out)
