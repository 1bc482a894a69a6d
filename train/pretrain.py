"""Stage 1, pre-training: next-token prediction on the whole open corpus (train.corpus).

    python -m train.pretrain [--model mobilemoe-tiny] [--epochs 9 | --max-tokens 2e7] [--out-dir runs/pretrain]
        [--config overrides.json] [--resume]     (multi-GPU: torchrun --nproc-per-node N -m train.pretrain)

Warmup then a constant LR (the stable phase of a warmup-stable-decay schedule): the decay happens
in mid-training, on the higher-quality subset. Every flag is a field of `StageConfig` (train/loop.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from train.loop import StageConfig, stage_main


@dataclass
class PretrainConfig(StageConfig):
    stage: str = "pretrain"
    out_dir: str = "runs/pretrain"
    packing: str = "stream"
    seq_len: int = 1024
    batch_size: int = 32
    epochs: float = 9.0  # the bundled model's length: 9 passes over the corpus (~26M tokens)
    lr: float = 2e-3
    warmup_steps: int = 100
    schedule: str = "constant"


def main(argv=None) -> int:
    return stage_main(PretrainConfig(), argv, prog="python -m train.pretrain", doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
