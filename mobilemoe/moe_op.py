"""The MoE block as one operator: `mobilemoe::moe`, what torch.export records for each MoE layer.

    y = moe(x, router_weight, router_bias, w1, w3, w2, shared_w1, shared_w3, shared_w2, shared_gate,
            top_k=k, scoring="topk_softmax" | "softmax_topk", norm_topk_prob=bool)

    x [N, H] -> y [N, H]; router_weight [E, H], router_bias [E] or None; experts stacked:
    w1 (gate) [E, I, H], w3 (up) [E, I, H], w2 (down) [E, H, I]; the shared expert (None: none)
    shared_w1 / shared_w3 [S, H], shared_w2 [H, S], shared_gate [1, H] or None.

Routing (`route`), on logits = x @ router_weight^T + router_bias in float32:
    "topk_softmax"   top-k of the logits (sorted), softmax over the k (ours, Granite)
    "softmax_topk"   top-k of softmax(logits) over all E (OLMoE, Qwen-MoE, Mixtral), renormalised
                     to sum 1 when norm_topk_prob
then y = sum_j w_j * expert_{i_j}(x) + shared(x), expert(x) = w2 @ (silu(w1 @ x) * (w3 @ x)), and
shared(x) times sigmoid(x @ shared_gate^T) when there is a gate (Qwen2-MoE). Several shared experts
are one of their summed width (as the HF families store them), so the operator has 0 or 1.

The operator's attributes (top_k, scoring, norm_topk_prob) and which optional tensors it gets are
the routing variant; its operands are the layer's parameters. The compiler maps it to one call
(compiler/importer.py, passes/moe_op.py), on which expert fusion, sparse dispatch and INT4 packing
act. Its eager implementation here is the dense reference: every expert on every token, combined
with a [N, E] routing matrix (MoE._dense of mobilemoe/model.py); it has no autograd (training uses
MoE's "grouped" / "gather" / "dense" implementations).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

SCORINGS = ("topk_softmax", "softmax_topk")


def route(logits: torch.Tensor, top_k: int, scoring: str, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] float32 -> (weights [N, k] float32, expert ids [N, k]), ids sorted by weight."""
    if scoring == "softmax_topk":
        w, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
        if norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, ids
    if scoring != "topk_softmax":
        raise ValueError(f"mobilemoe::moe: scoring must be one of {SCORINGS}, got {scoring!r}")
    top_logits, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top_logits, dim=-1), ids


def dense_experts(x, w, ids, w1, w3, w2):
    """Every expert on every token, combined by the routing weights: x [N, H], w/ids [N, k] -> [N, H]."""
    combine = (F.one_hot(ids, w1.shape[0]).to(x.dtype) * w[..., None]).sum(1)  # [N, E]
    g = torch.einsum("nh,eih->nei", x, w1)
    u = torch.einsum("nh,eih->nei", x, w3)
    y = torch.einsum("nei,ehi->neh", F.silu(g) * u, w2)  # [N, E, H]
    return torch.einsum("neh,ne->nh", y, combine)


def shared_expert(x, w1, w3, w2, gate):
    """The always-on SwiGLU expert, gated by sigmoid(x @ gate^T) when `gate` is given: x [N, H] -> [N, H]."""
    y = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    return y if gate is None else torch.sigmoid(F.linear(x, gate)) * y  # [N, 1] * [N, H]


def reference(x, router_weight, router_bias, w1, w3, w2, shared_w1, shared_w3, shared_w2, shared_gate,
              top_k: int, scoring: str, norm_topk_prob: bool) -> torch.Tensor:
    """The op in plain PyTorch ops (its eager kernel; a backend without the op decomposes it with this)."""
    logits = F.linear(x, router_weight, router_bias).float()
    w, ids = route(logits, top_k, scoring, norm_topk_prob)
    y = dense_experts(x, w.to(x.dtype), ids, w1, w3, w2)
    if shared_w1 is not None:
        y = y + shared_expert(x, shared_w1, shared_w3, shared_w2, shared_gate)
    return y


@torch.library.custom_op("mobilemoe::moe", mutates_args=())
def moe(x: torch.Tensor, router_weight: torch.Tensor, router_bias: Optional[torch.Tensor],
        w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
        shared_w1: Optional[torch.Tensor], shared_w3: Optional[torch.Tensor], shared_w2: Optional[torch.Tensor],
        shared_gate: Optional[torch.Tensor], top_k: int, scoring: str, norm_topk_prob: bool) -> torch.Tensor:
    """x [N, H] -> [N, H]: the MoE block of the module docstring (the dense reference)."""
    return reference(x, router_weight, router_bias, w1, w3, w2, shared_w1, shared_w3, shared_w2, shared_gate,
                     top_k, scoring, norm_topk_prob)


@moe.register_fake
def _(x, router_weight, router_bias, w1, w3, w2, shared_w1, shared_w3, shared_w2, shared_gate,
      top_k, scoring, norm_topk_prob):
    return torch.empty_like(x)


ATTRIBUTES = ("top_k", "scoring", "norm_topk_prob")
FLOAT_ROLES = ("router_weight", "router_bias")  # operands that stay float in the INT4 model (the compiler's
# FLOAT_WEIGHTS, passes/common.py, and QAT's, mobilemoe/quant.py float_weight_names)


def call_operands(node, params: dict) -> tuple[dict, dict]:
    """One mobilemoe::moe node of an exported graph -> (attributes {top_k, scoring, norm_topk_prob},
    {operand: parameter name or None}); params: placeholder name -> parameter name."""
    schema = [a.name for a in torch.ops.mobilemoe.moe.default._schema.arguments]
    args = dict(zip(schema, node.args))
    operands = {k: None if v is None else params[v.name] for k, v in args.items() if k not in ATTRIBUTES and k != "x"}
    return {k: args[k] for k in ATTRIBUTES}, operands


def exported_calls(ep) -> list[tuple[dict, dict]]:
    """Each mobilemoe::moe of a torch.export ExportedProgram, in graph (= layer) order, as
    call_operands gives it, with the names of the program's state dict: what a backend maps the op
    from (compiler/backends/onnx_program.py)."""
    params = ep.graph_signature.inputs_to_parameters
    return [call_operands(node, params) for node in ep.graph.nodes
            if node.op == "call_function" and node.target == torch.ops.mobilemoe.moe.default]
