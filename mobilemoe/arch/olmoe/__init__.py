"""OLMoE (OlmoeForCausalLM, olmoe): Llama attention with RMSNorm over the whole q and k projections
(before the head split and RoPE), routing = softmax over all experts then top-k (optionally
renormalised: norm_topk_prob), one SwiGLU MLP per expert, no shared expert.

    model.layers.i.self_attn.{q,k}_norm.weight          [nh*D], [nkv*D]   attn.{q,k}_norm.weight
    model.layers.i.mlp.gate.weight                       [E, H]           moe.router.weight
    model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight               moe.w{1,3,2}[e]
"""
from __future__ import annotations

from ...config import MobileMoEConfig
from .. import Family
from ..common import HFConfig, llama_hf_fields, routed_moe_map


def config_from_hf(raw: dict, source: str) -> MobileMoEConfig:
    c = HFConfig(raw, source)
    c.expect("clip_qkv", (None,))
    bias = bool(c.get("attention_bias", False))
    return MobileMoEConfig.from_dict(dict(
        name="olmoe", arch="olmoe", **c.llama_fields(),
        **c.moe_fields("intermediate_size", 0.01), shared_expert_hidden=0,
        qkv_bias=bias, o_bias=bias, qk_norm="proj", router="softmax_topk",
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
    ), source)


def tensor_map(cfg: MobileMoEConfig) -> dict:
    return routed_moe_map(cfg, "model.layers.{}.mlp.", "gate.weight", "experts")


def hf_config(cfg: MobileMoEConfig, dtype) -> dict:
    return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", **llama_hf_fields(cfg, dtype),
            "attention_bias": cfg.qkv_bias, "clip_qkv": None, "intermediate_size": cfg.expert_hidden,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.norm_topk_prob,
            "router_aux_loss_coef": cfg.router_aux_loss_coef}


FAMILY = Family("olmoe", ("olmoe",), config_from_hf, tensor_map, hf_config)
