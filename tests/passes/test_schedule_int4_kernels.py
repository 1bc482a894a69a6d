import pytest
import tvm
from tvm.script import tirx as T

from tir_kernels import int4_matmul, moe_gemv
from tir_kernels.schedules import lanes_for, schedule_row_reduction
from passes.schedule_int4_kernels import ScheduleInt4Kernels

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "skylake", "num-cores": 2})


@T.prim_func(private=True, s_tir=True)
def other(a: T.Buffer((4,), "float32")):
    a[0] = T.float32(1)


def test_before_expected():
    before = tvm.IRModule({"mm": int4_matmul(64, 128), "moe": moe_gemv(4, 64, 128, 2), "other": other})
    lanes = lanes_for(HOST)
    expected = tvm.IRModule({"mm": schedule_row_reduction(int4_matmul(64, 128), lanes=lanes),
                             "moe": schedule_row_reduction(moe_gemv(4, 64, 128, 2), lanes=lanes), "other": other})
    with HOST:
        after = ScheduleInt4Kernels()(before)
    tvm.ir.assert_structural_equal(after, expected)


def test_scheduled_kernels_are_left_alone():
    with HOST:
        once = ScheduleInt4Kernels()(tvm.IRModule({"mm": int4_matmul(64, 128)}))
        assert ScheduleInt4Kernels()(once)["mm"].same_as(once["mm"])


def test_gpu_target_is_refused():
    with tvm.target.Target({"kind": "opencl"}), pytest.raises(ValueError, match="CPU \\(llvm\\) targets only"):
        ScheduleInt4Kernels()(tvm.IRModule({"mm": int4_matmul(64, 128)}))
