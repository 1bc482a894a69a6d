import tvm
from tvm.script import tirx as T

from tir_kernels import int4_matmul
from tir_kernels.int4_matmul_gpu import int4_matmul_gpu
from passes.use_gpu_int4_matmul import UseGpuInt4Matmul


@T.prim_func(private=True, s_tir=True)
def other(a: T.Buffer((4,), "float32")):
    a[0] = T.float32(1)


def test_before_expected():
    cpu = int4_matmul(80, 96).with_attr("global_symbol", "f")
    before = tvm.IRModule({"f": cpu, "other": other})
    gpu = int4_matmul_gpu(80, 96)  # with the CPU kernel's attributes but its name and op pattern
    for key in ("tirx.noalias", "mobilemoe.dims", "global_symbol"):
        gpu = gpu.with_attr(key, cpu.attrs[key])
    expected = tvm.IRModule({"f": gpu, "other": other})
    tvm.ir.assert_structural_equal(UseGpuInt4Matmul()(before), expected)


def test_gpu_kernel_is_left_alone():
    mod = tvm.IRModule({"f": int4_matmul_gpu(80, 96)})
    assert UseGpuInt4Matmul()(mod)["f"].same_as(mod["f"])
