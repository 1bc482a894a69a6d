"""An imported checkpoint written back by save_checkpoint reopens in transformers under its own
architecture with the same logits (what SFT / QAT of an imported model needs to hand it back)."""
import json

import pytest
import torch

from mobilemoe.checkpoint import load_checkpoint, save_checkpoint
from tests.arch.hf_models import TINY, save_tiny

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_save_reopens_in_transformers(tmp_path, model_type):
    ours = load_checkpoint(save_tiny(model_type, tmp_path / "in"))
    out = save_checkpoint(ours, tmp_path / "out")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == model_type and "mobilemoe" not in raw
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = (hf(tokens).logits - ours(tokens)[0]).abs().max().item()
    assert err <= 1e-4, err
    again = load_checkpoint(out)
    assert again.config == ours.config.replace(name="out")  # imported models are named after their directory
