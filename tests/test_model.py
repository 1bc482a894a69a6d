import dataclasses

import pytest
import torch

from mobilemoe.config import MobileMoEConfig
from mobilemoe.export import example_inputs, export_entry
from mobilemoe.model import MobileMoE


def _model(name):
    torch.manual_seed(0)
    return MobileMoE(MobileMoEConfig.from_name(name)).eval()


@pytest.mark.parametrize("name", ["test-moe", "test-moe-noshared"])
def test_moe_implementations_agree(name):
    m = _model(name)
    tokens = torch.randint(0, m.config.vocab_size, (2, 13))
    outs = {}
    for impl in ("dense", "gather", "grouped"):
        m.set_moe_impl(impl)
        outs[impl] = m(tokens)[0]
    torch.testing.assert_close(outs["gather"], outs["dense"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["grouped"], outs["dense"], atol=1e-5, rtol=1e-5)


def test_routing_is_topk_then_softmax():
    m = _model("test-moe")
    moe = m.layers[0].moe
    x = torch.randn(5, m.config.hidden_size)
    logits, w, ids = moe.route(x)
    ref_logits = x @ moe.router.weight.T
    top = ref_logits.topk(m.config.top_k, dim=-1)
    torch.testing.assert_close(ids, top.indices)
    torch.testing.assert_close(w, torch.softmax(top.values, -1))
    # shared expert is always on: zeroing routed experts leaves exactly the shared output
    with torch.no_grad():
        for p in (moe.w1, moe.w2, moe.w3):
            p.zero_()
    y, _, _ = moe(x[None])
    torch.testing.assert_close(y[0], moe.shared(x))


@pytest.mark.parametrize("name", ["test-moe", "test-dense"])
def test_kv_cache_decode_equals_full_forward(name):
    m = _model(name)
    tokens = torch.randint(0, m.config.vocab_size, (2, 12))
    full, _ = m(tokens)
    logits, kv = m(tokens[:, :5])
    pieces = [logits]
    for i in range(5, 12):
        logits, kv = m(tokens[:, i:i + 1], kv=kv)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert kv.shape == (m.config.num_layers, 2, 2, m.config.num_kv_heads, 12, m.config.head_dim)
    last, _ = m(tokens, last_only=True)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_aux_losses_and_backward():
    m = _model("test-moe").train()
    tokens = torch.randint(0, m.config.vocab_size, (2, 16))
    logits, _, aux = m(tokens, return_aux=True)
    E = m.config.num_experts
    assert aux["expert_share"].shape == (m.config.num_layers, E)
    torch.testing.assert_close(aux["expert_share"].sum(-1), torch.ones(m.config.num_layers))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    (loss + 0.01 * aux["load_balance"] + 0.001 * aux["z_loss"]).backward()
    moe = m.layers[0].moe
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.w1.grad.abs().sum() > 0


def test_perfectly_balanced_router_gives_unit_load_loss():
    m = _model("test-moe").train()
    for layer in m.layers:
        torch.nn.init.zeros_(layer.moe.router.weight)  # uniform probs
    _, _, aux = m(torch.randint(0, 512, (4, 32)), return_aux=True)
    # f sums to 1 and P = 1/E exactly, so E * sum f P = 1
    torch.testing.assert_close(aux["load_balance"], torch.tensor(1.0))


def _layers(kv):  # stacked [L, 2, B, nkv, P, D] -> [k_0 (transposed: [B, nkv, D, P]), v_0, k_1, ...]
    return [kv[i, j].transpose(-1, -2) if j == 0 else kv[i, j] for i in range(kv.shape[0]) for j in range(2)]


@pytest.mark.parametrize("cache", ["layers", "stacked"])
@pytest.mark.parametrize("name", ["test-moe", "test-dense"])
def test_torch_export_dynamic_lengths(name, cache):
    m = _model(name)
    ep = export_entry(m, "prefill", cache=cache)
    for seq, past in [(2, 0), (9, 0), (6, 5)]:
        tokens, pos, kv = example_inputs(m, seq, past)
        tokens = torch.randint(0, m.config.vocab_size, tokens.shape)
        kv = torch.randn_like(kv)
        ref_logits, ref_kv = m(tokens, pos, kv)
        if cache == "layers":
            got_logits, *got = ep.module()(tokens, pos, _layers(kv))
            assert len(got) == 2 * m.config.num_layers
            for g, r in zip(got, _layers(ref_kv)):
                torch.testing.assert_close(g, r)
        else:
            got_logits, got_kv = ep.module()(tokens, pos, kv)
            torch.testing.assert_close(got_kv, ref_kv)
        torch.testing.assert_close(got_logits, ref_logits[:, -1], atol=1e-5, rtol=1e-5)
    dec = export_entry(m, "decode", cache=cache)
    names = {n.target.__name__ for n in dec.graph.nodes if n.op == "call_function" and hasattr(n.target, "__name__")}
    assert not any(bad in names for bad in ("scatter_add.default", "index_add.default", "nonzero.default", "bincount.default"))
    tokens, pos, kv = example_inputs(m, 1, 7, cache=cache)
    ref = m(tokens, pos, example_inputs(m, 1, 7)[2])[0][:, -1]
    torch.testing.assert_close(dec.module()(tokens, pos, kv)[0], ref, atol=1e-5, rtol=1e-5)


def test_layered_cache_forward_matches_stacked():
    m = _model("test-moe")
    tokens = torch.randint(0, m.config.vocab_size, (1, 5))
    kv = torch.randn(m.config.num_layers, 2, 1, m.config.num_kv_heads, 3, m.config.head_dim)
    logits, ref_kv = m(tokens, kv=kv)
    got_logits, pairs = m(tokens, kv=[(kv[i, 0].transpose(-1, -2), kv[i, 1]) for i in range(kv.shape[0])])
    torch.testing.assert_close(got_logits, logits)
    torch.testing.assert_close(torch.stack([torch.stack([k.transpose(-1, -2), v]) for k, v in pairs]), ref_kv)


def test_weight_parts_by_module_and_moe_role():
    """What the compiler's kernel accounting reads (passes/common.py WEIGHT_PARTS): every parameter's
    part, from the module holding it and, in the MoE, its role in the op."""
    cfg = dataclasses.replace(MobileMoEConfig.from_name("test-moe"), qk_norm="head", shared_expert_gate=True,
                              arch="qwen2_moe")
    parts = MobileMoE(cfg).weight_parts()
    assert set(parts) == {n for n, _ in MobileMoE(cfg).named_parameters(remove_duplicate=False)}
    layer = {k.removeprefix("layers.0."): v for k, v in parts.items() if k.startswith("layers.0.")}
    assert layer == {"attn_norm.weight": "norm", "ffn_norm.weight": "norm", "attn.q_norm.weight": "norm",
                     "attn.k_norm.weight": "norm", **{f"attn.w{p}.weight": "attention" for p in "qkvo"},
                     "moe.router.weight": "router", **{f"moe.w{i}": "routed experts" for i in (1, 2, 3)},
                     **{f"moe.shared.w{i}.weight": "shared expert" for i in (1, 2, 3)},
                     "moe.shared_gate.weight": "shared expert"}
    assert (parts["embed.weight"], parts["lm_head.weight"], parts["norm.weight"]) == ("embedding", "lm head", "norm")
    dense = MobileMoE(MobileMoEConfig.from_name("test-dense")).weight_parts()
    assert {dense[f"layers.1.ffn.w{i}.weight"] for i in (1, 2, 3)} == {"dense ffn"}
