"""Stage 4, INT4 quantization-aware training (torchao), then convert for the compiler.

    python -m train.qat --init-from runs/sft/final [--epochs 1] [--out-dir runs/qat]

prepare   every weight the compiler stores as INT4 (passes/quantize_int4_weights.py: attention,
          routed experts [E, N, K], shared expert / dense FFN, embedding = tied LM head; not the
          router, not the norms) is fake-quantized in the forward pass by torchao's
          IntxFakeQuantizer with `mobilemoe.quant.torchao_qat_weight_config()` (group-32 symmetric
          INT4, fp16 scales), with straight-through gradients to the float ("latent") weights.
          Stacked experts are fake-quantized as [E * N, K] (groups run along K either way). The
          weight is first rounded to `save_dtype` (straight-through), so QAT sees exactly the
          values the checkpoint will hold (router and norm weights are rounded the same way).
convert   the parametrizations are removed and the latent weights rounded to `save_dtype`:
          final/ holds them. The compiler's `quantize_int4` of a saved weight returns exactly the
          codes and scales that QAT's last forward used (same scale rule and rounding,
          tests/train/test_qat.py checks logits bit for bit). The saved weights are the latent
          ones, not dequant(quantize(w)): requantizing q * s with the amax / 7.5 scale rule gives
          another scale (max|q| * s / 7.5), so dequantized weights would not survive the compiler.

Where torchao does not import (a wheel built for another torch), QAT falls back to
`mobilemoe.quant.fake_quantize_int4`: the same forward values, an identity gradient; summary.json's
`fake_quant` says which one ran.

`mobilemoe.quant.simulate_int4(model)` is the INT4 model in PyTorch (dequant(quantize(w)) for every such weight):
summary.json's eval_loss_int4 is its held-out loss; eval_loss is the float (latent) model's.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from mobilemoe.model import MobileMoE
from mobilemoe.quant import fake_quantize_int4, is_int4_weight, simulate_int4, torchao_qat_weight_config
from train.loop import DTYPES, StageConfig, StageHooks, stage_main

def int4_weights(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, full name) of every INT4 weight (parametrized ones by their outer name);
    a tied weight appears once per module that uses it."""
    found, float_names = [], model.float_weight_names()
    for mod_name, mod in model.named_modules():
        if "parametrizations" in mod_name.split("."):
            continue
        attrs = [*mod._parameters, *(mod.parametrizations if parametrize.is_parametrized(mod) else ())]
        for attr in attrs:
            full, p = f"{mod_name}.{attr}" if mod_name else attr, getattr(mod, attr)
            if p is not None and is_int4_weight(full, p, float_names):
                found.append((mod, attr, full))
    return found


class StorageRound(nn.Module):
    """Parametrization w -> w rounded to the checkpoint dtype, with a straight-through gradient."""

    def __init__(self, storage: torch.dtype):
        super().__init__()
        self.storage = storage

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.storage == w.dtype:
            return w
        return w + (w.to(self.storage).to(w.dtype) - w).detach()


def _torchao_fake_quantizer():
    """torchao's IntxFakeQuantizer for the INT4 format, or None where torchao does not import."""
    try:
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer  # deferred: heavy, may fail to import
    except Exception as e:  # noqa: BLE001 - a torchao built for another torch fails in many ways
        warnings.warn(f"torchao unavailable ({type(e).__name__}: {e}); QAT uses mobilemoe.quant."
                      f"fake_quantize_int4, the same forward values", stacklevel=3)
        return None
    return IntxFakeQuantizer(torchao_qat_weight_config())


class Int4FakeQuant(StorageRound):
    """Parametrization w -> torchao fake-quant INT4 of w rounded to `storage` (both straight-through)."""

    def __init__(self, storage: torch.dtype = torch.float32):
        super().__init__(storage)
        self.fake_quant = _torchao_fake_quantizer() or fake_quantize_int4

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = super().forward(w)
        return self.fake_quant(w.reshape(-1, w.shape[-1])).view(w.shape)  # [.., N, K] -> [.. * N, K]


def prepare_qat(model: MobileMoE, storage: torch.dtype = torch.float32) -> MobileMoE:
    """Fake-quantize the INT4 weights; round the float ones (router, norms) to `storage` as well."""
    for mod, attr, _ in int4_weights(model):
        parametrize.register_parametrization(mod, attr, Int4FakeQuant(storage))
    if storage != torch.float32:
        for mod in [m for m in model.modules() if not isinstance(m, parametrize.ParametrizationList)]:
            for attr in [a for a, p in mod._parameters.items() if p is not None]:
                parametrize.register_parametrization(mod, attr, StorageRound(storage))
    return model


def convert_qat(model: MobileMoE, storage: torch.dtype = torch.float32) -> MobileMoE:
    """Remove the fake quantizers, keep the latent weights, rounded to `storage` (what final/ holds)."""
    for mod, attr in [(m, a) for m in model.modules() if parametrize.is_parametrized(m)
                      for a in list(m.parametrizations)]:
        parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(storage).to(p.dtype))
    return model


class QATHooks(StageHooks):
    def prepare(self, model, cfg):
        return prepare_qat(model, DTYPES[cfg.save_dtype])

    def finalize(self, model, cfg):
        return convert_qat(model, DTYPES[cfg.save_dtype])

    def final_metrics(self, model, evaluate) -> dict:
        return {"eval_loss_int4": round(evaluate(simulate_int4(model)), 5),
                "fake_quant": "torchao" if _torchao_fake_quantizer() is not None else "mobilemoe.quant"}


@dataclass
class QATStageConfig(StageConfig):
    stage: str = "qat"
    init_from: str = "runs/sft/final"
    out_dir: str = "runs/qat"
    train_data: list[str] = field(default_factory=lambda: ["data/sft/train.jsonl"])
    heldout_data: list[str] = field(default_factory=lambda: ["data/sft/heldout.jsonl"])
    packing: str = "examples"
    batch_size: int = 32
    epochs: float = 1.0
    lr: float = 1e-4
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    save_dtype: str = "bfloat16"  # the bundled checkpoint's dtype: QAT rounds to it first


def main(argv=None) -> int:
    return stage_main(QATStageConfig(), argv, hooks=QATHooks(), prog="python -m train.qat", doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
