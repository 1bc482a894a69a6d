"""host: this machine's CPU (LLVM, the CPU model LLVM detects); artifacts run in-process.

On Linux (x86_64, aarch64) lib.so is linked by `zig cc` from the ziglang wheel, like the arm64 targets:
a fresh machine without a system C compiler builds host artifacts too (TVM's default links with `cc`).
glibc 2.17 symbol versions: the object loads on any glibc since. Elsewhere TVM's default compiler."""
import os
import platform
import sys

from .base import TargetSpec, Toolchain, glibc_toolchain

_ZIG_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def host_toolchain(system: str = sys.platform, machine: str = platform.machine()) -> Toolchain | None:
    """zig cc for this Linux machine's architecture, or None (TVM's default `cc`) where zig has no target here."""
    arch = _ZIG_ARCH.get(machine.lower())
    if not system.startswith("linux") or arch is None:
        return None
    return glibc_toolchain(arch)


def _host_json() -> dict:
    from tvm.target import codegen  # deferred on purpose: importing targets must not need TVM
    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}


SPEC = TargetSpec(
    name="host",
    description="this machine's CPU (LLVM, detected CPU model)",
    target_json={},
    detect=_host_json,  # detected lazily: importing targets must not need TVM
    toolchain=host_toolchain(),
    runs_on_host=True,
    tuning_defaults={"trials_per_task": 64, "runner": "local"},
    iree_flags=("--iree-llvmcpu-target-cpu=host",),
)
