"""train.qat: torchao fake quantization of every INT4 weight, and a converted checkpoint whose INT4
codes and scales (mobilemoe.quant, what the compiler packs) are exactly those QAT simulated."""
import pytest
import torch
from torch.nn.utils import parametrize

from mobilemoe.checkpoint import load_checkpoint, save_checkpoint
from mobilemoe.config import MobileMoEConfig
from mobilemoe.model import MobileMoE, MoE
from mobilemoe.quant import GROUP_SIZE, SCALE_DTYPE, SCALE_EPS, dequantize_int4, quantize_int4
from train.qat import convert_qat, int4_weights, prepare_qat, simulate_int4

pytest.importorskip("torchao")


def _model(name="test-moe", seed=0):
    torch.manual_seed(seed)
    return MobileMoE(MobileMoEConfig.from_name(name)).eval()


def test_prepare_covers_exactly_the_compilers_int4_weights():
    m = prepare_qat(_model())
    names = {full for _, _, full in int4_weights(_model())}
    assert "embed.weight" in names and "lm_head.weight" in names  # tied: quantized for both uses
    assert {"layers.0.moe.w1", "layers.0.moe.w2", "layers.0.moe.w3", "layers.0.attn.wq.weight",
            "layers.0.moe.shared.w1.weight"} <= names
    assert not any("router" in n or "norm" in n for n in names)
    assert not parametrize.is_parametrized(m.layers[0].moe.router)
    assert parametrize.is_parametrized(m.layers[0].moe, "w2")
    # tied embedding stays one trainable tensor
    assert m.embed.parametrizations.weight.original is m.lm_head.parametrizations.weight.original


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_converted_checkpoint_reproduces_qat_bit_exactly(tmp_path, storage):
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    from torchao.quantization.utils import get_group_qparams_symmetric

    from mobilemoe.quant import torchao_qat_weight_config

    qat = prepare_qat(_model(), storage)
    with torch.no_grad():  # trained-looking weights: not on any bf16 / INT4 grid
        for p in qat.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        qat.layers[0].attn.wq.parametrizations.weight.original[0, :GROUP_SIZE] = 0.0  # an all-zero group
    tokens = torch.randint(0, qat.config.vocab_size, (2, 16))
    qat_logits = qat(tokens)[0]
    simulated = {full: getattr(mod, attr).detach().clone() for mod, attr, full in int4_weights(qat)}

    model = convert_qat(qat, storage)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model.lm_head.weight is model.embed.weight
    save_checkpoint(model, tmp_path / "ckpt", dtype=storage)
    loaded = load_checkpoint(tmp_path / "ckpt")  # float32, as the compiler reads it

    fq = IntxFakeQuantizer(torchao_qat_weight_config())
    params = dict(loaded.named_parameters())
    for full, qat_w in simulated.items():
        w = params["embed.weight" if full == "lm_head.weight" else full]
        codes, scales = quantize_int4(w, name=full)  # what the compiler packs
        assert torch.equal(dequantize_int4(codes, scales), qat_w), full
        w2 = w.reshape(-1, w.shape[-1])
        ao_scale, _ = get_group_qparams_symmetric(w2, 4, GROUP_SIZE, SCALE_DTYPE, eps=SCALE_EPS)
        assert torch.equal(scales.reshape(ao_scale.shape), ao_scale), full
        assert torch.equal(fq(w2).view(w.shape), qat_w), full
    assert torch.equal(simulate_int4(loaded)(tokens)[0], qat_logits)


def test_storage_rounding_is_straight_through():
    qat = prepare_qat(_model(), torch.bfloat16)
    qat.train()
    logits = qat(torch.randint(0, 512, (1, 8)))[0]
    logits.sum().backward()
    g = qat.layers[0].moe.parametrizations.w1.original.grad
    assert g is not None and g.abs().sum() > 0


def test_dequantized_weights_are_not_a_fixed_point():
    """Why final/ holds latent weights: dequant(quantize(w)) requantizes to other scales."""
    w = torch.randn(64, 128) * 0.02
    d = dequantize_int4(*quantize_int4(w))
    assert not torch.equal(dequantize_int4(*quantize_int4(d)), d)


def test_simulate_int4_leaves_router_and_norms_float():
    m = _model()
    with torch.no_grad():
        m.layers[0].moe.router.weight.add_(1e-3)
    sim = simulate_int4(m)
    assert torch.equal(sim.layers[0].moe.router.weight, m.layers[0].moe.router.weight)
    assert torch.equal(sim.norm.weight, m.norm.weight)
    assert not torch.equal(sim.layers[0].moe.w1, m.layers[0].moe.w1)
    assert sim.lm_head.weight is sim.embed.weight


def test_float_weights_are_the_moe_ops_router_operands_by_role(monkeypatch):
    """What stays float is chosen by the operand's role in the MoE op, not by the word "router"."""
    m = _model()
    n = m.config.num_layers
    assert m.float_weight_names() == {f"layers.{i}.moe.router.weight" for i in range(n)}
    for layer in m.layers:  # a family storing its router as `gate` (as HF Mixtral / Qwen-MoE name it)
        layer.moe.gate = layer.moe.router
        del layer.moe.router
    monkeypatch.setitem(MoE.OPERANDS, "router_weight", "gate.weight")
    assert m.float_weight_names() == {f"layers.{i}.moe.gate.weight" for i in range(n)}
    assert not any(".gate." in full for _, _, full in int4_weights(m))
    sim = simulate_int4(m)
    assert torch.equal(sim.layers[0].moe.gate.weight, m.layers[0].moe.gate.weight)
    assert not torch.equal(sim.layers[0].moe.w1, m.layers[0].moe.w1)
