"""GuardedRule: a dlight GPU rule that is skipped for a kernel where its schedule does not build.

dlight rules pick a kernel by its pattern, not by whether their schedule will lower: seen in TVM
0.27 with an Android host, `dl.gpu.Matmul` picks an outer-reduction schedule for dynamic-length
matmuls that fails in codegen ("Cannot unroll non-constant loop"), and Adreno's Pool2D rule raises
on a scatter kernel. ApplyDefaultSchedule stops at the first rule that returns a schedule, so one
such rule breaks the whole build. Wrapped, the rule returns None for that kernel (the next rule of
the list schedules it) when applying it raises, when its schedule fails to compile alone, or when
the device source it compiles to is malformed (a TVM codegen bug, see
passes/kernel_workloads.STATEMENT_IN_EXPRESSION).

    dl.ApplyDefaultSchedule(GuardedRule(dl.gpu.Matmul()), ..., GuardedRule(dl.gpu.Fallback()))
"""
from __future__ import annotations

import logging

import tvm
from tvm.s_tir.dlight.base import ScheduleRule

from passes.kernel_workloads import builds

log = logging.getLogger(__name__)


class GuardedRule(ScheduleRule):
    """`rule`, minus the kernels where it raises or its schedule does not build."""

    def __init__(self, rule: ScheduleRule):
        self.rule = rule
        self.name = type(rule).__name__
        self.rejected: list[tuple[str, str]] = []  # (kernel, why), for --dump-ir / debugging

    def apply(self, func, target, tunable):
        kernel = str(func.attrs.get("global_symbol", "")) if func.attrs else ""
        try:
            space = self.rule.apply(func, target, tunable)
        except Exception as err:  # noqa: BLE001 - any failure of the rule means: not this rule
            self._reject(kernel, f"raised {type(err).__name__}: {str(err).strip().splitlines()[-1:]}")
            return None
        if space is None or tunable:
            return space
        schedules = [space] if isinstance(space, tvm.s_tir.Schedule) else list(space)
        why = builds(schedules[0].mod["main"].with_attr("tirx.is_scheduled", True), target)
        if why is not None:
            self._reject(kernel, f"schedule does not build: {why}")
            return None
        return space

    def _reject(self, kernel: str, why: str) -> None:
        self.rejected.append((kernel, why))
        log.info("dlight %s skipped for %s: %s", self.name, kernel or "a kernel", why)
