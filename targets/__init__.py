"""Compilation targets. One module per target holds every device fact (TVM target JSON, cross
toolchain, schedule defaults); nothing outside targets/ matches on target names.

    from targets import get_target, TARGETS
    spec = get_target("android-arm64")
    spec.tvm_target()          # tvm.target.Target built from the JSON dict
    spec.export(executable, path)   # links the shared object with the target's toolchain
"""
from __future__ import annotations

from .base import TargetError, TargetSpec, Toolchain
from . import adreno, android_arm64, host, linux_arm64, mali

TARGETS: dict[str, TargetSpec] = {s.name: s for s in (android_arm64.SPEC, android_arm64.SPEC_I8MM, linux_arm64.SPEC,
                                                      host.SPEC, adreno.SPEC, mali.SPEC)}


def get_target(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise TargetError(f"unknown target '{name}'; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "TargetError", "TargetSpec", "Toolchain", "get_target"]
