"""tir_kernels/int4_dot_gemm.py: the M-tiled dot-product GEMM and grouped MoE kernels.

Each kernel is checked against mobilemoe.quant.int8_int4_matmul (same quantized activations, exact
integer group sums) to float32 rounding, for token counts around the tile (remainders, m = 1), and
the grouped kernels with uneven rows per expert and experts with no rows (their scales are NaN:
reading them would show). The arm64 forms must compile to sdot.
"""
import numpy as np
import pytest
import torch
import tvm

from tir_kernels import int4_dot, int4_dot_gemm, int4_mmla
from mobilemoe.quant import dequantize_int4, int8_int4_matmul, pack_int4, quantize_int4, sqnr

from test_int4_dot import ANDROID, HOST_ISA, needs_vnni, run, weight


def assert_matches(y, ref):
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@needs_vnni
@pytest.mark.parametrize("m", [1, 3, 4, 5, 17, 128, 261])  # 261: 3 token chunks (CHUNK = 128), the last partial
# K = 96: 4-word vectors (the arm64 width), K = 64: 8 words, else 16; n = 36: 4-row blocks, n = 18: no row quads
@pytest.mark.parametrize("n,k,mt", [(256, 512, 4), (96, 128, 4), (64, 256, 3), (64, 96, 4), (32, 64, 4), (36, 128, 4),
                                    (18, 64, 2)])
