"""linux-arm64: AArch64 Linux boards (and the emulated device of targets/arm64_device.sh)."""
from .base import TargetSpec, Toolchain

TOOLCHAIN = Toolchain(
    cc="aarch64-linux-gnu-gcc",
    packages=("gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu"),
    flags=("-shared", "-fPIC"),
)

SPEC = TargetSpec(
    name="linux-arm64",
    description="AArch64 Linux CPU (NEON), aarch64-linux-gnu-gcc",
    target_json={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4},
    toolchain=TOOLCHAIN,
    runs_on_host=False,
    rpc_key_hint="arm64-qemu",
    tuning_defaults={"trials_per_task": 32, "runner": "rpc"},
)
