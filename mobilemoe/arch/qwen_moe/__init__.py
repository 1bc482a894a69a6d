"""Qwen MoE: Qwen2MoeForCausalLM (qwen2_moe: Qwen1.5-MoE, Qwen2-MoE) and Qwen3MoeForCausalLM (qwen3_moe).

Routing = softmax over all experts then top-k (renormalised when norm_topk_prob). qwen2_moe: bias
on q/k/v (qkv_bias), a shared SwiGLU expert whose output is scaled by sigmoid(x @ g) with
g = shared_expert_gate [1, H]. qwen3_moe: q/k RMSNorm over each head, no shared expert. Layers
that are dense (mlp_only_layers, decoder_sparse_step > 1) are not supported.

    model.layers.i.mlp.gate.weight                              [E, H]   moe.router.weight
    model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight              moe.w{1,3,2}[e]
    model.layers.i.mlp.shared_expert.{gate,up,down}_proj.weight          moe.shared.w{1,3,2}.weight
    model.layers.i.mlp.shared_expert_gate.weight                [1, H]   moe.shared_gate.weight
"""
from __future__ import annotations

from ...config import MobileMoEConfig
from .. import Family
from ..common import HFConfig, llama_hf_fields, routed_moe_map, swiglu_map


def config_from_hf(raw: dict, source: str) -> MobileMoEConfig:
    c = HFConfig(raw, source)
    model_type = raw["model_type"]
    c.expect("mlp_only_layers", ([],), default=[])
    c.expect("decoder_sparse_step", (1,), default=1)
    if model_type == "qwen2_moe":
        qkv_bias, o_bias, qk_norm = bool(c.get("qkv_bias", True)), False, "none"
        shared = int(c.get("shared_expert_intermediate_size", 0))
    else:
        qkv_bias = o_bias = bool(c.get("attention_bias", False))
        qk_norm, shared = "head", 0
    return MobileMoEConfig.from_dict(dict(
        name=model_type, arch=model_type, **c.llama_fields(),
        **c.moe_fields("moe_intermediate_size", 0.001), shared_expert_hidden=shared,
        shared_expert_gate=shared > 0, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm,
        router="softmax_topk", norm_topk_prob=bool(c.get("norm_topk_prob", False)),
    ), source)


def tensor_map(cfg: MobileMoEConfig) -> dict:
    m = routed_moe_map(cfg, "model.layers.{}.mlp.", "gate.weight", "experts")
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.mlp.", f"layers.{i}.moe"
        if cfg.shared_expert_hidden:
            m.update(swiglu_map(q + ".shared", p + "shared_expert"))
            m[q + ".shared_gate.weight"] = p + "shared_expert_gate.weight"
    return m


def hf_config(cfg: MobileMoEConfig, dtype) -> dict:
    common = {**llama_hf_fields(cfg, dtype), "moe_intermediate_size": cfg.expert_hidden,
              "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.norm_topk_prob,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
              "router_aux_loss_coef": cfg.router_aux_loss_coef}
    if cfg.arch == "qwen2_moe":
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **common,
                "qkv_bias": cfg.qkv_bias, "shared_expert_intermediate_size": cfg.shared_expert_hidden}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **common, "attention_bias": cfg.qkv_bias}


FAMILY = Family("qwen_moe", ("qwen2_moe", "qwen3_moe"), config_from_hf, tensor_map, hf_config)
