"""mobilemoe.quant: the INT4 g32_sym_u32k8 format, its packing, its SQNR, and torchao QAT parity."""

import pytest
import torch

from mobilemoe.quant import (
    GROUP_SIZE,
    QMAX,
    QMIN,
    SCALE_EPS,
    dequantize_int4,
    fake_quantize_int4,
    pack_int4,
    quantize_int4,
    sqnr,
    torchao_qat_weight_config,
    unpack_int4,
)

# Measured 20.46 dB on N(0, 0.02) [1024, 4096]; a 4-bit symmetric group-32 quantizer gives ~20 dB.
MIN_SQNR_DB = 19.5


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_pack_unpack_round_trip():
    codes = torch.randint(QMIN, QMAX + 1, (3, 5, 64), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint32 and packed.shape == (3, 5, 8)
    assert torch.equal(unpack_int4(packed), codes)


def test_packed_bit_layout():
    # k = 8j + i sits in word j, bits 4i .. 4i+3, stored as q + 8.
    codes = torch.full((1, 16), QMIN, dtype=torch.int8)  # u = 0
    codes[0, 3] = 7  # u = 15 in word 0, nibble 3
    codes[0, 8] = -7  # u = 1 in word 1, nibble 0
    words = pack_int4(codes).to(torch.int64)
    assert words.tolist() == [[0xF << 12, 0x1]]


def test_all_levels_used_and_scale_rule():
    w = gaussian(256, 512)
    codes, scales = quantize_int4(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16
    assert scales.shape == (256, 512 // GROUP_SIZE)
    assert torch.equal(torch.unique(codes), torch.arange(QMIN, QMAX + 1, dtype=torch.int8))
    amax = w.reshape(256, -1, GROUP_SIZE).abs().amax(-1)
    assert torch.equal(scales, (amax / 7.5).to(torch.float16))


def test_sqnr_on_gaussian_weights():
    w = gaussian(1024, 4096)
    db = sqnr(w, dequantize_int4(*quantize_int4(w)))
    assert MIN_SQNR_DB < db < 22.0, db


def test_dequant_of_packed_matches_formula():
    w = gaussian(8, 64)
    codes, scales = quantize_int4(w)
    words = pack_int4(codes).to(torch.int64)
    k = torch.arange(64)
    nib = (words[:, k // 8] >> (4 * (k % 8))) & 15
    manual = (nib - 8).float() * scales.float()[:, k // 32]
    assert torch.equal(manual, dequantize_int4(codes, scales))


def test_torchao_fake_quant_is_bit_exact():
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    w = gaussian(512, 1024, seed=1)
    w[3, :GROUP_SIZE] = 0.0  # an all-zero group hits the eps clamp
    w[4, :GROUP_SIZE] = 1e-7
    ours = dequantize_int4(*quantize_int4(w))
    theirs = IntxFakeQuantizer(torchao_qat_weight_config())(w)
    assert torch.equal(ours, theirs)
    assert torch.all(ours[3, :GROUP_SIZE] == 0)
    assert torch.equal(fake_quantize_int4(w), theirs)


def test_torchao_qat_linear_matches_dequantized_linear():
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    w = gaussian(64, 128, seed=2)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))
    model[0].weight.data.copy_(w)
    quantize_(model, QATConfig(weight_config=torchao_qat_weight_config(), step="prepare"))
    x = gaussian(3, 128, seed=3)
    ref = torch.nn.functional.linear(x, dequantize_int4(*quantize_int4(w)))
    assert torch.equal(model(x), ref)


def test_fake_quantize_straight_through_gradient():
    w = gaussian(16, 64).requires_grad_()
    fake_quantize_int4(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_stacked_experts_match_per_expert():
    w = gaussian(4, 32, 96)  # [E, N, K]
    codes, scales = quantize_int4(w)
    assert codes.shape == (4, 32, 96) and scales.shape == (4, 32, 3)
    for e in range(4):
        ce, se = quantize_int4(w[e])
        assert torch.equal(codes[e], ce) and torch.equal(scales[e], se)
    packed = pack_int4(codes)
    assert packed.shape == (4, 32, 12)
    assert torch.equal(dequantize_int4(unpack_int4(packed), scales), fake_quantize_int4(w))


def test_eps_keeps_tiny_groups_finite():
    w = torch.full((1, 32), 1e-9)
    codes, scales = quantize_int4(w)
    assert scales.item() == SCALE_EPS and torch.all(codes == 0)


def test_bad_shapes_name_the_tensor():
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up.*multiple of the INT4 group size 32"):
        quantize_int4(torch.zeros(8, 48), name="layers.0.mlp.up")
    with pytest.raises(ValueError, match=r"expected \[\.\.\., N, K\]"):
        quantize_int4(torch.zeros(64))
    with pytest.raises(ValueError, match="scales: expected shape"):
        dequantize_int4(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="values must lie in"):
        pack_int4(torch.full((1, 8), 8))
