"""The smmla GEMM tiles (tir_kernels/int4_mmla.py) on the emulated arm64 device with i8mm.

A target listing +i8mm gets int4_dot.ARM_I8MM: the prefill GEMMs (int4_matmul, the grouped MoE
gate_up / down_combine) take their 4-row tiles on smmla. Built for linux-arm64 + i8mm, linked by its
zig toolchain, run over RPC on a second emulated device whose qemu CPU is "max" (the default one
emulates a Neoverse N1, which has no i8mm: smmla would be an illegal instruction there), checked against
mobilemoe.quant.int8_int4_matmul (same int8 activations, exact int32 group sums) for token counts
around the tile (m = 1 and odd remainders run the sdot GEMV rows) and for uneven experts.
"""
import numpy as np
import pytest
import torch
import tvm
from tvm.target import Target

from tir_kernels import int4_dot, int4_dot_gemm
from mobilemoe.quant import int8_int4_matmul, pack_int4, quantize_int4
from targets import get_target
from targets.arm64_isa import count_instructions
from targets.rpc_device import EmulatedArm64Device, upload_and_load

I8MM = Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]})
ISA = int4_dot.dot_isa(I8MM)
E, TOP_K = 5, 2
MM = (64, 256)  # n, k of the dense GEMM
GU, DN = (64, 128), (128, 64)  # n, k of the grouped gate_up / down_combine


def weight(*shape, seed=0):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    codes, scales = quantize_int4(w)
    packed, s = int4_dot.dot_layout(ISA, pack_int4(codes), scales)
    return codes, scales, packed.numpy(), s.numpy()


@pytest.fixture(scope="module")
def i8mm_lib(tmp_path_factory):
    mod = tvm.IRModule({
        "mm": int4_dot_gemm.int4_matmul_dot_tiled(*MM, ISA).with_attr("global_symbol", "mm"),
        "gu": int4_dot_gemm.moe_grouped_dot("gate_up", E, *GU, TOP_K, ISA).with_attr("global_symbol", "gu"),
        "dn": int4_dot_gemm.moe_grouped_dot("down_combine", E, *DN, TOP_K, ISA).with_attr("global_symbol", "dn")})
    lib = tvm.compile(mod, target=I8MM)
    path = tmp_path_factory.mktemp("i8mm") / "i8mm.so"
    lib.export_library(str(path), fcompile=get_target("linux-arm64").toolchain.fcompile())
    return lib, path


def test_i8mm_target_selects_smmla_tiles(i8mm_lib):
    assert ISA is int4_dot.ARM_I8MM
    asm = i8mm_lib[0].mod.inspect_source("asm")
    # every 4-row tile of the three kernels is 8 smmla per token pair and word block; GEMV rows stay on sdot
    assert asm.count("smmla\tv") >= 3 * 8 and asm.count("sdot\tv") >= 3
    counts = count_instructions(i8mm_lib[1])  # the linked object, read by encoding: the same counts
    assert (counts["smmla"], counts["sdot"]) == (asm.count("smmla\tv"), asm.count("sdot\tv"))


@pytest.fixture(scope="module")
def i8mm_device(arm64_device):
    """An emulated arm64 device with i8mm (set up, or skipped, by the arm64_device fixture)."""
    with EmulatedArm64Device(key="arm64-qemu-i8mm", setup=False, cpu="max") as device:
        yield device


@pytest.mark.arm64
def test_smmla_kernels_match_reference_on_arm64_device(i8mm_device, i8mm_lib):
    sess = i8mm_device.request_session(timeout=60)
    dev = sess.cpu(0)
    lib = upload_and_load(sess, i8mm_lib[1])

    def call(name, args, out_shape):
        tv = [tvm.runtime.tensor(a, dev) for a in args] + [tvm.runtime.empty(out_shape, "float32", dev)]
        lib[name](*tv)
        return tv[-1].numpy()

    def close(y, ref):
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())

    codes, scales, w, s = weight(*MM, seed=1)
    for m in (1, 4, 5, 17):  # 1: the GEMV rows alone; 5, 17: smmla tiles + a remainder row
        x = torch.randn(m, MM[1], generator=torch.Generator().manual_seed(m))
        close(call("mm", (x.numpy(), w, s), (m, MM[0])), int8_int4_matmul(x, codes, scales).numpy())

    rng = np.random.default_rng(0)
    t = 11
    ids = np.stack([rng.choice([0, 2, 3], TOP_K, replace=False) for _ in range(t)])  # experts 1, 4 empty
    rw = rng.random((t, TOP_K)).astype("float32")
    order = np.argsort(ids.reshape(-1), kind="stable").astype("int32")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(ids.reshape(-1), minlength=E))]).astype("int32")
    spans = [(e, r) for e in range(E) for r in range(offsets[e], offsets[e + 1])]

    codes, scales, w, s = weight(E, *GU, seed=2)
    x = torch.randn(t, GU[1], generator=torch.Generator().manual_seed(2))
    ref = torch.stack([int8_int4_matmul(x[order[r] // TOP_K][None], codes[e], scales[e])[0] for e, r in spans])
    close(call("gu", (x.numpy(), offsets, order, w, s), (t * TOP_K, GU[0])), ref.numpy())

    codes, scales, w, s = weight(E, *DN, seed=3)
    a = torch.randn(t * TOP_K, DN[1], generator=torch.Generator().manual_seed(3))
    ref = np.zeros((t, DN[0]))
    for e, r in spans:
        f = order[r]
        ref[f // TOP_K] += rw[f // TOP_K, f % TOP_K] * int8_int4_matmul(a[r][None], codes[e], scales[e])[0].numpy()
    close(call("dn", (a.numpy(), offsets, order, rw, w, s), (t, DN[0])), ref)
