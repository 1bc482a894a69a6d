"""The in-place KV cache: fixed capacity, each step writes its slot, attention reads the valid prefix.

    k_l [1, nkv, D, C], v_l [1, nkv, C, D]   (the "layers" layout of mobilemoe/model.py at capacity C)

A decode step at position p (model(..., inplace=True)) writes the new token's K and V at slot p of
every layer (kv_write) and attends to slots 0..p (prefix_attention); slots past p hold stale or zero
values that nothing reads. Two custom ops carry this through torch.export to TVM, where
compiler/importer.py maps them onto hand-written kernels (tir_kernels/kv_cache.py):
kv_write becomes an R.call_tir_inplace into the caller's buffers (no copy, no allocation) and
prefix_attention a kernel whose loop over the cache stops at p + 1 (a cache of capacity C costs
what a cache of p + 1 positions costs). Here both are functional (kv_write returns written copies):
the eager reference of the artifact's numerics and the form torch.export records.

The runtime allocates the capacity once (mobilemoe/runtimes/tvm_local.py), touched (zeros), a
multiple of BLOCK positions (the attention kernel reads whole blocks of BLOCK slots).
"""
from __future__ import annotations

import torch

BLOCK = 32  # cache slots per block of prefix_attention (tir_kernels/kv_cache.py); capacity % BLOCK == 0


def capacity_for(max_seq_len: int) -> int:
    """The capacity a runtime allocates for a model: max_seq_len rounded up to a whole block."""
    return -(-max_seq_len // BLOCK) * BLOCK


@torch.library.custom_op("mobilemoe::kv_write", mutates_args=())
def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k_cache [1, nkv, D, C], v_cache [1, nkv, C, D] with k_new [1, nkv, D, S], v_new [1, nkv, S, D]
    written at positions [1, S] -> the written caches (here copies; in the artifact the same buffers)."""
    idx = positions[0]
    return k_cache.index_copy(3, idx, k_new), v_cache.index_copy(2, idx, v_new)


@kv_write.register_fake
def _(k_cache, v_cache, k_new, v_new, positions):
    return torch.empty_like(k_cache), torch.empty_like(v_cache)


@torch.library.custom_op("mobilemoe::prefix_attention", mutates_args=())
def prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """q [1, nh, S, D] (after RoPE) attending, query s, to cache slots 0..positions[0, s] of
    k_cache [1, nkv, D, C], v_cache [1, nkv, C, D] (grouped-query: head h reads KV head h // (nh / nkv))
    -> [1, nh, S, D]."""
    B, nh, S, D = q.shape
    nkv = k_cache.shape[1]
    n = int(positions.max()) + 1
    k, v = k_cache[..., :n], v_cache[:, :, :n]
    qg = q.reshape(B, nkv, nh // nkv, S, D) * (D ** -0.5)
    scores = torch.einsum("bgrsd,bgdt->bgrst", qg, k)
    hidden = torch.arange(n, device=q.device)[None, :] > positions[0, :, None]  # [S, n]
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("bgrst,bgtd->bgrsd", torch.softmax(scores, dim=-1), v).reshape(B, nh, S, D)


@prefix_attention.register_fake
def _(q, k_cache, v_cache, positions):
    return torch.empty_like(q)


def write_and_attend(attn, q, k, v, past_k, past_v, slots):
    """Attention.forward's in-place branch: q [B, nh, S, D], k/v [B, nkv, S, D] after RoPE ->
    (attn.wo(attention) [B, S, H], k_cache, v_cache written at `slots`)."""
    B, _, S, D = q.shape
    if getattr(attn, "scale", D ** -0.5) != D ** -0.5:  # prefix_attention scales by D**-0.5; Granite sets its own
        q = q * (attn.scale * D ** 0.5)
    k_all, v_all = kv_write(past_k, past_v, k.transpose(-1, -2).contiguous(), v.contiguous(), slots)
    y = prefix_attention(q.contiguous(), k_all, v_all, slots)
    return attn.wo(y.transpose(1, 2).reshape(B, S, attn.nh * D)), k_all, v_all


def empty_cache(config, capacity: int, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed per-layer caches of `capacity` slots (eager use of model(..., inplace=True))."""
    c = config
    return [(torch.zeros(1, c.num_kv_heads, c.head_dim, capacity, dtype=dtype),
             torch.zeros(1, c.num_kv_heads, capacity, c.head_dim, dtype=dtype)) for _ in range(c.num_layers)]
