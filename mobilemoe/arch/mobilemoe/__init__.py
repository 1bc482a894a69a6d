"""MobileMoE, our own: a config.json with our `mobilemoe` block (the exact MobileMoEConfig), written
as a GraniteMoeShared checkpoint (MoE) or a Llama one (dense), so that transformers opens it too.
Tensor names are Granite's (mobilemoe/arch/granite) or Llama's (mobilemoe/arch/llama).
"""
from __future__ import annotations

from ...config import MobileMoEConfig
from .. import OWN_BLOCK, Family
from .. import granite, llama


def config_from_hf(raw: dict, source: str) -> MobileMoEConfig:
    return MobileMoEConfig.from_dict(raw[OWN_BLOCK], source=f"{source}:{OWN_BLOCK}")


def tensor_map(cfg: MobileMoEConfig) -> dict:
    return granite.tensor_map(cfg) if cfg.is_moe else llama.tensor_map(cfg)


def hf_config(cfg: MobileMoEConfig, dtype) -> dict:
    writer = granite.hf_config if cfg.is_moe else llama.hf_config
    return {**writer(cfg, dtype), OWN_BLOCK: cfg.to_dict()}


FAMILY = Family("mobilemoe", (OWN_BLOCK,), config_from_hf, tensor_map, hf_config)
