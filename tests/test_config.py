import json

import pytest
import torch

from mobilemoe.config import PRESETS, ConfigError, MobileMoEConfig, load_config, main
from mobilemoe.model import MobileMoE


def _instantiated_counts(cfg):
    with torch.device("meta"):
        m = MobileMoE(cfg)
    total = sum(p.numel() for p in m.parameters())  # tied weights are one Parameter
    experts = sum(p.numel() for n, p in m.named_parameters() if n.endswith(("moe.w1", "moe.w2", "moe.w3")))
    return total, experts, m


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_counts_match_model(name):
    cfg = MobileMoEConfig.from_name(name)
    total, experts, m = _instantiated_counts(cfg)
    assert cfg.total_params() == total
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    assert cfg.total_params(include_embedding=False) == total - embed
    # active = everything but the embedding lookup, with only top_k of E experts
    routed_active = experts * cfg.top_k // cfg.num_experts if cfg.is_moe else 0
    head = cfg.vocab_size * cfg.hidden_size
    assert cfg.active_params() == total - embed - experts + routed_active + head


def test_int4_memory_and_flops_by_hand():
    cfg = MobileMoEConfig.from_name("test-moe")
    c = cfg.param_counts()
    linear = c["attention"] + c["routed_total"] + c["shared"] + c["embedding"]
    assert cfg.int4_weight_bytes() == linear * 4.5 / 8 + 4 * (c["router"] + c["norms"])
    matmul = cfg.active_params() - c["norms"]
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    assert cfg.flops_per_token(100) == 2 * matmul + attn * 100
    assert cfg.flops_per_token(99, prefill=True) == 2 * matmul + attn * 50


def test_paper_presets_in_ranges():
    for name, (act, tot) in {"mobilemoe-s": (0.3e9, 1.3e9), "mobilemoe-m": (0.6e9, 2.9e9),
                             "mobilemoe-l": (0.9e9, 5.3e9)}.items():
        cfg = MobileMoEConfig.from_name(name)
        assert 0.9 * act <= cfg.active_params(include_lm_head=False) <= 1.1 * act, name
        assert 0.9 * tot <= cfg.total_params(include_embedding=False) <= 1.1 * tot, name
        assert 0.27e9 <= cfg.active_params(include_lm_head=False) <= 0.95e9
    pro = MobileMoEConfig.from_name("mobilellm-pro")
    assert not pro.is_moe and 1.0e9 <= pro.total_params() <= 1.15e9


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="unknown preset 'mobilemoe-xl'.*mobilemoe-s"):
        MobileMoEConfig.from_name("mobilemoe-xl")


@pytest.mark.parametrize("field,value,msg", [
    ("hidden_size", "256", "field 'hidden_size' must be int, got str"),
    ("tie_embeddings", 1, "field 'tie_embeddings' must be bool"),
    ("num_layers", True, "field 'num_layers' must be int, got bool"),
    ("top_k", 99, "top_k must be in"),
    ("num_kv_heads", 3, "multiple of num_kv_heads"),
])
def test_bad_config_fields(tmp_path, field, value, msg):
    d = MobileMoEConfig.from_name("test-moe").to_dict()
    d[field] = value
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_unknown_field_and_bad_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"hiden_size": 3}))
    with pytest.raises(ConfigError, match="unknown field.*hiden_size"):
        load_config(p)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.json")


def test_dense_needs_ffn_width():
    with pytest.raises(ConfigError, match="ffn_hidden must be > 0"):
        MobileMoEConfig(num_experts=0, ffn_hidden=0)


def test_cli_list(capsys):
    main(["list"])
    out = capsys.readouterr().out
    for name in ("mobilemoe-s", "mobilemoe-m", "mobilemoe-l", "mobilellm-pro"):
        assert name in out
    assert "INT4 MB" in out and "decode FLOPs/tok" in out
