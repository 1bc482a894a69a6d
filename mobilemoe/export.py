"""torch.export of the two inference entry points the compiler imports.

    prefill(tokens [1, S] int64, positions [1, S] int64, kv [L, 2, 1, nkv, P, D]) -> (logits [1, V], kv')
    decode (token  [1, 1] int64, position  [1, 1] int64, kv [L, 2, 1, nkv, P, D]) -> (logits [1, V], kv')

logits are those of the last position (what generation needs); kv' = kv with the new tokens
appended ([L, 2, 1, nkv, P+S, D]). S is a named dynamic dim ("seq"), the cache length P is
Dim.DYNAMIC (a bounded Dim(min, max) on P trips torch.export's guards). The MoE layers export in the
"dense" form (see model.py), which the compiler's passes rewrite into sparse dispatch.
"""
from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from .model import MobileMoE


class _Entry(torch.nn.Module):
    def __init__(self, model: MobileMoE):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, kv):
        logits, kv = self.model(tokens, positions, kv, last_only=True)
        return logits[:, 0], kv


def example_inputs(model: MobileMoE, seq: int, past: int):
    c = model.config
    tokens = torch.zeros(1, seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq, dtype=torch.int64)[None]
    kv = torch.zeros(c.num_layers, 2, 1, c.num_kv_heads, past, c.head_dim, dtype=model.embed.weight.dtype)
    return tokens, positions, kv


def export_entry(model: MobileMoE, kind: str) -> ExportedProgram:
    """Export `prefill` (dynamic S and P) or `decode` (S = 1, dynamic P) in the dense MoE form, with
    grouped-query attention that never repeats K/V (Attention._grouped)."""
    if kind not in ("prefill", "decode"):
        raise ValueError(f"entry point must be 'prefill' or 'decode', got {kind!r}")
    was = [layer.moe.impl for layer in model.layers if layer.moe is not None]
    model.set_moe_impl("dense")
    for layer in model.layers:
        layer.attn.grouped = True  # attention without repeating K/V per query head
    try:
        p = Dim.DYNAMIC
        if kind == "prefill":
            s = Dim("seq", min=2, max=model.config.max_seq_len)
            args = example_inputs(model, seq=5, past=3)
            shapes = {"tokens": {1: s}, "positions": {1: s}, "kv": {4: p}}
        else:
            args = example_inputs(model, seq=1, past=3)
            shapes = {"tokens": None, "positions": None, "kv": {4: p}}
        with torch.no_grad():
            return torch.export.export(_Entry(model.eval()), args, dynamic_shapes=shapes)
    finally:
        for layer in model.layers:
            del layer.attn.grouped  # back to the class default (SDPA)
        for layer, impl in zip((layer for layer in model.layers if layer.moe is not None), was):
            layer.moe.impl = impl
