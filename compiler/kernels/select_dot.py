"""Swap the fp32-dequant INT4 kernels for the int8-activation dot-product kernels (int4_dot.py) on
CPUs that have a dot instruction (x86 AVX512-VNNI, arm64 dotprod).

The swap keeps each call's signature: the same buffers in, the same outputs. It runs before the
tuning database and the default schedules (pipeline.py), so a kernel with a dot form is never tuned
or scheduled in its fp32 form there. A target without the instruction keeps the fp32 kernels; so
does a build with ``--quant int4-f32``.
"""
from __future__ import annotations

import tvm
from tvm import IRModule, tirx
from tvm.target import Target

from . import int4_dot

KERNEL_ATTR = "mobilemoe.kernel"


def dot_form(func: tirx.PrimFunc, isa: int4_dot.DotISA) -> tirx.PrimFunc | None:
    """The dot-product kernel equivalent to `func` (an unscheduled int4_matmul / moe_gemv* PrimFunc,
    described by its "mobilemoe.dims" attr), or None."""
    attrs = func.attrs
    if attrs is None or KERNEL_ATTR not in attrs or "mobilemoe.dims" not in attrs or \
            attrs.get("tirx.is_scheduled", False):
        return None
    kernel = str(attrs[KERNEL_ATTR])
    d = {key: (str(v) if key == "index_dtype" else int(v)) for key, v in attrs["mobilemoe.dims"].items()}
    if kernel == "int4_matmul":
        return int4_dot.int4_matmul_dot(d["n"], d["k"], isa)
    moe = (d["num_experts"], d["n"], d["k"], d["top_k"], isa)
    if kernel == "moe_gemv_weighted_sum":
        return int4_dot.moe_gemv_weighted_sum_dot(*moe, index_dtype=d["index_dtype"])
    if kernel in ("moe_gemv", "moe_gemv_per_slot"):
        return int4_dot.moe_gemv_dot(*moe, per_slot=kernel == "moe_gemv_per_slot", index_dtype=d["index_dtype"])
    return None


def select_dot_kernels(mod: IRModule, target: Target | None) -> IRModule:
    """Replace every INT4 kernel of `mod` that has a dot form, if the target has a dot ISA."""
    isa = int4_dot.dot_isa(target)
    if isa is None:
        return mod
    swapped = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            new = dot_form(func, isa)
            if new is not None:
                swapped[gv] = new.with_attr("global_symbol", func.attrs["global_symbol"]) \
                    if "global_symbol" in func.attrs else new
    if not swapped:
        return mod
    mod = IRModule(dict(mod.functions), mod.attrs)
    for gv, func in swapped.items():
        mod[gv] = func
    return mod


@tvm.transform.module_pass(opt_level=0, name="SelectDotKernels")
class SelectDotKernels:
    def transform_module(self, mod, ctx):
        return select_dot_kernels(mod, Target.current(allow_none=True))
