"""SparseMoEDispatch: each mobilemoe.moe call becomes routing + expert kernels that read only the k
selected experts' weights + the shared expert (passes/moe_op.py).

Before (after FuseExpertGateUp; W13 [E, 2I, H], W2 [E, H, I]):
    y = mobilemoe.moe(x, router_weight, W13, W2, [shared ...])        gate_up="fused"
  or, after PackMoEExpertsInt4, experts="int4" with (W13__q4, W13__s), (W2__q4, W2__s) in their place
After, routing (MoEAttrs.scoring on logits = x @ router_weight^T, passes/moe_op.emit_routing):
    w, ids = top-k of the logits / of their softmax                        # [N, k], [N, k]
  or, fused_routing (CPU strategies, float32): one call (tir_kernels/moe_route.py)
    w, ids = call_tir(moe_route, (x, router_weight[, router_bias]))
then static N (decode): per-token GEMVs
    gu  = call_tir(moe_gate_up, (x, ids, W13))                  # [N, k, 2I], gathers experts
    a   = silu(gu[..., :I]) * gu[..., I:]                          # [N, k, I]
    out = call_tir(moe_down_combine, (a, ids, w, W2))           # [N, H], routing weights applied
symbolic N (prefill): tokens grouped by expert, one GEMM per non-empty expert
    plan    = call_tir(moe_route_plan, (ids,))                  # (offsets [E + 1], order [N * k])
    gu  = call_tir(moe_grouped_gate_up, (x, plan[0], plan[1], W13))       # [N * k, 2I], sorted rows
    a   = silu(gu[:, :I]) * gu[:, I:]                                      # [N * k, I]
    out = call_tir(moe_grouped_down_combine, (a, plan[0], plan[1], w, W2)) # [N, H], scattered back
and y = out (+ the shared expert: R.matmul against R.permute_dims of its weights, passes/moe_op.emit_shared).
The float kernels come from tir_kernels/moe_float.py (TE) and moe_grouped.py (float32 only: other
dtypes keep the GEMVs). An experts="int4" call gets the INT4 kernels reading (codes, scales) in
place of each W: moe_gemv (moe_gemv_int4) and moe_gemv_weighted_sum (moe_gemv_weighted_sum_int4)
from tir_kernels/moe_gemv.py, moe_grouped_gate_up_int4 / moe_grouped_down_combine_int4 from
moe_grouped.py. The router's weight parameters are listed in the function attribute FLOAT_WEIGHTS
(passes/common.py): QuantizeInt4Weights leaves them float. A separate-form call (FuseExpertGateUp
not run) concatenates W1 and W3 at run time; a call whose expert weights have symbolic shapes is
left alone.
"""
from __future__ import annotations

import tvm
from tvm import relax

from tir_kernels import moe_float, moe_gemv, moe_gemv_weighted_sum
from tir_kernels.moe_grouped import moe_grouped_down_combine, moe_grouped_gate_up, moe_route_plan
from tir_kernels.moe_route import moe_route
from mobilemoe.quant import NIBBLES_PER_WORD

from . import moe_op
from .common import add_float_weights, static_dim, tensor_shape


def _int4(w) -> bool:
    """A routed weight as (codes, scales) (an experts="int4" call) rather than one float tensor."""
    return isinstance(w, tuple)


def _dims(w) -> list[int]:
    """[E, N, K] of a routed weight, float or (codes, scales)."""
    return tensor_shape(w[1])[:2] + [tensor_shape(w[0])[2] * NIBBLES_PER_WORD] if _int4(w) else tensor_shape(w)


def _gemv(bb, x, ids, w, w13, w2, I):
    """Decode: per-token GEMVs over the k selected experts; -> out [N, H] (not emitted)."""
    if _int4(w13):
        (E, N13, H), k, T, idx = _dims(w13), static_dim(ids, 1), x.ty.shape.values[0], str(ids.ty.dtype)
        gate_up = bb.add_func(moe_gemv(E, N13, H, k, index_dtype=idx), "moe_gemv_int4")
        gu = bb.emit(relax.call_tir(gate_up, [x, ids, *w13], relax.TensorType([T, k, N13], "float32")))
    else:
        gu = bb.emit(bb.call_te(moe_float.moe_gate_up, x, ids, w13, primfunc_name_hint="moe_gate_up"))
    g = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[0], end=[I]))
    u = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[I], end=[2 * I]))
    a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
    if _int4(w2):
        down = bb.add_func(moe_gemv_weighted_sum(E, H, I, k, index_dtype=idx), "moe_gemv_weighted_sum_int4")
        return relax.call_tir(down, [a, ids, w, *w2], relax.TensorType([T, H], "float32"))
    return bb.call_te(moe_float.moe_down_combine, a, ids, w, w2, primfunc_name_hint="moe_down_combine")


