"""QuantizeInt4Weights: matmul weights become group-32 INT4 with dequantization fused in the kernels.

Each weight parameter W [N, K] that a rewritten op reads is replaced by two parameters, recorded
as transforms (replayed with mobilemoe.quant, see passes/common.py):
    W__q4  uint32 [N, K // 8]       packed codes (layout mobilemoe.quant.INT4_LAYOUT; interleaved for
                                    a dot ISA's kernels when given one, mobilemoe.quant.interleave_int4)
    W__s   float16 [N, K // 32]     scales
Rewrites (x: activations, float32):
    R.matmul(x, R.permute_dims(W))          -> reshape . call_tir(int4_matmul, (x2d, W__q4, W__s))
    R.take(W, ids, axis=0)   (embedding)    -> call_tir(embedding_int4, (ids, W__q4, W__s))
The routed experts are not this pass's: PackMoEExpertsInt4 packs them on the mobilemoe.moe call
(by the op's roles) and SparseMoEDispatch emits their INT4 kernels. The shared expert, lowered by
dispatch to R.matmul, is packed here with every other linear. Parameters listed in the function's
FLOAT_WEIGHTS (passes/common.py: the MoE router, listed by SparseMoEDispatch) and norms stay float.
A weight whose K is not a multiple of 32 stays float.
The fp32 weight is never materialised: the kernels dequantize in the reduction.
"""
from __future__ import annotations

import tvm
from tvm import relax

from tir_kernels import int4_matmul
from tir_kernels.embedding import embedding_int4
from tir_kernels.int4_dot import DotISA, interleave_for, scales_interleave_for
from mobilemoe.quant import GROUP_SIZE, NIBBLES_PER_WORD

from .common import bindings, float_weights, is_op, rebuild, tensor_shape, weight_params


def int4_params(w: relax.Var) -> tuple[relax.Var, relax.Var]:
    """The (codes, scales) parameters that replace the float weight `w` [.., N, K]."""
    *lead, n, k = tensor_shape(w)
    return (relax.Var(w.name + "__q4", relax.TensorType([*lead, n, k // NIBBLES_PER_WORD], "uint32")),
            relax.Var(w.name + "__s", relax.TensorType([*lead, n, k // GROUP_SIZE], "float16")))


def int4_transforms(w: relax.Var, q: relax.Var, s: relax.Var, interleave: DotISA | None) -> list[dict]:
    """The parameter transforms that make `q` and `s` of `w` (the codes interleaved for `interleave`'s
    kernels when given: {"interleave": [rows, lanes]}, int4_dot.interleave_for, that compiler/params.py applies;
    the scales too for row-lane ISAs, int4_dot.scales_interleave_for)."""
    codes = {"out": q.name, "op": "int4_codes", "inputs": [w.name]}
    scales = {"out": s.name, "op": "int4_scales", "inputs": [w.name]}
    if interleave is not None:
        codes["interleave"] = list(interleave_for(interleave, *tensor_shape(w)[-2:]))
        layout = scales_interleave_for(interleave, *tensor_shape(w)[-2:])
        if layout is not None:  # row-lane kernels (int4_rows.py) read a group's row scales as one vector
            scales["interleave"] = list(layout)
    return [codes, scales]


def quantizable(param: relax.Var) -> bool:
    shape = tensor_shape(param)
    return shape is not None and len(shape) == 2 and shape[-1] % GROUP_SIZE == 0


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.func_bindings: dict = {}
        self.params: set = set()  # weight params that may become INT4 (not the function's FLOAT_WEIGHTS)
        self.quant: dict = {}  # float param -> (codes var, scales var)

    def _q(self, w: relax.Var):
        if w not in self.quant:
            self.quant[w] = int4_params(w)
        return self.quant[w]

    def _param(self, e):
        return e if isinstance(e, relax.Var) and e in self.params and quantizable(e) else None

    def _tir(self, prim, name, args, out_ty):
        gv = self.builder_.add_func(prim, name)
        return relax.call_tir(gv, args, out_ty)

    def visit_call_(self, call):
        b = self.func_bindings
        if is_op(call, "relax.matmul"):
            pd = b.get(call.args[1])
            w = self._param(pd.args[0]) if is_op(pd, "relax.permute_dims") else None
            if w is not None:
                return self._matmul(self.visit_expr(call.args[0]), w)
        if is_op(call, "relax.take") and int(call.attrs.axis) == 0:
            w = self._param(call.args[0])
            if w is not None:
                return self._embedding(self.visit_expr(call.args[1]), w)
        return super().visit_call_(call)

    def _matmul(self, x, w):
        N, K = tensor_shape(w)
        q, s = self._q(w)
        shape = list(x.ty.shape.values)
        x2 = self.builder_.emit(relax.op.reshape(x, [-1, K])) if len(shape) != 2 else x
        call = self._tir(int4_matmul(N, K), "int4_matmul", [x2, q, s],
                         relax.TensorType([x2.ty.shape.values[0], N], "float32"))
        if len(shape) == 2:
            return call
        return relax.op.reshape(self.builder_.emit(call), [*shape[:-1], N])

    def _embedding(self, ids, w):
        q, s = self._q(w)
        shape = list(ids.ty.shape.values)
        flat = self.builder_.emit(relax.op.reshape(ids, [-1])) if len(shape) != 1 else ids
        V, H = tensor_shape(w)
        y = self.builder_.emit(self._tir(embedding_int4(V, H, str(flat.ty.dtype)), "embedding_int4", [flat, q, s],
                                         relax.TensorType([flat.ty.shape.values[0], H], "float32")))
        return relax.op.reshape(y, [*shape, H]) if len(shape) != 1 else y


@tvm.transform.module_pass(opt_level=0, name="QuantizeInt4Weights")
class QuantizeInt4Weights:
    """interleave: the dot ISA (tir_kernels.int4_dot.DotISA) whose kernels will read the codes
    (select_dot_kernels.py): each int4_codes transform then records the interleaved word order
    ({"interleave": [rows, lanes]}, int4_dot.interleave_for) that compiler/params.py applies."""

    def __init__(self, interleave: DotISA | None = None):
        self.interleave = interleave

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        rw = _Rewriter(mod)
        updates = []
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            keep = float_weights(func)
            rw.func_bindings, rw.quant = bindings(func), {}
            rw.params = {p for p in weight_params(func) if p.name not in keep}
            body = rw.visit_expr(func)
            replace, transforms = {}, []
            for w, (q, s) in rw.quant.items():
                replace[w] = [q, s]
                transforms += int4_transforms(w, q, s, self.interleave)
            updates.append((gv, func, body, replace, transforms))
        out = rw.builder_.get()
        for gv, func, body, replace, transforms in updates:
            # a float param still used elsewhere (e.g. not every use was rewritten) keeps both forms
            used = set(relax.analysis.free_vars(relax.analysis.remove_all_unused(body.body)))
            for w in list(replace):
                if w in used:
                    replace[w] = [w, *replace[w]]
            out[gv] = rebuild(func, body, replace, transforms)
        return relax.transform.CanonicalizeBindings()(relax.transform.DeadCodeElimination()(out))
