"""Dense Llama-shaped models: LlamaForCausalLM (llama), Qwen2ForCausalLM (qwen2), Qwen3ForCausalLM (qwen3).

llama: optional bias on all four attention projections (attention_bias); qwen2: bias on q/k/v
only; qwen3: q/k RMSNorm over each head before RoPE (+ optional attention_bias). The FFN is a
SwiGLU: model.layers.i.mlp.{gate,up,down}_proj.weight -> layers.i.ffn.w{1,3,2}.weight.
"""
from __future__ import annotations

from ...config import MobileMoEConfig
from .. import Family
from ..common import HFConfig, base_tensor_map, llama_hf_fields, swiglu_map

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def config_from_hf(raw: dict, source: str) -> MobileMoEConfig:
    c = HFConfig(raw, source)
    model_type = raw["model_type"]
    c.expect("mlp_bias", (False,), default=False)
    bias = bool(c.get("attention_bias", False))
    qkv_bias, o_bias = (True, False) if model_type == "qwen2" else (bias, bias)
    return MobileMoEConfig.from_dict(dict(
        name=model_type, arch=model_type, **c.llama_fields(),
        num_experts=0, top_k=0, expert_hidden=0, shared_expert_hidden=0,
        ffn_hidden=int(c.require("intermediate_size")), qkv_bias=qkv_bias, o_bias=o_bias,
        qk_norm="head" if model_type == "qwen3" else "none",
    ), source)


def tensor_map(cfg: MobileMoEConfig) -> dict:
    m = base_tensor_map(cfg)
    for i in range(cfg.num_layers):
        m.update(swiglu_map(f"layers.{i}.ffn", f"model.layers.{i}.mlp"))
    return m


def hf_config(cfg: MobileMoEConfig, dtype) -> dict:
    model_type = cfg.arch if cfg.arch in ARCHITECTURES else "llama"  # ours (mobilemoe) is written as llama
    return {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
            **llama_hf_fields(cfg, dtype), "intermediate_size": cfg.ffn_hidden, "mlp_bias": False,
            "attention_bias": cfg.o_bias}


FAMILY = Family("llama", tuple(ARCHITECTURES), config_from_hf, tensor_map, hf_config)
