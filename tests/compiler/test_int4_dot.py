"""tir_kernels/int4_dot.py: the int8-activation x INT4-weight dot-product kernels.

Each kernel is checked against mobilemoe.quant.int8_int4_matmul (the same quantized activations,
exact integer group sums) to float32 rounding, and its SQNR against the fp32-activation result is
printed and bounded (activation quantization costs ~45 dB on gaussian data). The arm64 forms are
compiled and their assembly must use sdot, the x86 ones vpdpbusd (AVX512-VNNI) or vpmaddubsw (AVX2); the
x86 forms run here with this CPU's ISA (VNNI where it has it, else AVX2).
"""
import numpy as np
import pytest
import torch
import tvm
from tvm.target import Target, codegen

from tir_kernels import int4_dot, int4_dot_gemm, moe_gemv, moe_gemv_weighted_sum
from tir_kernels.int4_matmul import int4_matmul
from mobilemoe.quant import dequantize_int4, int8_int4_matmul, pack_int4, quantize_act_int8, quantize_int4, sqnr
from passes.select_dot_kernels import dot_form, select_dot_kernels

HOST = Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2})
HOST_ISA = int4_dot.dot_isa(HOST)
ANDROID = Target({"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon", "+dotprod"]})
needs_vnni = pytest.mark.skipif(HOST_ISA is None, reason="this CPU has no int8 dot path (AVX512-VNNI or AVX2)")


