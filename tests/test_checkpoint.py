import json
import os

import pytest
import torch

from mobilemoe.checkpoint import (CheckpointError, load_checkpoint, load_state, save_checkpoint)
from mobilemoe.config import MobileMoEConfig
from mobilemoe.model import MobileMoE


def _saved(tmp_path, name="test-moe", **kw):
    torch.manual_seed(0)
    m = MobileMoE(MobileMoEConfig.from_name(name)).eval()
    return m, save_checkpoint(m, tmp_path / "ckpt", **kw)


@pytest.mark.parametrize("name", ["test-moe", "test-moe-noshared", "test-dense"])
def test_round_trip(tmp_path, name):
    m, d = _saved(tmp_path, name)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    m2 = load_checkpoint(d)
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    if m.config.tie_embeddings:
        assert m2.lm_head.weight is m2.embed.weight


def test_bf16_round_trip(tmp_path):
    m, d = _saved(tmp_path, dtype=torch.bfloat16)
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    m2 = load_checkpoint(d)
    torch.testing.assert_close(m2.embed.weight, m.embed.weight.bfloat16().float())


@pytest.mark.parametrize("name,arch", [("test-moe", "GraniteMoeSharedForCausalLM"),
                                       ("test-moe-noshared", "GraniteMoeSharedForCausalLM"),
                                       ("test-dense", "LlamaForCausalLM")])
def test_transformers_parity(tmp_path, name, arch):
    transformers = pytest.importorskip("transformers")
    m, d = _saved(tmp_path, name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    tokens = torch.randint(0, m.config.vocab_size, (2, 17))
    with torch.no_grad():
        diff = (hf(tokens).logits - m(tokens)[0]).abs().max().item()
    assert diff <= 1e-4, diff


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    m, d = _saved(tmp_path)
    before = (d / "model.safetensors").read_bytes()
    with pytest.raises(TypeError):
        save_checkpoint(m, d, extra_files={"x": None})  # bytes expected: fails mid-write
    assert (d / "model.safetensors").read_bytes() == before  # old checkpoint intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind
    with pytest.raises(TypeError):
        save_checkpoint(m, tmp_path / "new", extra_files={"x": None})
    assert not (tmp_path / "new").exists()


def test_missing_and_truncated_weights(tmp_path):
    _, d = _saved(tmp_path)
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors"):
        load_state(d)
    w.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing weights file"):
        load_state(d)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_state(tmp_path / "nothing")


def test_config_field_wrong_type(tmp_path):
    _, d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["mobilemoe"]["num_experts"] = "8"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json:mobilemoe: field 'num_experts' must be int, got str"):
        load_state(d)


def test_shapes_disagree_with_config(tmp_path):
    _, d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["mobilemoe"]["expert_hidden"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"block_sparse_moe.input_linear.weight' has shape \[8, 64, 64\], "
                                              r"config expects \[8, 96, 64\]"):
        load_state(d)
    cfg["mobilemoe"]["expert_hidden"] = 32
    cfg["mobilemoe"]["num_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing.*model.layers.2"):
        load_state(d)


def test_no_pickle_in_package():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    pkgs = ("mobilemoe", "compiler", "passes", "targets", "train", "bench")
    for py in (p for pkg in pkgs for p in (root / pkg).rglob("*.py")):
        text = py.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, py
        assert "weights_only=False" not in text, py
