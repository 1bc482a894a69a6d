"""linux-arm64: AArch64 Linux boards (and the emulated device of targets/arm64_device.sh).

ARMv8.2-A with the dot-product extension (Cortex-A55/A75 and newer, Neoverse N1, Graviton 2+,
Raspberry Pi 5): the INT4 kernels use sdot (tir_kernels/int4_dot.py). Older cores (Cortex-A53,
A72: Raspberry Pi 3/4) lack it and would stop on an illegal instruction.
"""
from .base import TargetSpec, glibc_toolchain

TOOLCHAIN = glibc_toolchain("aarch64")

SPEC = TargetSpec(
    name="linux-arm64",
    description="AArch64 Linux CPU (NEON + dotprod, ARMv8.2-A+), zig cc (clang + lld)",
    target_json={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"], "num-cores": 4},
    toolchain=TOOLCHAIN,
    runs_on_host=False,
    rpc_key_hint="arm64-qemu",
    tuning_defaults={"trials_per_task": 32, "runner": "rpc"},
)
