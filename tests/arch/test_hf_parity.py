"""Every supported HF model_type: a checkpoint that transformers writes loads, and our PyTorch model
gives transformers' logits (fp32, max abs error <= 1e-4), prefill and cached decode alike."""
import json

import pytest
import torch

from mobilemoe.checkpoint import load_checkpoint
from mobilemoe.arch import supported_model_types

from tests.arch.hf_models import TINY, save_tiny

transformers = pytest.importorskip("transformers")


def test_registry_lists_every_tested_type():
    assert sorted(TINY) == supported_model_types()


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_logits_match_transformers(tmp_path, model_type):
    d = save_tiny(model_type, tmp_path / model_type)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ours = load_checkpoint(d)
    assert ours.config.arch == model_type and ours.config.name == model_type
    tokens = torch.randint(0, ours.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got, _ = ours(tokens)
        # the cache path: prefill 12 tokens, then decode the rest one at a time
        logits, kv = ours(tokens[:, :12])
        steps = [logits]
        for t in range(12, tokens.shape[1]):
            logits, kv = ours(tokens[:, t:t + 1], kv=kv)
            steps.append(logits)
    err, err_cached = (got - ref).abs().max().item(), (torch.cat(steps, 1) - ref).abs().max().item()
    print(f"{model_type}: max |logits - transformers| = {err:.2e} (cached decode {err_cached:.2e})")
    assert err <= 1e-4 and err_cached <= 1e-4, (err, err_cached)


def test_sharded_and_low_precision_files(tmp_path):
    d = save_tiny("qwen2_moe", tmp_path / "q")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 1
    d = save_tiny("mixtral", tmp_path / "m")
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_checkpoint(d).embed.weight.dtype == torch.float32
