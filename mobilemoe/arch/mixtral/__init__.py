"""Mixtral (MixtralForCausalLM, mixtral): Llama attention, routing = softmax over all experts, top-k,
renormalised over the k (the same weights as top-k then softmax), experts named w1 (gate), w3 (up),
w2 (down). A sliding window narrower than the context is refused.

    model.layers.i.block_sparse_moe.gate.weight                [E, H]   moe.router.weight
    model.layers.i.block_sparse_moe.experts.e.w{1,3,2}.weight           moe.w{1,3,2}[e]
"""
from __future__ import annotations

from ...config import MobileMoEConfig
from .. import Family
from ..common import HFConfig, base_tensor_map, experts_map, llama_hf_fields


def config_from_hf(raw: dict, source: str) -> MobileMoEConfig:
    c = HFConfig(raw, source)
    return MobileMoEConfig.from_dict(dict(
        name="mixtral", arch="mixtral", **c.llama_fields(),
        num_experts=int(c.require("num_local_experts", "num_experts")), top_k=int(c.require("num_experts_per_tok")),
        expert_hidden=int(c.require("intermediate_size")), shared_expert_hidden=0,
        router="softmax_topk", norm_topk_prob=True,
        router_aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)),
    ), source)


def tensor_map(cfg: MobileMoEConfig) -> dict:
    m = base_tensor_map(cfg)
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.block_sparse_moe.", f"layers.{i}.moe"
        m[q + ".router.weight"] = p + "gate.weight"
        m.update(experts_map(q, p + "experts", cfg.num_experts, names=("w1", "w3", "w2")))
    return m


def hf_config(cfg: MobileMoEConfig, dtype) -> dict:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **llama_hf_fields(cfg, dtype),
            "intermediate_size": cfg.expert_hidden, "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.top_k, "sliding_window": None, "router_aux_loss_coef": cfg.router_aux_loss_coef}


FAMILY = Family("mixtral", ("mixtral",), config_from_hf, tensor_map, hf_config)
