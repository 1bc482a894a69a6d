"""Shared by the evaluation tests: a test-moe checkpoint with the real tokenizer, real text, task rows."""
import json
from pathlib import Path

import torch

from mobilemoe.checkpoint import save_checkpoint
from mobilemoe.config import MobileMoEConfig
from mobilemoe.model import MobileMoE
from mobilemoe.tokenizer import load_tokenizer

SAMPLE = (Path(__file__).parent / "data" / "heldout_sample.txt").read_text()


def make_checkpoint(path, seed: int):
    torch.manual_seed(seed)  # test-moe with the bundled tokenizer's vocabulary; max_seq_len 256
    model = MobileMoE(MobileMoEConfig.from_name("test-moe").replace(vocab_size=8192))
    return save_checkpoint(model, path, tokenizer=load_tokenizer())


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ROWS = [json.loads(line) for line in (Path(__file__).parents[1] / "mobilemoe/assets/eval_tasks/"
                                         "python_modules.jsonl").read_text().splitlines()[:4]]

