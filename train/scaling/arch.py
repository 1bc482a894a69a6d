"""A config's scaling-law variables and its on-device budgets, and the shape builder for new configs.

Law variables of a `MobileMoEConfig` trained on D tokens (what `law.py` fits and `design.py` ranks):
    n_active     N  active non-embedding params per token (`active_params(include_lm_head=False)`):
                    attention, norms, router, top-k routed experts, shared expert (dense: the FFN)
    expansion    R  total / active non-embedding params (`total_params(include_embedding=False)` / N):
                    1 for a dense model; the sparsity is 1 - 1/R
    granularity  G  4H / expert width: a dense 4H FFN cut into G experts (config.py's convention,
                    Krajewski et al. 2024); 1 for a dense model
    shared_frac  s  shared width / (shared width + top_k x expert width): the always-on share of the
                    active expert capacity; 0 for a dense model (one "expert", always selected)
    moe          m  1 for an MoE, 0 for a dense model
    tokens       D  training tokens

Budgets use the very accounting of `python -m mobilemoe.config list`: INT4 MB is
`int4_weight_bytes() / 2**20` and decode GFLOPs/token is `flops_per_token(ctx) / 1e9` (ctx 1024).
"""
from __future__ import annotations

from mobilemoe.config import MobileMoEConfig

GRANULARITY_FFN_MULT = 4  # G = GRANULARITY_FFN_MULT * H / expert_hidden
DECODE_CTX = 1024  # `python -m mobilemoe.config list`'s default decode context


def law_vars(cfg: MobileMoEConfig, tokens: float) -> dict:
    """The scaling-law variables (module docstring) of `cfg` trained on `tokens` tokens."""
    n_active = cfg.active_params(include_lm_head=False)
    n_total = cfg.total_params(include_embedding=False)
    if cfg.is_moe:
        g = GRANULARITY_FFN_MULT * cfg.hidden_size / cfg.expert_hidden
        s = cfg.shared_expert_hidden / (cfg.shared_expert_hidden + cfg.top_k * cfg.expert_hidden)
    else:
        g, s = 1.0, 0.0
    return {"n_active": float(n_active), "n_total": float(n_total), "expansion": n_total / n_active,
            "granularity": float(g), "shared_frac": float(s), "moe": float(cfg.is_moe), "tokens": float(tokens)}


def budget(cfg: MobileMoEConfig, ctx: int = DECODE_CTX) -> dict:
    """INT4 weight MB and decode GFLOPs/token exactly as `python -m mobilemoe.config list` counts them."""
    return {"int4_mb": cfg.int4_weight_bytes() / 2**20, "decode_gflops": cfg.flops_per_token(ctx) / 1e9}


def attention_heads(hidden: int, head_dim: int, max_kv_heads: int) -> tuple[int, int]:
    """(heads, kv heads): hidden / head_dim query heads, the largest divisor of them <= max_kv_heads for KV."""
    if hidden % head_dim:
        raise ValueError(f"hidden_size {hidden} is not a multiple of head_dim {head_dim}")
    heads = hidden // head_dim
    kv = max(d for d in range(1, min(heads, max_kv_heads) + 1) if heads % d == 0)
    return heads, kv


def make_config(name: str, hidden: int, layers: int, *, vocab: int, experts: int = 0, top_k: int = 0,
                expert_hidden: int = 0, shared_hidden: int = 0, ffn_hidden: int = 0, head_dim: int = 64,
                max_kv_heads: int = 4, max_seq_len: int = 1024, tie_embeddings: bool = True) -> MobileMoEConfig:
    """A config from the shape knobs the sweep and `design` vary (experts == 0: dense FFN of ffn_hidden)."""
    heads, kv = attention_heads(hidden, head_dim, max_kv_heads)
    moe = experts > 0
    return MobileMoEConfig(name=name, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                           num_kv_heads=kv, head_dim=head_dim, max_seq_len=max_seq_len,
                           tie_embeddings=tie_embeddings, ffn_hidden=0 if moe else ffn_hidden,
                           num_experts=experts, top_k=top_k if moe else 0,
                           expert_hidden=expert_hidden if moe else 0,
                           shared_expert_hidden=shared_hidden if moe else 0)


def shape_name(cfg: MobileMoEConfig) -> str:
    """A short readable id: h256-l4-e16k2i128-s256 (MoE) or h256-l4-ffn512 (dense)."""
    base = f"h{cfg.hidden_size}-l{cfg.num_layers}"
    if not cfg.is_moe:
        return f"{base}-ffn{cfg.ffn_hidden}"
    return f"{base}-e{cfg.num_experts}k{cfg.top_k}i{cfg.expert_hidden}-s{cfg.shared_expert_hidden}"