def weight(*shape, seed=0):
    """codes, scales, and the packed codes in the interleaved order the dot kernels read, fp16 scales."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    codes, scales = quantize_int4(w)
    w_il, s_il = int4_dot.dot_layout(HOST_ISA or int4_dot.X86_VNNI, pack_int4(codes), scales)
    return codes, scales, w_il.numpy(), s_il.numpy()


def run(func, args, out_shape, target=HOST):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    tv = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.empty(out_shape, "float32")]
    lib["main"](*tv)
    return tv[-1].numpy()


def test_activation_quantization_reference():
    x = torch.randn(3, 64)
    x[1, :32] = 0  # an all-zero group: scale 0, codes 0
    q, s = quantize_act_int8(x)
    assert q.dtype == torch.int8 and s.shape == (3, 2) and int(q.abs().max()) == 127
    assert s[1, 0] == 0 and not q[1, :32].any()
    back = q.float().unflatten(-1, (2, 32)) * s[..., None]
    assert sqnr(x, back.flatten(-2)) > 40
    with pytest.raises(ValueError, match="K % 32"):
        quantize_act_int8(torch.randn(2, 48))


@needs_vnni
@pytest.mark.parametrize("n,k,m", [(256, 1024, 1), (96, 64, 3), (200, 512, 5), (36, 128, 2)])
def test_int4_matmul_dot_matches_reference(n, k, m):
    codes, scales, w, s = weight(n, k)
    x = torch.randn(m, k)
    y = run(int4_dot.int4_matmul_dot(n, k, HOST_ISA), (x.numpy(), w, s), (m, n))
    ref = int8_int4_matmul(x, codes, scales).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    fp32 = (x.double() @ dequantize_int4(codes, scales).double().T).numpy()
    db = sqnr(torch.from_numpy(fp32), torch.from_numpy(y))
    print(f"int4_matmul_dot N={n} K={k} M={m}: SQNR vs fp32 activations {db:.1f} dB")
    assert db > 38


@needs_vnni
@pytest.mark.parametrize("kernel", ["moe_gemv", "moe_gemv_per_slot", "moe_gemv_weighted_sum"])
# n = 64: 8 row blocks (weighted_sum: one per task); 80: 10 blocks over WSUM_TASKS = 8 tasks of 2 (the last ones
# empty); 8: a single block
@pytest.mark.parametrize("n", [64, 80, 8])
def test_moe_dot_kernels_match_reference(kernel, n):
    e, k, top_k, t = 6, 256, 2, 3
    codes, scales, w, s = weight(e, n, k, seed=1)
    gen = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(t)]).int()
    rw = torch.rand(t, top_k, generator=gen)
    x = torch.randn((t, k) if kernel == "moe_gemv" else (t, top_k, k), generator=gen)
    per = torch.zeros(t, top_k, n, dtype=torch.float64)
    for ti in range(t):
        for j in range(top_k):
            xi = x[ti] if kernel == "moe_gemv" else x[ti, j]
            per[ti, j] = int8_int4_matmul(xi[None], codes[ids[ti, j]], scales[ids[ti, j]])[0]
    if kernel == "moe_gemv_weighted_sum":
        func = int4_dot.moe_gemv_weighted_sum_dot(e, n, k, top_k, HOST_ISA)
        y = run(func, (x.numpy(), ids.numpy(), rw.numpy(), w, s), (t, n))
        ref = (per * rw.double()[..., None]).sum(1).numpy()
    else:
        func = int4_dot.moe_gemv_dot(e, n, k, top_k, HOST_ISA, per_slot=kernel == "moe_gemv_per_slot")
        y = run(func, (x.numpy(), ids.numpy(), w, s), (t, top_k, n))
        ref = per.numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_android_kernels_use_sdot():
    isa = int4_dot.dot_isa(ANDROID)
    assert isa is int4_dot.ARM_DOTPROD
    mod = tvm.IRModule({"mm": int4_dot.int4_matmul_dot(64, 256, isa).with_attr("global_symbol", "mm"),
                        "moe": int4_dot.moe_gemv_dot(4, 64, 256, 2, isa).with_attr("global_symbol", "moe")})
    asm = tvm.compile(mod, target=ANDROID).mod.inspect_source("asm")
    assert "sdot\tv" in asm, "the arm64 kernels must use the dotprod instruction"


@pytest.mark.parametrize("mcpu,isa,instruction", [("znver4", "X86_VNNI", "vpdpbusd"),
                                                   ("znver3", "X86_AVX2", "vpmaddubsw"),
                                                   ("haswell", "X86_AVX2", "vpmaddubsw")])
def test_x86_kernels_use_the_cpus_dot_path(mcpu, isa, instruction):
    """Each x86 CPU gets its int8 path: VNNI's one-instruction dot, else AVX2's pair sums (compiled, not run)."""
    target = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
    assert int4_dot.dot_isa(target) is getattr(int4_dot, isa)
    isa = int4_dot.dot_isa(target)
    mod = tvm.IRModule({"mm": int4_dot.int4_matmul_dot(64, 256, isa).with_attr("global_symbol", "mm"),
                        "moe": int4_dot.moe_gemv_dot(4, 64, 256, 2, isa).with_attr("global_symbol", "moe")})
    asm = tvm.compile(mod, target=target).mod.inspect_source("asm")
    assert instruction in asm
    if isa is int4_dot.X86_AVX2:
        assert "vpmaddwd" in asm and "vpdpbusd" not in asm


@needs_vnni
def test_extreme_codes_and_activations_are_exact():
    """The largest sums the dot paths meet (stored nibbles 15 and 0, i.e. codes 7 and -8, against
    activations +-127): exact, so AVX2's saturating pmaddubsw (|2 * 15 * 127| = 3810 < 2^15) never clips,
    nor do the row-lane kernels' int16 group sums (rows 0-7 all code 7 against q = 127: 8 * 3810 = 30480)."""
    n, k = 64, 256
    codes = torch.where(torch.arange(n * k).reshape(n, k) % 3 == 0, -8, 7).to(torch.int8)
    codes[:8] = 7
    scales = torch.full((n, k // 32), 0.01)
    w, s = (v.numpy() for v in int4_dot.dot_layout(HOST_ISA, pack_int4(codes), scales.half()))
    x = torch.where(torch.arange(k) % 2 == 0, 1.0, -1.0)[None].repeat(9, 1)  # every q is +-127
    x[1] = 1.0
    x[4] = -1.0
    ref = int8_int4_matmul(x, codes, scales.half().float()).numpy()
    for func in (int4_dot.int4_matmul_dot(n, k, HOST_ISA), int4_dot_gemm.int4_matmul_dot_tiled(n, k, HOST_ISA)):
        y = run(func, (x.numpy(), w, s), (9, n))
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_no_dot_isa_keeps_fp32_kernels():
    assert int4_dot.dot_isa(Target({"kind": "llvm"})) is None  # baseline x86-64
    assert int4_dot.dot_isa(Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})) is None
    mod = tvm.IRModule({"mm": int4_matmul(64, 256)})
    assert select_dot_kernels(mod, Target({"kind": "llvm"})).same_as(mod)


