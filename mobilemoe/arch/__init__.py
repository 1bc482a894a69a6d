"""Architecture registry: one folder per Hugging Face model family, found by the HF `model_type`.

    mobilemoe/arch/<family>/__init__.py   defines FAMILY = Family(...):
        model_types     the HF `model_type` values it reads (config.json "model_type")
        config_from_hf  HF config.json dict -> MobileMoEConfig (the options of the one model in
                        mobilemoe/model.py: q/k norm, biases, routing variant, multipliers, ...);
                        raises ConfigError naming the file and field of anything it does not implement
        tensor_map      MobileMoEConfig -> {our parameter name: HF tensor name | Part | Stack}
                        (mobilemoe/arch/tensors.py), used both to load and to write checkpoints
        hf_config       (optional) MobileMoEConfig -> HF config.json dict: families we can write

A config.json holding our own `mobilemoe` block is read by the `mobilemoe` family whatever its
model_type (our checkpoints are GraniteMoeShared / Llama checkpoints with that block). Adding an
architecture is one new folder here plus its tests (README.md, "Supported architectures").
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from ..config import ConfigError, MobileMoEConfig

OWN_BLOCK = "mobilemoe"  # config.json key holding our own config (written by save_checkpoint)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict, str], MobileMoEConfig]
    tensor_map: Callable[[MobileMoEConfig], dict]
    hf_config: Callable | None = None  # (cfg, dtype) -> config.json dict; None: loading only


def _discover() -> dict[str, Family]:
    """model_type -> Family, from every sub-package's FAMILY."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
        for model_type in family.model_types:
            if model_type in found:
                raise RuntimeError(f"model_type '{model_type}' claimed by arch families "
                                   f"'{found[model_type].name}' and '{family.name}'")
            found[model_type] = family
    return found


REGISTRY: dict[str, Family] = _discover()


def supported_model_types() -> list[str]:
    return sorted(t for t in REGISTRY if t != OWN_BLOCK)


def family_for(arch: str, source: str = "config") -> Family:
    """The family of a MobileMoEConfig.arch / HF model_type."""
    if arch not in REGISTRY:
        raise ConfigError(f"{source}: unsupported model_type {arch!r}; supported: {', '.join(supported_model_types())}")
    return REGISTRY[arch]


def config_from_hf(raw: dict, source: str) -> MobileMoEConfig:
    """Translate a config.json dict (ours with the `mobilemoe` block, or a plain HF one)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    if OWN_BLOCK in raw:
        return REGISTRY[OWN_BLOCK].config_from_hf(raw, source)
    if "model_type" not in raw:
        raise ConfigError(f"{source}: no 'model_type' field (and no '{OWN_BLOCK}' block); "
                          f"supported model_type values: {', '.join(supported_model_types())}")
    return family_for(raw["model_type"], f"{source}: field 'model_type'").config_from_hf(raw, source)
