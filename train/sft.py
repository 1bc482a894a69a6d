"""Stage 3, instruction tuning: question/answer chats from the documentation (train.sft_data).

    python -m train.sft_data --corpus data/corpus --out data/sft       # once
    python -m train.sft --init-from runs/midtrain/final [--epochs 2] [--out-dir runs/sft]

Chats are rendered with the chat template and packed whole into rows ("examples" packing); the
loss covers the assistant's answer tokens and their closing <|end|> only.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from train.loop import StageConfig, stage_main


@dataclass
class SFTConfig(StageConfig):
    stage: str = "sft"
    init_from: str = "runs/midtrain/final"
    out_dir: str = "runs/sft"
    train_data: list[str] = field(default_factory=lambda: ["data/sft/train.jsonl"])
    heldout_data: list[str] = field(default_factory=lambda: ["data/sft/heldout.jsonl"])
    packing: str = "examples"
    batch_size: int = 32
    epochs: float = 2.0
    lr: float = 1e-3
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0


def main(argv=None) -> int:
    return stage_main(SFTConfig(), argv, prog="python -m train.sft", doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