def _grouped(bb, x, ids, w, w13, w2, I):
    """Prefill: sort the (token, slot) rows by expert, grouped GEMMs, scatter back (moe_grouped.py)."""
    (E, N13, H), k, T = _dims(w13), static_dim(ids, 1), x.ty.shape.values[0]
    weights, sfx = ("int4", "_int4") if _int4(w13) else ("float32", "")
    plan = bb.add_func(moe_route_plan(E, k, ids.ty.dtype), "moe_route_plan")
    plan = bb.emit(relax.call_tir(plan, [ids], [relax.TensorType([E + 1], "int32"),
                                                relax.TensorType([T * k], "int32")]))
    offsets, order = bb.emit(relax.TupleGetItem(plan, 0)), bb.emit(relax.TupleGetItem(plan, 1))
    gate_up = bb.add_func(moe_grouped_gate_up(E, N13, H, k, weights), "moe_grouped_gate_up" + sfx)
    gu = bb.emit(relax.call_tir(gate_up, [x, offsets, order, *_operands(w13)],
                                relax.TensorType([T * k, N13], "float32")))
    g = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[0], end=[I]))
    u = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[I], end=[2 * I]))
    a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
    down = bb.add_func(moe_grouped_down_combine(E, H, I, k, weights), "moe_grouped_down_combine" + sfx)
    return relax.call_tir(down, [a, offsets, order, w, *_operands(w2)], relax.TensorType([T, H], "float32"))


def _operands(w) -> list:
    return list(w) if _int4(w) else [w]


def _fused_routing(bb, attrs, ops):
    """-> (w [N, k] float32, ids [N, k] int64) from ONE call of tir_kernels/moe_route.py (logits, top-k and
    the weights of each token) instead of emit_routing's matmul + softmax + topk ops (four kernels)."""
    x, router = ops["x"], ops["router_weight"]
    (E, H), k, T = tensor_shape(router), attrs.top_k, x.ty.shape.values[0]
    func = bb.add_func(moe_route(E, H, k, attrs.scoring, attrs.norm_topk_prob, attrs.router_bias), "moe_route")
    args = [x, router] + ([ops["router_bias"]] if attrs.router_bias else [])
    out = bb.emit(relax.call_tir(func, args, [relax.TensorType([T, k], "float32"), relax.TensorType([T, k], "int64")]))
    return bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))


@tvm.transform.module_pass(opt_level=0, name="SparseMoEDispatch")
class SparseMoEDispatch:
    """group_prefill=False keeps the per-token GEMVs for symbolic N too: the grouped kernels are
    CPU (llvm) kernels, scheduled by hand, with no GPU schedule."""

    def __init__(self, group_prefill: bool = True, fused_routing: bool = False):
        self.group_prefill = group_prefill
        self.fused_routing = fused_routing  # CPU: routing as one moe_route kernel (_fused_routing)

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        routers = []

        def lower(bb, attrs, ops):
            x = ops["x"]
            if any(tensor_shape(ops[r]) is None for r in attrs.routed_operands()):
                return None
            w13, w2 = moe_op.gate_up(bb, attrs, ops), moe_op.expert_weight(attrs, ops, "w2")
            I = _dims(w2)[2]
            fused = self.fused_routing and x.ty.dtype == "float32" and all(
                ops[r].ty.dtype == "float32" and tensor_shape(ops[r]) is not None  # static router shapes
                for r in ("router_weight", *(["router_bias"] if attrs.router_bias else [])))
            w, ids = _fused_routing(bb, attrs, ops) if fused else moe_op.emit_routing(bb, attrs, ops)
            grouped = (self.group_prefill and static_dim(x, 0) is None
                       and all(v.ty.dtype == "float32" for v in (x, w, *([] if _int4(w13) else [w13, w2]))))
            out = (_grouped if grouped else _gemv)(bb, x, ids, w, w13, w2, I)
            routers.append(ops["router_weight"])
            return moe_op.emit_shared(bb, attrs, ops, out)

        out = moe_op.rewrite_calls(lower, mod)
        for gv, func in out.functions_items():
            if isinstance(func, relax.Function):
                out[gv] = add_float_weights(func, [r for r in routers if any(r.same_as(p) for p in func.params)])
        return relax.transform.DeadCodeElimination()(out)
