"""host: this machine's CPU (LLVM, the CPU model LLVM detects); artifacts run in-process."""
import os

from .base import TargetSpec


def _host_json() -> dict:
    from tvm.target import codegen  # deferred on purpose: importing targets must not need TVM
    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}


SPEC = TargetSpec(
    name="host",
    description="this machine's CPU (LLVM, detected CPU model)",
    target_json={},
    detect=_host_json,  # detected lazily: importing targets must not need TVM
    toolchain=None,
    runs_on_host=True,
    tuning_defaults={"trials_per_task": 64, "runner": "local"},
    iree_flags=("--iree-llvmcpu-target-cpu=host",),
)
