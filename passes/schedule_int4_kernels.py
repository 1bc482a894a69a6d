"""ScheduleInt4Kernels: schedule our INT4 and grouped MoE kernels for the current CPU target.

Before (an unscheduled INT4 kernel, legalized and called from Relax):
    @T.prim_func  int4_matmul: attrs {"mobilemoe.kernel": "int4_matmul"}, one reduction block
After:
    the same kernel scheduled by tir_kernels.schedules (row blocks in parallel, K in vector lanes of the
    target's SIMD width), attrs + {"tirx.is_scheduled": True}

Kernels already scheduled, and PrimFuncs that are not ours, are left as they are; the embedding
(one spatial block) is left to the generic rules.
"""
from __future__ import annotations

import tvm

from tir_kernels.schedules import schedule_int4_kernels


@tvm.transform.module_pass(opt_level=0, name="ScheduleInt4Kernels")
class ScheduleInt4Kernels:
    def transform_module(self, mod, ctx):
        return schedule_int4_kernels(mod, tvm.target.Target.current(allow_none=True))
