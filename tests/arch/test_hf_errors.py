"""What the loader refuses, each with one line naming the file and field and what is supported."""
import json

import pytest

from mobilemoe.checkpoint import CheckpointError, load_state

from tests.arch.hf_models import save_tiny

pytest.importorskip("transformers")


def _edit(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("q") / "qwen3_moe")


@pytest.mark.parametrize("fields,message", [
    ({"model_type": "gpt2"}, r"config.json: field 'model_type': unsupported model_type 'gpt2'; supported: "
                             r"granitemoe, granitemoeshared, llama, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe$"),
    ({"use_sliding_window": True, "sliding_window": 64},
     r"config.json: field 'sliding_window' is 64 \(in use\); supported: none"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
     r"config.json: field 'rope_parameters' has rope_type 'yarn'; supported: \['default', 'linear', 'llama3'\]"),
    ({"mlp_only_layers": [1]}, r"config.json: field 'mlp_only_layers' is \[1\]; supported: \[\[\]\]"),
    ({"hidden_act": "gelu"}, r"config.json: field 'hidden_act' is 'gelu'; supported: \['silu'\]"),
    ({"num_experts_per_tok": 9}, r"config.json: top_k must be in \[1, num_experts=8\], got 9"),
])
def test_unsupported_config_is_one_line(qwen, tmp_path, fields, message):
    import shutil
    d = shutil.copytree(qwen, tmp_path / "c")
    _edit(d, **fields)
    with pytest.raises(CheckpointError, match=message) as e:
        load_state(d)
    assert "\n" not in str(e.value)


def test_sliding_window_wider_than_context_is_fine(qwen, tmp_path):
    import shutil
    d = shutil.copytree(qwen, tmp_path / "c")
    _edit(d, use_sliding_window=True, sliding_window=4096)  # max_seq_len is 256: never slides
    load_state(d)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    d = save_tiny("llama", tmp_path / "llama")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing weights file .*pickle files are never "
                                              r"read, re-save with safe_serialization=True"):
        load_state(d)


def test_missing_shard_and_tensor_mismatch(tmp_path):
    d = save_tiny("qwen2_moe", tmp_path / "q")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: shard '{shard.name}' is missing"):
        load_state(d)
    d = save_tiny("olmoe", tmp_path / "o")
    _edit(d, intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.experts.0.down_proj.weight' has shape \[64, 32\], "
                                              r"config expects \[64, 64\]"):
        load_state(d)
