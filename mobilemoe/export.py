"""torch.export of the two inference entry points the compiler imports, in one of two cache layouts.

cache="layers" (the TVM artifact): the cache is 2L inputs and 2L outputs, one per layer and K/V:

    prefill(tokens [1, S] int64, positions [1, S] int64, k_0, v_0, ..., k_{L-1}, v_{L-1})
        -> (logits [1, V], k_0', v_0', ..., k_{L-1}', v_{L-1}')
    decode (token  [1, 1] int64, position  [1, 1] int64, k_0, v_0, ...) -> (logits [1, V], k_0', ...)

    k_l [1, nkv, D, P], v_l [1, nkv, P, D] float (keys transposed: mobilemoe/model.py); k_l', v_l':
    the inputs with the S new tokens appended (P+S positions).

cache="stacked" (the MLIR export): one kv input [L, 2, 1, nkv, P, D] and one kv output [L, 2, 1, nkv, P+S, D].

cache="inplace" (the TVM artifact's decode by default; its prefill too under a memory budget): the
same 2L caches at a fixed capacity C (Dim "capacity"), k_l [1, nkv, D, C], v_l [1, nkv, C, D]; each
token is written at slot `position` and attends to slots 0..position (mobilemoe/kv_cache.py's custom
ops, which the importer maps onto in-place kernels); the outputs are the written caches (in the
artifact: the same buffers).

logits are those of the last position (what generation needs). S is a named dynamic dim ("seq"),
the cache length P is one unbounded Dim("past") shared by the per-layer inputs (Dim.DYNAMIC for the
stacked one; a bounded Dim(min, max) on P trips torch.export's guards). Each MoE layer exports as one
mobilemoe::moe op (MoE impl "op", mobilemoe/moe_op.py), which the compiler maps to one call.
"""
from __future__ import annotations

import warnings

import torch
from torch.export import Dim, ExportedProgram

from .kv_cache import BLOCK
from .model import MobileMoE


CACHE_LAYOUTS = ("layers", "stacked", "inplace")

# torch 2.13's own export and decomposition code (dynamo, pytree copies) still uses the LeafSpec it
# deprecated: a FutureWarning per export that no user of ours can act on
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


class _Entry(torch.nn.Module):
    def __init__(self, model: MobileMoE):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, kv):
        logits, kv = self.model(tokens, positions, kv, last_only=True)
        return logits[:, 0], kv


class _LayersEntry(_Entry):
    def forward(self, tokens, positions, cache):  # cache: [k_0, v_0, k_1, v_1, ...]
        pairs = [(cache[2 * i], cache[2 * i + 1]) for i in range(len(cache) // 2)]
        logits, kv = self.model(tokens, positions, pairs, last_only=True)
        return (logits[:, 0], *[t for pair in kv for t in pair])


class _InplaceEntry(_Entry):
    def forward(self, tokens, positions, cache):  # cache: [k_0, v_0, ...] at a fixed capacity
        pairs = [(cache[2 * i], cache[2 * i + 1]) for i in range(len(cache) // 2)]
        logits, kv = self.model(tokens, positions, pairs, last_only=True, inplace=True)
        return (logits[:, 0], *[t for pair in kv for t in pair])


def example_inputs(model: MobileMoE, seq: int, past: int, cache: str = "stacked"):
    """(tokens, positions, kv) in the given cache layout (kv: a list of 2L tensors for "layers")."""
    c = model.config
    tokens = torch.zeros(1, seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq, dtype=torch.int64)[None]
    kv = torch.zeros(c.num_layers, 2, 1, c.num_kv_heads, past, c.head_dim, dtype=model.embed.weight.dtype)
    if cache in ("layers", "inplace"):
        kv = [kv[i, j].transpose(-1, -2).contiguous() if j == 0 else kv[i, j].clone()
              for i in range(c.num_layers) for j in range(2)]
    return tokens, positions, kv


def export_entry(model: MobileMoE, kind: str, cache: str = "layers") -> ExportedProgram:
    """Export `prefill` (dynamic S and P) or `decode` (S = 1, dynamic P), each MoE layer one mobilemoe::moe, with
    grouped-query attention that never repeats K/V (Attention._grouped), the cache in `cache` layout."""
    if kind not in ("prefill", "decode"):
        raise ValueError(f"entry point must be 'prefill' or 'decode', got {kind!r}")
    if cache not in CACHE_LAYOUTS:
        raise ValueError(f"cache layout must be one of {CACHE_LAYOUTS}, got {cache!r}")
    was = [layer.moe.impl for layer in model.layers if layer.moe is not None]
    model.set_moe_impl("op")
    for layer in model.layers:
        layer.attn.grouped = True  # attention without repeating K/V per query head
    try:
        # one named dim for every layer's cache length (Dim.DYNAMIC per input would give each layer
        # its own symbol, which TVM cannot prove equal to the mask's)
        p = {"layers": Dim("past"), "inplace": Dim("capacity"), "stacked": Dim.DYNAMIC}[cache]
        seq, c = (5 if kind == "prefill" else 1), model.config
        # in place: a capacity of two blocks, the tokens from slot 3
        args = example_inputs(model, seq=seq, past=2 * BLOCK if cache == "inplace" else 3, cache=cache)
        if cache == "inplace":
            args = (args[0], torch.arange(3, 3 + seq)[None], args[2])
        kv = [{3: p}, {2: p}] * c.num_layers if cache != "stacked" else {4: p}
        s = Dim("seq", min=2, max=model.config.max_seq_len) if kind == "prefill" else None
        shapes = {"tokens": s and {1: s}, "positions": s and {1: s}, ("kv" if cache == "stacked" else "cache"): kv}
        entry = {"layers": _LayersEntry, "inplace": _InplaceEntry, "stacked": _Entry}[cache](model.eval())
        with torch.no_grad():
            return torch.export.export(entry, args, dynamic_shapes=shapes)
    finally:
        for layer in model.layers:
            del layer.attn.grouped  # back to the class default (SDPA)
        for layer, impl in zip((layer for layer in model.layers if layer.moe is not None), was):
            layer.moe.impl = impl
