"""Mixtral (MixtralForCausalLM, mixtral): Llama attention, routing = softmax over all experts, top-k,
renormalised over the k (the same weights as top-k then softmax), experts named w1 (gate), w3 (up),
w2 (down). A sliding window narrower than the context is refused.

    model.layers.i.block_sparse_moe.gate.weight                [E, H]   moe.router.weight
    model.layers.i.block_sparse_moe.experts.e.w{1,3,2}.weight           moe.w{1,3,2}[e]
"""
from __future__ import annotations

from ...config import MobileMoEConfig
from .. import Family
from ..common import HFConfig, llama_hf_fields, routed_moe_map


def config_from_hf(raw: dict, source: str) -> MobileMoEConfig:
    c = HFConfig(raw, source)
    return MobileMoEConfig.from_dict(dict(
        name="mixtral", arch="mixtral", **c.llama_fields(),
        **c.moe_fields("intermediate_size", 0.001, experts=("num_local_experts", "num_experts")),
        shared_expert_hidden=0, router="softmax_topk", norm_topk_prob=True,
    ), source)


def tensor_map(cfg: MobileMoEConfig) -> dict:
    return routed_moe_map(cfg, "model.layers.{}.block_sparse_moe.", "gate.weight", "experts", names=("w1", "w3", "w2"))


def hf_config(cfg: MobileMoEConfig, dtype) -> dict:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **llama_hf_fields(cfg, dtype),
            "intermediate_size": cfg.expert_hidden, "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.top_k, "sliding_window": None, "router_aux_loss_coef": cfg.router_aux_loss_coef}


FAMILY = Family("mixtral", ("mixtral",), config_from_hf, tensor_map, hf_config)
