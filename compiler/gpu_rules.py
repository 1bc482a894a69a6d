"""GuardedRule: a dlight GPU rule that is skipped for a kernel where its schedule does not build.

dlight rules pick a kernel by its pattern, not by whether their schedule will lower: seen in TVM
0.27 with an Android host, `dl.gpu.Matmul` picks an outer-reduction schedule for dynamic-length
matmuls that fails in codegen ("Cannot unroll non-constant loop"), and Adreno's Pool2D rule raises
on a scatter kernel. ApplyDefaultSchedule stops at the first rule that returns a schedule, so one
such rule breaks the whole build. Wrapped, the rule returns None for that kernel (the next rule of
the list schedules it) when applying it raises, when its schedule fails to compile alone, or when
the device source it compiles to is malformed (a TVM codegen bug, see _STATEMENT_IN_EXPRESSION).

    dl.ApplyDefaultSchedule(GuardedRule(dl.gpu.Matmul()), ..., GuardedRule(dl.gpu.Fallback()))
"""
from __future__ import annotations

import logging
import re

import tvm
from tvm.s_tir.dlight.base import ScheduleRule

log = logging.getLogger(__name__)


# TVM 0.27's OpenCL codegen can print a let-bound index ("long rmod_3 = ...;") inside the expression
# that uses it (seen: dl.gpu.Matmul on the dynamic-length attention einsum p.V, inside a vstore8's
# address): source that no OpenCL compiler accepts ("expected ')'" on POCL), though TVM builds it.
# (the statement keeps its indentation: "+ ((((      long rmod_23 = ..."; "for (int k = 0" has none)
_STATEMENT_IN_EXPRESSION = re.compile(r"[(+*,-][ \t]{2,}(?:long|int|uint|ulong) [A-Za-z_]\w* = ")


def _device_sources(module) -> list[str]:
    todo, out = [module], []
    while todo:
        m = todo.pop()
        if m.kind in ("opencl", "vulkan", "cuda"):
            out.append(m.inspect_source())
        todo += list(m.imports)
    return out


def builds(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> str | None:
    """None when `func` (one scheduled kernel) compiles for `target` into well-formed device source,
    else the error's last line."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    try:
        built = tvm.compile(mod, target=target)
    except Exception as err:  # noqa: BLE001 - TVM raises TVMError / InternalError / ValueError
        lines = str(err).strip().splitlines()
        return lines[-1] if lines else type(err).__name__
    for source in _device_sources(getattr(built, "mod", built)):
        bad = _STATEMENT_IN_EXPRESSION.search(source)
        if bad:
            return f"malformed device source (a declaration inside an expression: {bad.group(0).strip()!r})"
    return None


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
