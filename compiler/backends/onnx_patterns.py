"""Math patterns of an exported program that one ONNX Runtime op computes (onnx_program.py emits it).

Each matcher looks at one FX node (the pattern's root) and returns what the fused op needs, or None;
the nodes inside the pattern are then not translated unless something else uses them. They match
math, not modules: an RMSNorm anywhere in the program (the block norms, OLMoE's q/k norm over the
projection, Qwen3's per head) is SimplifiedLayerNormalization; rotate-half RoPE with its cos/sin
gathered from a table by position ids is RotaryEmbedding.

    rms_norm     w * (x * rsqrt(mean(x ** 2, -1, keepdim) + eps))        -> {x, weight, eps}
                 (x = a + b, a residual add: SkipSimplifiedLayerNormalization, which gives both)
    rotary       x * cos + cat(-x[..., h:], x[..., :h]) * sin, cos/sin = table[positions] with
                 the table's halves equal (rotate-half)                   -> {x, positions, cos, sin}
    as_matmul    einsum of two operands that is a (broadcast) batched matmul -> the unsqueeze axes of b
"""
from __future__ import annotations

import torch
from torch.fx import Node

aten = torch.ops.aten


def _is(n, *targets) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in targets


def through_casts(n: Node) -> Node:
    """n without the no-op dtype casts in front of it (aten.to to the dtype it already has)."""
    while _is(n, aten.to.dtype) and n.args[0].meta["val"].dtype == n.args[1]:
        n = n.args[0]
    return n


def _pair(n: Node):
    """The two operands of a binary node, both orders."""
    a, b = n.args[0], n.args[1]
    return ((a, b), (b, a))


def rms_norm(node: Node, is_param) -> dict | None:
    if not _is(node, aten.mul.Tensor):
        return None
    for w, y in _pair(node):
        if not (is_param(w) and isinstance(y, Node) and w.meta["val"].dim() == 1):
            continue
        y = through_casts(y)
        if not _is(y, aten.mul.Tensor):
            continue
        for x, r in _pair(y):
            if not (_is(r, aten.rsqrt.default) and _is(r.args[0], aten.add.Tensor)):
                continue
            mean, eps = r.args[0].args[:2]
            if not (_is(mean, aten.mean.dim) and isinstance(eps, float) and len(mean.args) > 2 and mean.args[2]):
                continue
            rank = x.meta["val"].dim()
            sq = mean.args[0]
            if (list(mean.args[1]) in ([-1], [rank - 1]) and _is(sq, aten.pow.Tensor_Scalar) and sq.args[0] is x
                    and sq.args[1] == 2 and w.meta["val"].shape[0] == x.meta["val"].shape[-1]):
                return {"x": x, "weight": w, "eps": eps}
    return None


def residual_add(n: Node) -> bool:
    """n = a + b of two float32 tensors of one shape (SkipSimplifiedLayerNormalization's input and skip)."""
    if not _is(n, aten.add.Tensor) or len(n.args) != 2 or n.kwargs.get("alpha", 1) != 1:
        return False
    a, b = n.args
    return (isinstance(a, Node) and isinstance(b, Node) and a.meta["val"].shape == b.meta["val"].shape
            and a.meta["val"].dtype == b.meta["val"].dtype == torch.float32)


def _half(n, x: Node, lower: bool) -> bool:
    """n is x[..., :h] (lower) or x[..., h:] of the last axis, h = D / 2."""
    if not _is(n, aten.slice.Tensor) or n.args[0] is not x:
        return False
    d = x.meta["val"].shape[-1]
    dim, start, end = (*n.args[1:], 0, None, None)[:3]
    if dim not in (-1, x.meta["val"].dim() - 1) or (len(n.args) > 4 and n.args[4] != 1):
        return False
    return (start, end) == (0, d // 2) if lower else (start == d // 2 and (end is None or end >= d))


def _table_rows(n: Node, is_buffer):
    """n = table[positions] viewed as [B, 1, S, D] (through casts) -> (table node, positions node [B, S])."""
    n = through_casts(n)
    if not _is(n, aten.view.default, aten.reshape.default):
        return None
    shape = n.meta["val"].shape
    sel = n.args[0]
    if len(shape) != 4 or shape[1] != 1 or not _is(sel, aten.index_select.default) or sel.args[1] != 0:
        return None
    table, idx = sel.args[0], sel.args[2]
    if not (is_buffer(table) and _is(idx, aten.reshape.default, aten.view.default)):
        return None
    positions = idx.args[0]
    if positions.meta["val"].dim() != 2:
        return None
    return table, positions


def rotary(node: Node, is_buffer) -> dict | None:
    if not _is(node, aten.add.Tensor):
        return None
    for m1, m2 in _pair(node):
        if not (_is(m1, aten.mul.Tensor) and _is(m2, aten.mul.Tensor)):
            continue
        for x, cos in _pair(m1):
            for rot, sin in _pair(m2):
                if not (isinstance(x, Node) and x.meta["val"].dim() == 4 and _is(rot, aten.cat.default)):
                    continue
                parts = rot.args[0]
                dim = rot.args[1] if len(rot.args) > 1 else 0
                if (len(parts) != 2 or dim not in (-1, 3) or not _is(parts[0], aten.neg.default)
                        or not _half(parts[0].args[0], x, lower=False) or not _half(parts[1], x, lower=True)):
                    continue
                c, s = _table_rows(cos, is_buffer), _table_rows(sin, is_buffer)
                if c and s and c[1] is s[1]:
                    return {"x": x, "positions": c[1], "cos": c[0], "sin": s[0]}
    return None


def as_matmul(equation: str, a: Node, b: Node) -> list[int] | None:
    """For einsum `equation` of a [..., i, k] and b [..., k, j] -> [..., i, j] (b's batch letters a
    subsequence of a's, missing ones broadcast): the axes to unsqueeze b at; None when it is another einsum."""
    ins, out = equation.replace(" ", "").split("->")
    sa, sb = ins.split(",")
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or len(sa) < 2 or len(sb) < 2:
        return None
    batch, (i, k) = sa[:-2], sa[-2:]
    kb, j = sb[-2], sb[-1]
    if kb != k or out != batch + i + j or not set(sb[:-2]) <= set(batch):
        return None
    pos = [batch.index(c) for c in sb[:-2]]
    if pos != sorted(pos):
        return None
    return [n for n, c in enumerate(batch) if c not in sb[:-2]]
