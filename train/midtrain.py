"""Stage 2, mid-training: anneal on the higher-quality subset of the corpus, LR decaying to zero.

    python -m train.midtrain --init-from runs/pretrain/final [--epochs 1] [--out-dir runs/midtrain]

The subset is `train.data.is_high_quality` (prose-rich reference, tutorial and HOWTO pages; no
change logs). Held-out loss is measured on the whole held-out split, as in pre-training.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from train.loop import StageConfig, stage_main


@dataclass
class MidtrainConfig(StageConfig):
    stage: str = "midtrain"
    init_from: str = "runs/pretrain/final"
    out_dir: str = "runs/midtrain"
    packing: str = "stream"
    data_filter: str = "quality"
    seq_len: int = 1024
    batch_size: int = 16
    epochs: float = 1.0  # more passes over the (already seen) subset overfit: see train/runs/default-model
    lr: float = 2e-3
    warmup_steps: int = 10  # a fresh optimizer: a short ramp back to the pre-training LR
    schedule: str = "linear"
    min_lr_ratio: float = 0.0


def main(argv=None) -> int:
    return stage_main(MidtrainConfig(), argv, prog="python -m train.midtrain", doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
