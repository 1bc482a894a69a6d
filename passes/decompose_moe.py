"""DecomposeMoE: each mobilemoe.moe call becomes its dense reference (passes/moe_op.py `decompose`).

Before:
    y = mobilemoe.moe(x, router_weight, w1, w3, w2, ...)            # one call per MoE layer
After (every expert on every token; the form the exporter emitted before the op existed):
    logits = R.matmul(x, R.permute_dims(router_weight));  w, ids = top-k routing (MoEAttrs.scoring)
    combine = R.sum(onehot(ids) * R.expand_dims(w, [2]), axis=[1])                        # [N, E]
    g = R.einsum((x, w1), "nh,eih->nei");  u = R.einsum((x, w3), "nh,eih->nei")          # [N, E, I]
    y = R.einsum((R.einsum((g * R.sigmoid(g) * u, w2), "nei,ehi->neh"), combine), "neh,ne->nh")
        (+ the shared expert)
Not in the compile pipeline (SparseMoEDispatch lowers every call there): the op's meaning in plain
Relax, for tests and for a module that must build without the MoE kernels. A call with INT4 experts
(PackMoEExpertsInt4) has no dense form here and stays.
"""
from __future__ import annotations

import tvm

from .moe_op import decompose, rewrite_calls


@tvm.transform.module_pass(opt_level=0, name="DecomposeMoE")
class DecomposeMoE:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_calls(lambda bb, attrs, ops: decompose(bb, attrs, ops) if attrs.experts == "float" else None,
                             mod)
