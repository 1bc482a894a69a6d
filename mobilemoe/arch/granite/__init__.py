"""IBM Granite MoE: GraniteMoeForCausalLM (granitemoe) and GraniteMoeSharedForCausalLM (granitemoeshared).

Llama attention and norms with four multipliers (embeddings x embedding_multiplier, attention
scores x attention_multiplier instead of 1/sqrt(D), each block's output x residual_multiplier,
logits / logits_scaling); routing is top-k of the logits then softmax over the k (our own);
gate and up of all experts stacked in one tensor; granitemoeshared adds an always-on shared MLP.

    model.layers.i.block_sparse_moe.router.layer.weight   [E, H]       moe.router.weight
    model.layers.i.block_sparse_moe.input_linear.weight   [E, 2I, H]   cat(moe.w1, moe.w3, dim=1)
    model.layers.i.block_sparse_moe.output_linear.weight  [E, H, I]    moe.w2
    model.layers.i.shared_mlp.input_linear.weight         [2S, H]      cat(moe.shared.w1, moe.shared.w3)
    model.layers.i.shared_mlp.output_linear.weight        [H, S]       moe.shared.w2
"""
from __future__ import annotations

from ...config import MobileMoEConfig
from .. import Family
from ..common import HFConfig, base_tensor_map, llama_hf_fields
from ..tensors import Part


def config_from_hf(raw: dict, source: str) -> MobileMoEConfig:
    c = HFConfig(raw, source)
    model_type = raw["model_type"]
    bias = bool(c.get("attention_bias", False))
    return MobileMoEConfig.from_dict(dict(
        name=model_type, arch=model_type, **c.llama_fields(),
        **c.moe_fields("intermediate_size", 0.01, experts=("num_local_experts",)),
        shared_expert_hidden=int(c.get("shared_intermediate_size", 0)) if model_type == "granitemoeshared" else 0,
        qkv_bias=bias, o_bias=bias, router="topk_softmax",
        embedding_multiplier=float(c.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(c.get("residual_multiplier", 1.0)),
        attention_multiplier=float(c.get("attention_multiplier", 1.0)),
        logits_scaling=float(c.get("logits_scaling", 1.0)),
    ), source)


def tensor_map(cfg: MobileMoEConfig) -> dict:
    m = base_tensor_map(cfg)
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}.moe."
        m[q + "router.weight"] = p + "block_sparse_moe.router.layer.weight"
        m[q + "w1"] = Part(p + "block_sparse_moe.input_linear.weight", 0, 2, dim=1)
        m[q + "w3"] = Part(p + "block_sparse_moe.input_linear.weight", 1, 2, dim=1)
        m[q + "w2"] = p + "block_sparse_moe.output_linear.weight"
        if cfg.shared_expert_hidden:
            m[q + "shared.w1.weight"] = Part(p + "shared_mlp.input_linear.weight", 0, 2)
            m[q + "shared.w3.weight"] = Part(p + "shared_mlp.input_linear.weight", 1, 2)
            m[q + "shared.w2.weight"] = p + "shared_mlp.output_linear.weight"
    return m


def hf_config(cfg: MobileMoEConfig, dtype) -> dict:
    shared = cfg.arch != "granitemoe"  # ours (mobilemoe) is written as granitemoeshared
    arch = "GraniteMoeSharedForCausalLM" if shared else "GraniteMoeForCausalLM"
    return {
        "architectures": [arch], "model_type": "granitemoeshared" if shared else "granitemoe",
        **llama_hf_fields(cfg, dtype), "attention_bias": cfg.qkv_bias,
        "intermediate_size": cfg.expert_hidden, **({"shared_intermediate_size": cfg.shared_expert_hidden} if shared else {}),
        "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
        "router_aux_loss_coef": cfg.router_aux_loss_coef, "embedding_multiplier": cfg.embedding_multiplier,
        "logits_scaling": cfg.logits_scaling, "residual_multiplier": cfg.residual_multiplier,
        "attention_multiplier": cfg.attention_multiplier or cfg.head_dim ** -0.5,
    }


FAMILY = Family("granite", ("granitemoe", "granitemoeshared"), config_from_hf, tensor_map, hf_config)
