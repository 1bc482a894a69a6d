import tvm
from tvm.target import Target

from tir_kernels import int4_dot, int4_dot_gemm, moe_gemv
from tir_kernels.int4_matmul import int4_matmul
from passes.select_dot_kernels import INTERLEAVED_ATTR, SelectDotKernels

ANDROID = Target({"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon", "+dotprod"]})


def _dot(func):
    return func.with_attr(INTERLEAVED_ATTR, True)


def test_before_expected():
    isa = int4_dot.ARM_DOTPROD
    before = tvm.IRModule({"mm": int4_matmul(64, 256).with_attr("global_symbol", "mm"),
                           "gu": moe_gemv(4, 64, 256, 2)})
    expected = tvm.IRModule({"mm": _dot(int4_dot_gemm.int4_matmul_dot_tiled(64, 256, isa)).with_attr("global_symbol", "mm"),
                             "gu": _dot(int4_dot.moe_gemv_dot(4, 64, 256, 2, isa, index_dtype="int32"))})
    tvm.ir.assert_structural_equal(SelectDotKernels(isa)(before), expected)


def test_the_current_targets_isa_by_default():
    before = tvm.IRModule({"mm": int4_matmul(64, 256)})
    with ANDROID:
        after = SelectDotKernels()(before)
    assert str(after["mm"].attrs["mobilemoe.dot"]) == int4_dot.ARM_DOTPROD.name


def test_no_dot_isa_leaves_the_module():
    mod = tvm.IRModule({"mm": int4_matmul(64, 256)})
    with Target({"kind": "llvm"}):  # baseline x86-64: no VNNI
        tvm.ir.assert_structural_equal(SelectDotKernels()(mod), mod)
