"""The INT4 weight format: one definition shared by QAT (torchao), the TVM kernels and ONNX Runtime.

Layout ``INT4_LAYOUT = "g32_sym_u32k8"`` for a weight ``W [..., N, K]`` (torch Linear layout, out x in;
stacked experts ``[E, N, K]`` and any other leading dims broadcast):

- groups: ``GROUP_SIZE = 32`` consecutive elements along K (the input dim); K % 32 == 0.
- scale (symmetric, torchao's rule): ``scale = fp16(clamp(amax(|w_group|) / 7.5, min=SCALE_EPS))``,
  computed in fp32 then rounded to float16. Stored as float16 ``[..., N, K // 32]``.
- codes: ``q = clamp(round_half_even(w * fp32(fp16(1 / scale))), -8, 7)``, int8 ``[..., N, K]``.
  All 16 levels are used: the group's amax lands on +-7.5, which rounds to -8 (or 8, clamped to 7).
  The reciprocal of the fp16 scale is itself rounded to fp16 because that is what torchao's fake
  quantizer computes (``input * (1.0 / scale)`` with an fp16 ``scale``); it differs from ``w / scale``
  by one code on ~0.5% of gaussian weights, and matching it makes QAT and export agree bit for bit.
- packed codes: ``u = q + 8`` in [0, 15]; uint32 word ``j`` of row ``n`` holds ``k = 8j .. 8j+7``,
  nibble ``i`` (bits ``4i .. 4i+3``) holds ``u[n, 8j + i]``. Packed shape ``[..., N, K // 8]``.
- dequant: ``w[n, k] = (((word[n, k // 8] >> 4 * (k % 8)) & 15) - 8) * scale[n, k // 32]``, in fp32,
  and it is exact: a 4-bit integer times an fp16 scale is representable in fp32.
- ONNX Runtime bytes ``ORT_INT4_LAYOUT = "g32_u8k2_zp8"`` (MatMulNBits, QMoE, GatherBlockQuantized):
  uint8 ``[..., N, K // 2]``, byte ``j`` holds ``u[n, 2j]`` in its low and ``u[n, 2j + 1]`` in its high
  nibble; ORT's default 4-bit zero point 8 turns ``u`` back into ``q``. These are the little-endian
  bytes of the packed words above (``int4_bytes``): the very same codes, only regrouped.

Interleaved codes (``g32_sym_u32k8_r{R}l{L}``, the dot-product kernels' layout): the same words in a
different order, so that a kernel computing R output rows reads one sequential stream. Viewed as
``[..., N / R, K / 8 / L, R, L]`` (L words of each of R rows, then the next L words), stored with the
shape ``[..., N, K // 8]`` unchanged: word ``(n, j)`` sits at flat position ``interleaved_index(n, j)``
``= ((n // R) * (K / 8 / L) + j // L) * R * L + (n % R) * L + j % L`` of its matrix. Scales stay in
row order. (A row-major GEMV over R rows at once reads R streams 512 B apart and ran at 8.5 GB/s on
one znver4 core; interleaved, the same kernel read 21.8 GB/s, numpy's sum 24.)

Activations (``ACT_INT8_LAYOUT = "g32_sym_i8"``, the int8 x int4 dot-product kernels of
tir_kernels/int4_dot.py): per row and group of 32 along K, ``amax = max|x_group|``,
``q = round_half_even(x * fp32(127 / amax))`` (0 if amax = 0), int8 in [-127, 127], and the float32
scale ``amax / 127``. ``int8_int4_matmul`` is the reference those kernels are checked against.

``torchao_qat_weight_config()`` is the torchao 0.18 QAT weight config whose fake-quantized weight
equals ``dequantize_int4(*quantize_int4(w))`` bit for bit, for float32 weights.
"""

from __future__ import annotations

import copy
import math
import sys

import torch

INT4_LAYOUT = "g32_sym_u32k8"
ORT_INT4_LAYOUT = "g32_u8k2_zp8"  # ONNX Runtime's 4-bit byte layout (see the docstring)
ACT_INT8_LAYOUT = "g32_sym_i8"  # int8 activations of the dot-product kernels (see the docstring)
GROUP_SIZE = 32  # elements of K sharing one scale
QMIN, QMAX = -8, 7  # signed code range; all 16 levels used
ZERO_CODE = -QMIN  # u = q + 8 is what a nibble stores
NIBBLES_PER_WORD = 8  # uint32 word j holds k = 8j .. 8j+7, nibble i at bits 4i .. 4i+3
BITS = 4
SCALE_DTYPE = torch.float16
PACKED_DTYPE = torch.uint32
# Smallest normal fp16. Clamping here (in fp32, before the fp16 cast) keeps every stored scale a
# normal fp16 and its fp16 reciprocal finite (<= 16384); an all-zero group dequantizes to zeros.
SCALE_EPS = 2.0**-14


