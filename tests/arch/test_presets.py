"""The presets shaped like public HF MoE models: sizes as published, and each one's family maps
every parameter to an HF tensor (so a real checkpoint of that shape would load)."""
import math

import pytest

from mobilemoe.arch import family_for
from mobilemoe.checkpoint import expected_hf_shapes
from mobilemoe.config import MobileMoEConfig, main

# preset -> (total params, active params without the embedding lookup), as the model cards give them
PUBLIC = {"granite-3.1-1b-a400m": (1.3e9, 0.4e9), "granite-3.1-3b-a800m": (3.3e9, 0.8e9),
          "olmoe-1b-7b": (6.9e9, 1.3e9), "qwen1.5-moe-a2.7b": (14.3e9, 2.7e9)}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_sizes_match_model_cards(name):
    cfg = MobileMoEConfig.from_name(name)
    total, active = PUBLIC[name]
    assert abs(cfg.total_params() / total - 1) < 0.06, cfg.total_params()
    # model cards count the embedding among the active parameters
    with_embed = cfg.active_params() + (cfg.vocab_size * cfg.hidden_size if not cfg.tie_embeddings else 0)
    assert abs(with_embed / active - 1) < 0.12, with_embed


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_family_maps_every_parameter(name):
    cfg = MobileMoEConfig.from_name(name)
    shapes = expected_hf_shapes(cfg)  # on the meta device: nothing allocated
    family = family_for(cfg.arch)
    assert cfg.arch in family.model_types
    assert f"model.layers.{cfg.num_layers - 1}.post_attention_layernorm.weight" in shapes
    assert sum(math.prod(s) for s in shapes.values()) == cfg.total_params()


def test_listed(capsys):
    main(["list"])
    out = capsys.readouterr().out
    assert all(name in out for name in PUBLIC)
