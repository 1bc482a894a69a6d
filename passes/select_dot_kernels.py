"""SelectDotKernels: the fp32-dequant INT4 kernels swapped for the int8-activation dot-product
kernels (tir_kernels/int4_dot.py) of the target's dot ISA (x86 AVX512-VNNI or AVX2, arm64 dotprod), which read
every INT4 weight in mobilemoe.quant's interleaved word order.

Before (schedule phase, after legalization):
    int4_matmul (tir_kernels/int4_matmul.py), moe_gemv*, embedding_int4, moe_grouped_*_int4: unscheduled
After:
    int4_dot_gemm.int4_matmul_dot_tiled, int4_dot.moe_gemv*_dot, embedding_int4 with interleaved
    addressing, int4_dot_gemm.moe_grouped_dot: the same parameters and outputs, attrs +
    {"mobilemoe.interleaved": True} (and global_symbol kept)

The dot kernels read the codes interleaved (int4_dot.interleave_for(isa, N, K)), so every kernel
that reads INT4 codes is swapped for an interleaved form: the GEMVs for their dot forms (int4_matmul
for int4_dot_gemm's M-tiled GEMM), the grouped prefill MoE GEMMs for int4_dot_gemm.moe_grouped_dot,
the tied embedding for the same kernel with interleaved addressing. A
kernel reading INT4 codes that has no interleaved form is an error (it would read the wrong words).
QuantizeInt4Weights and PackMoEExpertsInt4, given the same ISA, record the interleaving in each
weight's int4_codes parameter transform, so the packed params match (compiler/params.py replays it).

The swap keeps each call's signature: the same buffers in, the same outputs. It runs before the
tuning database and the default schedules (compiler/pipeline.py), so a kernel with a dot form is
never tuned or scheduled in its fp32 form there. The target's strategy (targets/strategy.py) adds
the pass only where the CPU has the instruction, and not with ``--quant int4-f32``.
"""
from __future__ import annotations

import tvm
from tvm import IRModule, tirx
from tvm.target import Target

from tir_kernels import int4_dot, int4_dot_gemm, moe_grouped
from tir_kernels.embedding import embedding_int4

from .kernel_workloads import KERNEL_ATTR

INTERLEAVED_ATTR = "mobilemoe.interleaved"
INT4_KERNELS = ("int4_matmul", "moe_gemv", "moe_gemv_per_slot", "moe_gemv_weighted_sum", "embedding_int4",
                "moe_grouped_gate_up_int4", "moe_grouped_down_combine_int4")


def dot_form(func: tirx.PrimFunc, isa: int4_dot.DotISA, target: Target | None = None) -> tirx.PrimFunc | None:
    """The interleaved-layout kernel equivalent to `func` (an unscheduled INT4 kernel described by its
    "mobilemoe.dims" / "mobilemoe.kernel_args" attrs), or None: the dot form of a GEMV, the
    interleaved-addressing form of the embedding and of the grouped prefill kernels."""
    attrs = func.attrs
    if attrs is None or KERNEL_ATTR not in attrs or attrs.get("tirx.is_scheduled", False) \
            or attrs.get(INTERLEAVED_ATTR, False):
        return None
    kernel = str(attrs[KERNEL_ATTR])
    if kernel in ("moe_grouped_gate_up_int4", "moe_grouped_down_combine_int4"):
        a = {key: int(v) for key, v in attrs[moe_grouped.ARGS_ATTR].items()}
        return int4_dot_gemm.moe_grouped_dot(moe_grouped.KERNELS[kernel], a["num_experts"], a["n"], a["k"],
                                             a["top_k"], isa)
    if "mobilemoe.dims" not in attrs:
        return None
    d = {key: (str(v) if key == "index_dtype" else int(v)) for key, v in attrs["mobilemoe.dims"].items()}
    if kernel == "embedding_int4":
        return embedding_int4(d["n"], d["k"], d["index_dtype"], int4_dot.interleave_for(isa, d["n"], d["k"]),
                              int4_dot.scales_interleave_for(isa, d["n"], d["k"]))
    if kernel == "int4_matmul":  # M-tiled for prefill; m = 1 runs the GEMV's blocks
        return int4_dot_gemm.int4_matmul_dot_tiled(d["n"], d["k"], isa)
    moe = (d["num_experts"], d["n"], d["k"], d["top_k"], isa)
    if kernel == "moe_gemv_weighted_sum":
        return int4_dot.moe_gemv_weighted_sum_dot(*moe, index_dtype=d["index_dtype"])
    if kernel in ("moe_gemv", "moe_gemv_per_slot"):
        return int4_dot.moe_gemv_dot(*moe, per_slot=kernel == "moe_gemv_per_slot", index_dtype=d["index_dtype"])
    return None


def select_dot_kernels(mod: IRModule, target: Target | None, isa: int4_dot.DotISA | None = None) -> IRModule:
    """Replace every INT4 kernel of `mod` that has a dot form by that of `isa` (default: the target's)."""
    isa = isa or int4_dot.dot_isa(target)
    if isa is None:
        return mod
    swapped = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None or KERNEL_ATTR not in func.attrs:
            continue
        kernel = str(func.attrs[KERNEL_ATTR])
        if kernel not in INT4_KERNELS or func.attrs.get(INTERLEAVED_ATTR, False):
            continue
        new = dot_form(func, isa, target)
        if new is None:
            raise ValueError(f"{gv.name_hint}: INT4 kernel {kernel!r} has no interleaved form; the dot-product "
                             "build stores INT4 codes interleaved (build with --quant int4-f32 instead)")
        new = new.with_attr(INTERLEAVED_ATTR, True)
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
    """isa: the dot ISA whose kernels to use (the target strategy's); None: the current target's."""

    def __init__(self, isa: int4_dot.DotISA | None = None):
        self.isa = isa

    def transform_module(self, mod, ctx):
        return select_dot_kernels(mod, Target.current(allow_none=True), self.isa)