def _check_weight(w: torch.Tensor, name: str | None) -> None:
    what = f"weight {name!r}" if name else "weight"
    if w.dim() < 2:
        raise ValueError(f"{what}: expected [..., N, K], got shape {tuple(w.shape)}")
    if w.shape[-1] % GROUP_SIZE != 0:
        raise ValueError(
            f"{what}: K = {w.shape[-1]} (last dim of shape {tuple(w.shape)}) must be a multiple "
            f"of the INT4 group size {GROUP_SIZE} ({INT4_LAYOUT})"
        )
    if not w.is_floating_point():
        raise TypeError(f"{what}: expected a floating point tensor, got {w.dtype}")


def quantize_int4(w: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., N, K] float -> (codes int8 [..., N, K] in [-8, 7], scales float16 [..., N, K // 32])."""
    _check_weight(w, name)
    *lead, n, k = w.shape
    with torch.no_grad():
        wg = w.detach().to(torch.float32).reshape(*lead, n, k // GROUP_SIZE, GROUP_SIZE)
        amax = wg.abs().amax(dim=-1)  # [..., N, K/32]
        scales = torch.clamp(amax / ((QMAX - QMIN) / 2), min=SCALE_EPS).to(SCALE_DTYPE)
        inv = (1.0 / scales).to(torch.float32)  # fp16 reciprocal, as torchao computes it
        codes = torch.clamp(torch.round(wg * inv.unsqueeze(-1)), QMIN, QMAX)
    return codes.to(torch.int8).reshape(*lead, n, k), scales


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(codes [..., N, K], scales fp16 [..., N, K // 32]) -> float32 W [..., N, K]."""
    *lead, n, k = codes.shape
    if tuple(scales.shape) != (*lead, n, k // GROUP_SIZE) or k % GROUP_SIZE:
        raise ValueError(
            f"scales: expected shape {(*lead, n, k // GROUP_SIZE)} for codes {tuple(codes.shape)}, "
            f"got {tuple(scales.shape)}"
        )
    qg = codes.to(torch.float32).reshape(*lead, n, k // GROUP_SIZE, GROUP_SIZE)
    return (qg * scales.to(torch.float32).unsqueeze(-1)).reshape(*lead, n, k)


class _FakeQuantizeInt4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, name: str | None) -> torch.Tensor:
        return dequantize_int4(*quantize_int4(w, name)).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None  # straight-through estimator


def fake_quantize_int4(w: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """dequantize_int4(quantize_int4(w)) in w's dtype, with an identity (straight-through) gradient.

    For float32 w the forward values equal torchao's fake quantizer under
    torchao_qat_weight_config(); torchao's gradient is fp16(1/s) * s (~1, 0 where +7.5 clamps to 7).
    """
    return _FakeQuantizeInt4.apply(w, name)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes int [..., N, K] in [-8, 7] -> uint32 [..., N, K // 8] (layout g32_sym_u32k8)."""
    *lead, n, k = codes.shape
    if k % NIBBLES_PER_WORD:
        raise ValueError(f"codes: K = {k} must be a multiple of {NIBBLES_PER_WORD} to pack")
    if codes.numel() and (codes.min() < QMIN or codes.max() > QMAX):
        raise ValueError(f"codes: values must lie in [{QMIN}, {QMAX}], got [{codes.min()}, {codes.max()}]")
    u = (codes.to(torch.int32) + ZERO_CODE).reshape(*lead, n, k // NIBBLES_PER_WORD, NIBBLES_PER_WORD)
    words = u[..., 0].clone()
    for i in range(1, NIBBLES_PER_WORD):  # int32 bit pattern; nibble 7 lands in the sign bit
        words |= u[..., i] << (BITS * i)
    return words.view(PACKED_DTYPE)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint32 [..., N, K // 8] -> codes int8 [..., N, K] in [-8, 7]."""
    if packed.dtype != PACKED_DTYPE:
        raise TypeError(f"packed: expected {PACKED_DTYPE}, got {packed.dtype}")
    *lead, n, kw = packed.shape
    words = packed.to(torch.int64).unsqueeze(-1)  # uint32 has no shift ops in torch
    shifts = torch.arange(NIBBLES_PER_WORD, dtype=torch.int64) * BITS
    u = (words >> shifts) & (2**BITS - 1)
    return (u - ZERO_CODE).to(torch.int8).reshape(*lead, n, kw * NIBBLES_PER_WORD)


def int4_bytes(packed: torch.Tensor) -> torch.Tensor:
    """uint32 words [..., N, K // 8] -> uint8 [..., N, K // 2] (layout g32_u8k2_zp8): the words' bytes,
    least significant first, whatever the host's byte order."""
    if packed.dtype != PACKED_DTYPE:
        raise TypeError(f"packed: expected {PACKED_DTYPE}, got {packed.dtype}")
    if sys.byteorder == "little":  # the words' memory already is that byte sequence
        return packed.contiguous().view(torch.uint8)
    words = packed.to(torch.int64).unsqueeze(-1)
    b = (words >> (torch.arange(4, dtype=torch.int64) * 8)) & 0xFF
    return b.to(torch.uint8).flatten(-2)


def unpack_int4_bytes(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., N, K // 2] (layout g32_u8k2_zp8) -> codes int8 [..., N, K] in [-8, 7]."""
    if data.dtype != torch.uint8:
        raise TypeError(f"data: expected torch.uint8, got {data.dtype}")
    u = torch.stack([data & 15, data >> BITS], dim=-1).flatten(-2)  # low nibble first
    return (u.to(torch.int16) - ZERO_CODE).to(torch.int8)


def interleaved_index(n, j, words: int, rows: int, lanes: int):
    """Flat position (within its [N, K // 8] matrix) of packed word (n, j) in the interleaved layout.
    Pure arithmetic: works on ints, tensors and TIR expressions alike."""
    return ((n // rows) * (words // lanes) + j // lanes) * (rows * lanes) + (n % rows) * lanes + j % lanes


def interleave_int4(packed, rows: int, lanes: int):
    """Row-major packed codes [..., N, K // 8] (torch or numpy) -> the interleaved layout, same shape."""
    *lead, n, words = packed.shape
    if n % rows or words % lanes:
        raise ValueError(f"interleave_int4: [N={n}, words={words}] must divide into rows={rows} x lanes={lanes}")
    blocks = packed.reshape(*lead, n // rows, rows, words // lanes, lanes)
    order = list(range(len(lead))) + [len(lead), len(lead) + 2, len(lead) + 1, len(lead) + 3]
    moved = blocks.permute(*order) if hasattr(blocks, "permute") else blocks.transpose(*order)
    return moved.reshape(*lead, n, words) if hasattr(moved, "permute") else moved.copy().reshape(*lead, n, words)


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x [..., K] -> (int8 q [..., K], float32 scale [..., K // 32]) in ACT_INT8_LAYOUT."""
    if x.dtype != torch.float32 or x.shape[-1] % GROUP_SIZE:
        raise ValueError(f"quantize_act_int8: need float32 [..., K] with K % {GROUP_SIZE} == 0, "
                         f"got {x.dtype} {tuple(x.shape)}")
    g = x.unflatten(-1, (-1, GROUP_SIZE))
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(g * inv).to(torch.int8).flatten(-2)
    return q, (amax / 127.0).squeeze(-1)


def int8_int4_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What the dot-product kernels compute: x [M, K] quantized by quantize_act_int8, times INT4 weights
    (codes [N, K], scales [N, K // 32]) -> [M, N] float64, with exact integer sums per group."""
    q, sx = quantize_act_int8(x)
    qg = q.to(torch.int64).unflatten(-1, (-1, GROUP_SIZE))  # [M, G, 32]
    cg = codes.to(torch.int64).unflatten(-1, (-1, GROUP_SIZE))  # [N, G, 32]
    dots = torch.einsum("mgk,ngk->mng", qg, cg).double()  # exact
    return (dots * sx.double()[:, None, :] * scales.double()[None]).sum(-1)


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20 * log10(||ref|| / ||ref - approx||) in dB."""
    ref64, approx64 = ref.detach().to(torch.float64), approx.detach().to(torch.float64)
    noise = torch.linalg.vector_norm(ref64 - approx64).item()
    signal = torch.linalg.vector_norm(ref64).item()
    return math.inf if noise == 0 else 20 * math.log10(signal / noise)


def is_int4_weight(name: str, p: torch.Tensor, float_names: set[str]) -> bool:
    """Weights the compiler stores as INT4: 2-D / stacked 3-D, K % 32 == 0, not one of `float_names`
    (MobileMoE.float_weight_names: the MoE op's router operands, by role)."""
    return p.dim() in (2, 3) and p.shape[-1] % GROUP_SIZE == 0 and name not in float_names


@torch.no_grad()
def simulate_int4(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a (converted) model whose INT4 weights are dequant(quantize(w)): the compiled model."""
    sim = copy.deepcopy(model)
    float_names = sim.float_weight_names()
    for name, p in sim.named_parameters():
        if is_int4_weight(name, p, float_names):
            p.copy_(dequantize_int4(*quantize_int4(p.float(), name=name)).to(p.dtype))
    return sim


def torchao_qat_weight_config():
    """torchao QAT weight config that simulates this format exactly (float32 weights).

    Use as ``quantize_(model, QATConfig(weight_config=torchao_qat_weight_config(), step="prepare"))``.
    torchao's IntxFakeQuantizer takes 2-D weights only: fake-quantize stacked experts [E, N, K] as
    [E * N, K] (groups run along K, so the result is the same).
    """
    from torchao.quantization.qat import IntxFakeQuantizeConfig  # deferred: QAT only, and torchao may not import

    return IntxFakeQuantizeConfig(
        torch.int4,
        group_size=GROUP_SIZE,
        is_symmetric=True,
        scale_precision=SCALE_DTYPE,
        eps=SCALE_EPS,
    )
