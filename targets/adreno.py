"""android-adreno: Qualcomm Adreno GPUs through OpenCL; the host side is the android-arm64 CPU.

Kernels are OpenCL C (TVM's "opencl" codegen, device "adreno"), scheduled by dlight's generic GPU
rules in this order, each guarded (targets/gpu_rules.py): TVM 0.27's `dl.adreno` rules are not
used (Pool2D raises on our scatter kernels), and with an Android host `dl.gpu.Matmul` picks a
schedule that fails on dynamic-length matmuls, which the guard skips (GEMV/Fallback take them).
The artifact's lib.so embeds the OpenCL source; the phone's TVM runtime (an NDK build with
USE_OPENCL) compiles it when the library loads. This machine has no OpenCL runtime.
"""
from . import android_arm64
from .base import TargetSpec
from .strategy import GpuStrategy

GPU_RULES = ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback")

SPEC = TargetSpec(
    name="android-adreno",
    description="Android Qualcomm Adreno GPU (OpenCL), host: Android AArch64 CPU",
    target_json={"kind": "opencl", "device": "adreno"},
    host_json=android_arm64.SPEC.target_json,
    toolchain=android_arm64.TOOLCHAIN,
    runs_on_host=False,
    rpc_key_hint="android",
    strategy=GpuStrategy(GPU_RULES),
)
