"""CPU schedule rules for the kernels TVM's dlight CPU rules leave alone or get wrong.

SafeReduction: dlight's CPU Reduction rule, minus the kernels where its schedule recomputes the
reduction for every output element.

dl.cpu.Reduction parallelises the last (injective) block's leading spatial loop and computes every
earlier block at it. That assumes all blocks share those leading spatial axes. A fused RMSNorm of
one decode token (mean over [1, 1, 1024] -> rsqrt -> multiply [1, 1, 1024]) breaks it: the unit
axes normalise away, the multiply's leading axis is the 1024 hidden units, and the mean lands under
it: 1024 full reductions per call (1.6 ms instead of ~1 us, measured). Such a kernel is left to the
next rule (unscheduled loops run each reduction once).

Injective: vectorized one-block copies, in parallel unless small (SERIAL_MAX_ELEMENTS); BatchMatmul: the legalized float matmuls (see the
classes).
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import codegen

from tir_kernels.launch import SERIAL_MAX_ELEMENTS


def _leading_spatial(info, count: int):
    """Product of the extents of a block's first `count` (spatial) iters, or None if symbolic."""
    extents = [it.dom for it in info.iters[:count]]
    try:
        return math.prod(int(e) for e in extents)
    except TypeError:
        return None


def shares_leading_axes(func) -> bool:
    """Whether every block of `func` has the same leading spatial extent as its last block."""
    infos = normalize_prim_func(s_tir.Schedule(func))
    if not infos:
        return False
    count = min(len(i.dom_kind()) - len(i.dom_kind().lstrip("S")) for i in infos)
    if count == 0:
        return False
    last = _leading_spatial(infos[-1], count)
    return all(_leading_spatial(i, count) == last for i in infos)


class SafeReduction(ScheduleRule):
    def __init__(self):
        self.rule = dl.cpu.Reduction()

    def apply(self, func, target, tunable):
        if not shares_leading_axes(func):
            return None
        return self.rule.apply(func, target, tunable)


class Injective(ScheduleRule):
    """Spatial kernels (the KV cache's concatenations, slices, reshape copies, broadcasts; fused
    elementwise chains are first inlined into their last block): outer loops fused and run in
    parallel, the innermost loop (static extent) vectorized. Unscheduled,
    they ran as one scalar loop nest with 64-bit index arithmetic per element: a 1 MB cache concat
    took ~1 ms, 1 GB/s (measured at context 1024)."""

    def apply(self, func, target, tunable):

        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(info.is_injective() for info in infos):
            return None
        if len(infos) > 1:  # a fused elementwise chain (slices + SiLU + multiply): one loop nest
            try:
                for info in infos[:-1]:
                    sch.compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001 - a block that cannot be inlined: leave the kernel alone
                return None
            infos = normalize_prim_func(sch)
            if not infos or len(infos) != 1:
                return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        if not loops:
            return None
        small = _small(sch, loops)
        inner = sch.get(loops[-1]).extent
        if not isinstance(inner, tirx.IntImm):
            return None
        bits = sch.get(block).writes[0].source.dtype.bits
        lanes = max(1, codegen.llvm_get_vector_width(target) // bits) if codegen.llvm_get_vector_width(target) > 0 else 4
        outer = loops[:-1]
        if int(inner) % lanes == 0 and int(inner) > lanes:
            out_inner, vec = sch.split(loops[-1], [None, lanes])
            outer = [*outer, out_inner]
            sch.vectorize(vec)
        elif int(inner) <= lanes:
            sch.vectorize(loops[-1])
        if outer and not small:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        return sch


def _small(sch, loops) -> bool:
    """Whether a block's loops run at most SERIAL_MAX_ELEMENTS iterations, all static: one decode token's
    norms, residual adds, RoPE, SiLU and reshape copies run in the calling thread (tir_kernels/launch.py)."""
    size = 1
    for loop in loops:
        extent = sch.get(loop).extent
        if not isinstance(extent, tirx.IntImm):
            return False
        size *= int(extent)
    return size <= SERIAL_MAX_ELEMENTS


def _streams_rows(block) -> bool:
    """Whether the last spatial iter of `block` (C[.., j] += A[.., k] * B[.., k, j]) indexes the
    innermost axis of the block's second operand: then [.., k, j] streams rows of B."""
    j = block.iter_vars[-2].var
    reads = [r for r in block.reads if not r.source.same_as(block.writes[0].source)]
    if len(reads) != 2:
        return False
    last = reads[1].region[-1].min
    return isinstance(last, tirx.Var) and last.same_as(j)


class BatchMatmul(ScheduleRule):
    """The float matmuls TVM legalizes R.matmul into (one block "matmul", C[.., i, j] += A[.., i, k] *
    B[.., k, j]): the router, and the attention einsums (block "T_einsum", possibly followed by the
    mask's expand_dims + add, left as they are): q.K^T against the transposed key cache
    ("bgrsd,bgdt->bgrst") and p.V ("bgrst,bgtd->bgrsd"). Loops become [(batch.., i) parallel, k, j],
    so each step streams one row of B into one row of C (a contiguous inner loop that LLVM's loop
    vectorizer takes; s_tir's vectorize refuses a spatial loop under the reduction loop); unscheduled
    they ran as a scalar dot product per output (prefill of 512 tokens spent ~25 s in attention on
    mobilemoe-s). An einsum whose j does not index its second operand's innermost axis is left alone."""

    def apply(self, func, target, tunable):

        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        try:
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
        except Exception:  # noqa: BLE001 - no root block (an extern kernel such as topk)
            return None
        if not blocks:
            return None
        block, name = blocks[0], sch.get(blocks[0]).name_hint
        if (name, len(blocks)) != ("matmul", 1) and name != "T_einsum":
            return None
        if name == "T_einsum" and not _streams_rows(sch.get(block)):
            return None
        kinds = [int(iv.iter_type) for iv in sch.get(block).iter_vars]
        loops = sch.get_loops(block)
        if len(loops) != len(kinds) or len(kinds) < 3 or kinds[-1] != 2 or any(k != 0 for k in kinds[:-1]):
            return None
        *outer, j, k = loops
        sch.reorder(*outer, k, j)
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        init = sch.decompose_reduction(block, k)
        width = codegen.llvm_get_vector_width(target)
        lanes = width // 32 if width > 0 else 4
        for blk in (init,):  # the update's j loop (under k) is left to LLVM's loop vectorizer
            inner = sch.get_loops(blk)[-1]
            extent = sch.get(inner).extent
            if isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0:
                sch.vectorize(sch.split(inner, [None, lanes])[1])
        return sch