def test_select_swaps_each_int4_kernel_for_its_dot_form():
    """Before: fp32-dequant kernels (with their dims attr). Expected: the dot kernels, same dims."""
    isa = int4_dot.ARM_DOTPROD
    before = tvm.IRModule({"mm": int4_matmul(64, 256), "gu": moe_gemv(4, 64, 256, 2),
                           "down": moe_gemv_weighted_sum(4, 256, 64, 2)})
    after = select_dot_kernels(before, ANDROID)
    for name in ("mm", "gu", "down"):
        func = after[name]
        assert str(func.attrs["mobilemoe.dot"]) == isa.name and func.attrs["tirx.is_scheduled"]
        assert str(func.attrs["mobilemoe.kernel"]) == str(before[name].attrs["mobilemoe.kernel"])
        assert len(func.params) == len(before[name].params)
    assert dot_form(after["mm"], isa) is None  # already a dot kernel: left alone


def test_every_int4_kernel_gets_the_interleaved_layout():
    """The embedding (tied LM head table) and the grouped prefill kernels read the same codes as the
    dot GEMVs: they are swapped too, and a kernel without an interleaved form is refused."""
    from tir_kernels import moe_grouped
    from tir_kernels.embedding import embedding_int4

    before = tvm.IRModule({"emb": embedding_int4(64, 256, "int32"),
                           "gu": moe_grouped.moe_grouped_gate_up(4, 64, 256, 2),
                           "down": moe_grouped.moe_grouped_down_combine(4, 256, 64, 2)})
    after = select_dot_kernels(before, ANDROID)
    for name in ("emb", "gu", "down"):
        assert after[name].attrs["mobilemoe.interleaved"]
    odd = int4_matmul(64, 256).with_attr("mobilemoe.dims", None).without_attr("mobilemoe.dims")
    with pytest.raises(ValueError, match="no interleaved form"):
        select_dot_kernels(tvm.IRModule({"odd": odd}), ANDROID)


@needs_vnni
def test_interleaved_embedding_and_grouped_kernels_match_row_major():
    from tir_kernels import moe_grouped
    from tir_kernels.embedding import embedding_int4

    codes, scales, w_il, s = weight(64, 256, seed=3)
    w_rm = pack_int4(codes).numpy()
    ids = np.array([5, 0, 63, 5], "int32")
    layout = int4_dot.interleave_for(HOST_ISA, 64, 256)
    rm = run(embedding_int4(64, 256, "int32"), (ids, w_rm, scales.numpy()), (4, 256))
    il = run(embedding_int4(64, 256, "int32", layout, int4_dot.scales_interleave_for(HOST_ISA, 64, 256)),
             (ids, w_il, s), (4, 256))
    np.testing.assert_array_equal(il, rm)
    np.testing.assert_array_equal(rm, dequantize_int4(codes, scales).numpy()[ids])

    e, n, k, top_k, t = 4, 64, 256, 2, 3
    codes, scales, w_il, s = weight(e, n, k, seed=4)
    w_rm = pack_int4(codes).numpy()
    x = np.random.default_rng(0).standard_normal((t, k)).astype("float32")
    ids = np.array([[0, 1], [3, 1], [2, 0]], "int64")
    offsets = np.zeros(e + 1, "int32")
    order = np.argsort(ids.reshape(-1), kind="stable").astype("int32")
    offsets[1:] = np.cumsum(np.bincount(ids.reshape(-1), minlength=e))
    args = lambda w: (x, offsets, order, w, scales.numpy())  # the fp32 kernels read row-major scales
    lanes = 8
    rm = run(moe_grouped.moe_grouped_gate_up(e, n, k, top_k, lanes=lanes), args(w_rm), (t * top_k, n))
    il = run(moe_grouped.moe_grouped_gate_up(e, n, k, top_k, lanes=lanes, interleave=int4_dot.interleave_for(
        HOST_ISA, n, k)), args(w_il), (t * top_k, n))
    np.testing.assert_array_equal(il, rm)
