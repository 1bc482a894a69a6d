"""PackMoEExpertsInt4: each mobilemoe.moe call's routed expert weights become group-32 INT4 operands.

Acts on the op's call, before SparseMoEDispatch lowers it, by the operands' declared roles
(passes/moe_op.py ROUTED), never by parameter names or by the kernels dispatch made of them:
Before (after FuseExpertGateUp; W13 [E, 2I, H], W2 [E, H, I] float32 parameters):
    y = mobilemoe.moe(x, router_weight, W13, W2, [shared ...])                  experts="float"
After:
    y = mobilemoe.moe(x, router_weight, W13__q4, W13__s, W2__q4, W2__s, [shared ...])   experts="int4"
where each stacked weight W [E, N, K] is replaced by two parameters, recorded as transforms
(replayed with mobilemoe.quant by compiler/params.py, see passes/common.py):
    W__q4  uint32 [E, N, K // 8]    packed codes (mobilemoe.quant.INT4_LAYOUT; interleaved for a dot
                                    ISA's kernels when given one)
    W__s   float16 [E, N, K // 32]  scales
named and recorded as QuantizeInt4Weights does its 2-D weights (its int4_params, int4_transforms).
SparseMoEDispatch then emits the INT4 expert kernels (moe_gemv, moe_gemv_weighted_sum, the grouped
*_int4 GEMMs) for an experts="int4" call. The router (moe_op.FLOAT_ROLES) stays float; the shared
expert's weights are left to QuantizeInt4Weights, which packs them with every other linear once
dispatch has lowered them to R.matmul. Fires on a call whose activations are float32 and whose
routed weights are all float32 parameters of static shape with K a multiple of 32 (the kernels take
all of them INT4 or none); any other call keeps its float experts. The fp32 weight is never
materialised: the kernels dequantize in the reduction.
"""
from __future__ import annotations

import dataclasses

import tvm
from tvm import relax

from tir_kernels.int4_dot import DotISA
from mobilemoe.quant import GROUP_SIZE

from . import moe_op
from .common import bindings, float_weights, rebuild, tensor_shape, weight_params
from .quantize_int4_weights import int4_params, int4_transforms


def _packable(attrs: moe_op.MoEAttrs, ops: dict, params: set) -> bool:
    """Every routed weight a float32 parameter [E, N, K], K % 32 == 0, and float32 activations."""
    if attrs.experts != "float" or ops["x"].ty.dtype != "float32":
        return False
    for role in attrs.routed():
        w, shape = ops[role], tensor_shape(ops[role])
        if w not in params or shape is None or len(shape) != 3 or shape[-1] % GROUP_SIZE or w.ty.dtype != "float32":
            return False
    return True


@tvm.transform.module_pass(opt_level=0, name="PackMoEExpertsInt4")
class PackMoEExpertsInt4:
    """interleave: as QuantizeInt4Weights' (the dot ISA whose expert kernels will read the codes)."""

    def __init__(self, interleave: DotISA | None = None):
        self.interleave = interleave

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        packed = {}  # float param -> (codes, scales), over every function (a Var belongs to one function)
        for func in mod.functions.values():
            if not isinstance(func, relax.Function):
                continue
            params = set(weight_params(func)) - {p for p in func.params if p.name in float_weights(func)}
            for value in bindings(func).values():
                found = moe_op.match(value)
                if found is not None and _packable(*found, params):
                    for role in found[0].routed():
                        w = found[1][role]
                        packed.setdefault(w, int4_params(w))
        if not packed:
            return mod

        def lower(bb, attrs, ops):
            if attrs.experts != "float" or not all(ops[r] in packed for r in attrs.routed()):
                return None
            int4 = dataclasses.replace(attrs, experts="int4")
            new = {r: e for r, e in ops.items() if r not in attrs.routed()}
            for role in attrs.routed():
                new.update(zip(moe_op.packed_roles(role), packed[ops[role]]))
            return moe_op.make(int4, new)

        out = moe_op.rewrite_calls(lower, mod)
        for gv, func in mod.functions_items():
            mine = [w for w in weight_params(func) if w in packed] if isinstance(func, relax.Function) else []
            if not mine:
                continue
            # a float weight something else still reads (not a mobilemoe.moe call) keeps both forms
            still = set(relax.analysis.free_vars(relax.analysis.remove_all_unused(out[gv].body)))
            replace = {w: ([w] if w in still else []) + list(packed[w]) for w in mine}
            transforms = [t for w in mine for t in int4_transforms(w, *packed[w], self.interleave)]
            out[gv] = rebuild(func, out[gv], replace, transforms)
        return out
