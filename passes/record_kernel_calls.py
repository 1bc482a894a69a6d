"""RecordKernelCalls: analysis only; each entry's kernel calls in order, with the layer part whose
weights they read, for the manifest (compiler.bench --profile groups kernel times by them).

Before / After: the module unchanged. `into` gets {entry: [[kernel, part, n], ...]}: the entry's
R.call_tir callees in order, run-length encoded, e.g. for a decode step
    [["fused_int4_matmul", "attention", 3], ["attention_softmax", "attention", 1], ...]

Layer parts come from the weights a kernel reads (LAYER_PARTS: attention projections, router,
routed experts, shared expert, dense FFN, norms -> "other", embedding / LM head -> "other"). A
kernel that reads no weight belongs to the previous weight-reading kernel's part (attention's
softmax after the q/k/v projections, routing's top-k after the router), except the kernels that
lead into a norm's weight (the norm itself, the residual add before it), which are "other".
"""
from __future__ import annotations

import re

import tvm
from tvm import relax

from .kernel_workloads import is_call_tir

PARTS = ("attention", "router", "routed experts", "shared expert", "dense ffn", "other")
LAYER_PARTS = [  # (regex on the Relax parameter name, part); first match wins
    (r"_norm_weight", "norm"),
    (r"_attn_w[qkvo]_", "attention"),
    (r"_moe_router_", "router"),
    (r"_moe_shared_", "shared expert"),
    (r"_moe_w\d+_", "routed experts"),
    (r"^expert_pool_\d+$", "routed experts"),  # read through the expert cache (use_expert_slots.POOL_NAME)
    (r"_ffn_w\d_", "dense ffn"),
    (r"_(embed|lm_head)_", "other"),
]


def weight_part(name: str) -> str | None:
    for pattern, part in LAYER_PARTS:
        if re.search(pattern, name):
            return part
    return None


def kernel_calls(func: relax.Function, param_names: set[str]) -> list[list]:
    """[[kernel, part, count], ...] of a Relax function's R.call_tir, in order, run-length encoded."""
    calls = []  # [kernel, weight part or None]
    for block in func.body.blocks:
        for binding in block.bindings:
            if is_call_tir(binding.value):
                reads = [a.name for a in binding.value.args[1].fields
                         if isinstance(a, relax.Var) and a.name in param_names]
                parts = [p for p in map(weight_part, reads) if p]
                calls.append([binding.value.args[0].name_hint, parts[0] if parts else None])
    parts, prev = [], None
    for i, (_, part) in enumerate(calls):
        if part is None:
            nxt = next((p for _, p in calls[i + 1:] if p), None)
            part = "other" if nxt == "norm" or prev is None else prev
        else:
            prev = part
        parts.append("other" if part == "norm" else part)
    out = []
    for (kernel, _), part in zip(calls, parts):
        if out and out[-1][0] == kernel and out[-1][1] == part:
            out[-1][2] += 1
        else:
            out.append([kernel, part, 1])
    return out


@tvm.transform.module_pass(opt_level=0, name="RecordKernelCalls")
class RecordKernelCalls:
    """Analysis only: fills `into` with {entry: kernel_calls(entry)}; returns the module unchanged."""

    def __init__(self, into: dict):
        self.into = into

    def transform_module(self, mod, ctx):
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                self.into[gv.name_hint] = kernel_calls(func, {p.name for p in func.params})
        return mod
