"""mobilemoe::moe (mobilemoe/moe_op.py): the MoE block as one operator equals the eager model for every
routing variant of the registry's MoE architectures, and torch.export records one op per layer."""
import pytest
import torch

from mobilemoe.arch import REGISTRY
from mobilemoe.config import MobileMoEConfig
from mobilemoe.export import export_entry
from mobilemoe.model import MobileMoE
from mobilemoe.moe_op import exported_calls, moe
from tests.arch.hf_models import TINY, randomize, variant_config

MOE_TYPES = sorted(t for t in TINY if t in REGISTRY and REGISTRY[t].name != "llama")


def _model(cfg: MobileMoEConfig) -> MobileMoE:
    torch.manual_seed(0)
    model = MobileMoE(cfg).eval()
    randomize(model)
    return model


CONFIGS = {t: variant_config(t) for t in MOE_TYPES} | {"test-moe": MobileMoEConfig.from_name("test-moe"),
                                                      "test-moe-noshared": MobileMoEConfig.from_name("test-moe-noshared")}


def test_every_routing_variant_is_covered():
    variants = {(c.router, c.norm_topk_prob, c.shared_expert_hidden > 0, c.shared_expert_gate) for c in CONFIGS.values()}
    assert variants == {("topk_softmax", False, True, False), ("topk_softmax", False, False, False),
                        ("softmax_topk", False, False, False), ("softmax_topk", True, False, False),
                        ("softmax_topk", False, True, True)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_op_equals_the_eager_impls(name):
    model = _model(CONFIGS[name])
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    outs = {}
    with torch.no_grad():
        for impl in ("dense", "gather", "op"):
            model.set_moe_impl(impl)
            outs[impl] = model(tokens)[0]
    torch.testing.assert_close(outs["op"], outs["dense"], atol=0, rtol=0)  # the same math, op by op
    torch.testing.assert_close(outs["op"], outs["gather"], atol=1e-5, rtol=1e-5)


def test_router_bias():
    """The operator's optional router bias is added to the logits before scoring (no family uses it yet)."""
    torch.manual_seed(0)
    N, H, E, I = 5, 16, 4, 8
    x, rw, rb = torch.randn(N, H), torch.randn(E, H), 3 * torch.randn(E)
    w1, w3, w2 = torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I)
    got = moe(x, rw, rb, w1, w3, w2, None, None, None, None, top_k=2, scoring="softmax_topk", norm_topk_prob=True)
    # the bias as an extra input feature: the same logits without a bias operand
    ref = moe(torch.cat([x, torch.ones(N, 1)], 1), torch.cat([rw, rb[:, None]], 1), None,
              torch.nn.functional.pad(w1, (0, 1)), torch.nn.functional.pad(w3, (0, 1)),
              torch.nn.functional.pad(w2, (0, 0, 0, 1)), None, None, None, None,
              top_k=2, scoring="softmax_topk", norm_topk_prob=True)[:, :H]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    unbiased = moe(x, rw, None, w1, w3, w2, None, None, None, None, top_k=2, scoring="softmax_topk", norm_topk_prob=True)
    assert not torch.allclose(got, unbiased)


def test_bad_scoring_names_the_op():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"mobilemoe::moe: scoring must be one of"):
        moe(x, torch.randn(3, 4), None, torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 4, 2),
            None, None, None, None, top_k=1, scoring="sigmoid", norm_topk_prob=False)


@pytest.mark.parametrize("name", ["qwen2_moe", "test-moe"])
def test_export_records_one_op_per_layer(name):
    model = _model(CONFIGS[name])
    ep = export_entry(model, "decode")
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and n.target == torch.ops.mobilemoe.moe.default]
    assert len(calls) == model.config.num_layers
    einsums = [n for n in ep.graph.nodes if n.op == "call_function" and "einsum" in str(n.target)]
    assert all("e" not in n.args[0].split("->")[1] for n in einsums)  # no expert einsum outside the op
    c = model.config
    for node in calls:
        args = node.args
        assert args[10:] == (c.top_k, c.router, c.norm_topk_prob)
        assert args[2] is None  # no router bias
        assert (args[6] is None) == (c.shared_expert_hidden == 0) and (args[9] is None) == (not c.shared_expert_gate)
    assert all(layer.moe.impl == "auto" for layer in model.layers)  # export restores the impl
    calls = exported_calls(ep)  # what a backend maps the op from: attributes, parameter operands
    assert [a for a, _ in calls] == [{"top_k": c.top_k, "scoring": c.router, "norm_topk_prob": c.norm_topk_prob}] * c.num_layers
    ops = calls[1][1]
    assert ops["router_weight"] == "model.layers.1.moe.router.weight" and ops["w2"] == "model.layers.1.moe.w2"
    assert ops["router_bias"] is None and ops["shared_w1"] == "model.layers.1.moe.shared.w1.weight"
    assert ops["shared_gate"] == ("model.layers.1.moe.shared_gate.weight" if c.shared_expert_gate else None)