def test_tiled_matmul_matches_reference(n, k, mt, m):
    codes, scales, w, s = weight(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = run(int4_dot_gemm.int4_matmul_dot_tiled(n, k, HOST_ISA, m_tile=mt), (x.numpy(), w, s), (m, n))
    ref = int8_int4_matmul(x, codes, scales).numpy()
    assert_matches(y, ref)
    fp32 = (x.double() @ dequantize_int4(codes, scales).double().T).numpy()
    assert sqnr(torch.from_numpy(fp32), torch.from_numpy(y)) > 38


@needs_vnni
def test_tiled_matmul_m1_equals_gemv():
    """m = 1 runs the GEMV's row blocks: bit-identical to int4_dot.int4_matmul_dot."""
    n, k = 128, 1024
    _, _, w, s = weight(n, k, seed=7)
    x = np.random.default_rng(7).standard_normal((1, k)).astype("float32")
    y = run(int4_dot_gemm.int4_matmul_dot_tiled(n, k, HOST_ISA), (x, w, s), (1, n))
    np.testing.assert_array_equal(y, run(int4_dot.int4_matmul_dot(n, k, HOST_ISA), (x, w, s), (1, n)))


E, TOP_K = 6, 2


def grouped_case(t, allowed, seed):
    """ids [t, TOP_K] over `allowed` experts, rw, and the route plan (offsets, order)."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(allowed, TOP_K, replace=False) for _ in range(t)])
    rw = rng.random((t, TOP_K)).astype("float32")
    order = np.argsort(ids.reshape(-1), kind="stable").astype("int32")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(ids.reshape(-1), minlength=E))]).astype("int32")
    return ids, rw, offsets, order


# (tokens, experts routed to): T = 1, uneven rows over all experts, and T = 23 crowded onto 3 experts
# (expert 0, 2, 5 empty; 1, 3, 4 with ragged row counts).
CASES = [(1, list(range(E))), (13, list(range(E))), (23, [1, 3, 4])]


@needs_vnni
@pytest.mark.parametrize("t,allowed", CASES)
@pytest.mark.parametrize("op", ["gate_up", "down_combine"])
def test_grouped_dot_matches_reference(op, t, allowed):
    n, k = (128, 256) if op == "gate_up" else (256, 64)
    codes, scales, w, s = weight(E, n, k, seed=t)
    ids, rw, offsets, order = grouped_case(t, allowed, seed=t)
    s = s.copy()
    s[[e for e in range(E) if e not in allowed]] = np.nan  # an empty expert's weights are never read
    gen = torch.Generator().manual_seed(t)
    x = torch.randn((t, k) if op == "gate_up" else (t * TOP_K, k), generator=gen)
    func = int4_dot_gemm.moe_grouped_dot(op, E, n, k, TOP_K, HOST_ISA)
    rows = [int8_int4_matmul(x[order[r] // TOP_K if op == "gate_up" else r][None], codes[e], scales[e])[0]
            for e in range(E) for r in range(offsets[e], offsets[e + 1])]
    if op == "gate_up":
        y = run(func, (x.numpy(), offsets, order, w, s), (t * TOP_K, n))
        ref = torch.stack(rows).numpy()
    else:
        y = run(func, (x.numpy(), offsets, order, rw, w, s), (t, n))
        ref = np.zeros((t, n))
        for r, row in enumerate(rows):
            f = order[r]
            ref[f // TOP_K] += rw[f // TOP_K, f % TOP_K] * row.numpy()
    assert np.isfinite(y).all()
    assert_matches(y, ref)


# smmla's arithmetic in vector TIR on this host's 4-lane dot (VNNI or AVX2; int4_mmla.EMULATED): the i8mm tile's
# data arrangement (operand zips, zero points, scales, the accumulator contract) checked without an arm64 CPU
EMULATED_MMLA = int4_dot.DotISA("host128-mmla-emulated", {4: (HOST_ISA or int4_dot.X86_VNNI).intrinsics[4]},
                                mmla=int4_mmla.EMULATED)


def mmla_weight(*shape, seed=0):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    codes, scales = quantize_int4(w)
    packed, s = int4_dot.dot_layout(EMULATED_MMLA, pack_int4(codes), scales)
    return codes, scales, packed.numpy(), s.numpy()


@needs_vnni
@pytest.mark.parametrize("m", [1, 4, 6, 17])
def test_mmla_tile_matches_reference(m):
    n, k = 64, 256
    codes, scales, w, s = mmla_weight(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = run(int4_dot_gemm.int4_matmul_dot_tiled(n, k, EMULATED_MMLA), (x.numpy(), w, s), (m, n))
    assert_matches(y, int8_int4_matmul(x, codes, scales).numpy())


@needs_vnni
@pytest.mark.parametrize("op", ["gate_up", "down_combine"])
def test_mmla_grouped_tiles_match_reference(op):
    t, allowed = CASES[2]
    n, k = (128, 256) if op == "gate_up" else (256, 64)
    codes, scales, w, s = mmla_weight(E, n, k, seed=t)
    ids, rw, offsets, order = grouped_case(t, allowed, seed=t)
    x = torch.randn((t, k) if op == "gate_up" else (t * TOP_K, k), generator=torch.Generator().manual_seed(t))
    func = int4_dot_gemm.moe_grouped_dot(op, E, n, k, TOP_K, EMULATED_MMLA)
    rows = [int8_int4_matmul(x[order[r] // TOP_K if op == "gate_up" else r][None], codes[e], scales[e])[0]
            for e in range(E) for r in range(offsets[e], offsets[e + 1])]
    if op == "gate_up":
        y, ref = run(func, (x.numpy(), offsets, order, w, s), (t * TOP_K, n)), torch.stack(rows).numpy()
    else:
        y, ref = run(func, (x.numpy(), offsets, order, rw, w, s), (t, n)), np.zeros((t, n))
        for r, row in enumerate(rows):
            ref[order[r] // TOP_K] += rw[order[r] // TOP_K, order[r] % TOP_K] * row.numpy()
    assert_matches(y, ref)


def test_arm64_gemm_kernels_use_sdot():
    isa = int4_dot.dot_isa(ANDROID)
    mod = tvm.IRModule({
        "mm": int4_dot_gemm.int4_matmul_dot_tiled(64, 256, isa).with_attr("global_symbol", "mm"),
        "gu": int4_dot_gemm.moe_grouped_dot("gate_up", 4, 64, 256, 2, isa).with_attr("global_symbol", "gu"),
        "dn": int4_dot_gemm.moe_grouped_dot("down_combine", 4, 64, 128, 2, isa).with_attr("global_symbol", "dn")})
    asm = tvm.compile(mod, target=ANDROID).mod.inspect_source("asm")
    assert asm.count("sdot\tv") >= 3 * 8


def test_select_uses_the_tiled_and_grouped_dot_kernels():
    from tir_kernels import moe_grouped
    from tir_kernels.int4_matmul import int4_matmul
    from passes.select_dot_kernels import select_dot_kernels

    before = tvm.IRModule({"mm": int4_matmul(64, 256), "gu": moe_grouped.moe_grouped_gate_up(4, 64, 256, 2),
                           "down": moe_grouped.moe_grouped_down_combine(4, 256, 64, 2)})
    after = select_dot_kernels(before, ANDROID)
    for name in ("mm", "gu", "down"):
        assert str(after[name].attrs["mobilemoe.dot"]) == int4_dot.ARM_DOTPROD.name
        assert str(after[name].attrs["mobilemoe.kernel"]) == str(before[name].attrs["mobilemoe.kernel"])
        assert len(after[name].params) == len(before[name].params)
    assert dict(after["gu"].attrs[moe_grouped.ARGS_ATTR]) == dict(before["gu"].attrs[moe_grouped.ARGS_ATTR])
