"""The registered compilation pipeline: phases in order, each a named tvm.transform.Sequential.

    moe        FuseExpertGateUp, SparseMoEDispatch        (passes/)
    quantize   QuantizeInt4Weights                        (passes/; only with quant="int4")
    cleanup    StripAssertions, PruneUnusedParams, DeadCodeElimination
    legalize   DispatchSortScan, LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR
    schedule   ScheduleInt4Kernels (compiler/kernels/schedules.py), MetaScheduleApplyDatabase
               (with a tuning database), dlight CPU rules for the remaining GEMV/reductions
    lower      TVM's CPU dataflow lowering + finalisation (memory planning, VM shape lowering)

`python -m compiler.build --dump-ir DIR` runs it under TVM's DumpIR instrument (IR after every
pass, numbered) and PassTimingInstrument. The phases before `legalize` are the graph-level ones a
parameter transform list comes from (see passes/common.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.pipeline import PIPELINE_MAP, register_pipeline

from passes.fuse_expert_gate_up import FuseExpertGateUp
from passes.prune_unused_params import PruneUnusedParams
from passes.quantize_int4_weights import QuantizeInt4Weights
from passes.sparse_moe_dispatch import SparseMoEDispatch
from passes.strip_assertions import StripAssertions

QUANT_MODES = ("int4", "none")


@dataclass(frozen=True)
class PipelineOptions:
    quant: str = "int4"
    tuning_db: str | None = None
    schedule: bool = True  # False: leave kernels unscheduled (reference timings)


@tvm.transform.module_pass(opt_level=0, name="ScheduleInt4Kernels")
class ScheduleInt4Kernels:
    def transform_module(self, mod, ctx):
        from compiler.kernels import schedule_int4_kernels
        return schedule_int4_kernels(mod, tvm.target.Target.current(allow_none=True))


def _dlight_cpu():
    from tvm.s_tir import dlight as dl
    return dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())


def phases(target: tvm.target.Target, opts: PipelineOptions) -> list[tuple[str, list]]:
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    if opts.quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {opts.quant!r}")
    schedule = []
    if opts.schedule:
        schedule.append(ScheduleInt4Kernels())
        if opts.tuning_db:
            schedule.append(relax.transform.MetaScheduleApplyDatabase(work_dir=opts.tuning_db))
        schedule.append(_dlight_cpu())
    return [
        ("moe", [FuseExpertGateUp(), SparseMoEDispatch()]),
        ("quantize", [QuantizeInt4Weights()] if opts.quant == "int4" else []),
        ("cleanup", [StripAssertions(), PruneUnusedParams(), relax.transform.DeadCodeElimination()]),
        ("legalize", cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)),
        ("schedule", schedule),
        ("lower", cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)),
    ]


def graph_phases(opts: PipelineOptions) -> tvm.transform.Pass:
    """The target-independent graph phases (moe, quantize, cleanup) as one pass."""
    seq = [tvm.transform.Sequential(p, name=n) for n, p in phases(tvm.target.Target({"kind": "llvm"}), opts)[:3]]
    return tvm.transform.Sequential(seq, name="mobilemoe_graph")


def build_pipeline(target: tvm.target.Target, opts: PipelineOptions) -> tvm.transform.Pass:
    """The lowering phases (legalize, schedule, lower) as the relax_pipeline for tvm.compile."""
    seq = [tvm.transform.Sequential(p, name=n) for n, p in phases(target, opts)[3:]]

    @tvm.transform.module_pass(opt_level=0, name="mobilemoe_lower")
    def _lower(mod, ctx):
        with target:
            return tvm.transform.Sequential(seq)(mod)
    return _lower


def phase_names(opts: PipelineOptions) -> list[dict]:
    """What the manifest records: each phase with its pass names."""
    target = tvm.target.Target({"kind": "llvm"})
    return [{"phase": n, "passes": [p.info.name for p in ps]} for n, ps in phases(target, opts)]


if "mobilemoe" not in PIPELINE_MAP:
    @register_pipeline("mobilemoe")
    def _registered(target=None, quant: str = "int4", tuning_db: str | None = None):
        """relax.get_pipeline("mobilemoe", target=..., quant=...): every phase, in order."""
        target = target or tvm.target.Target.current()
        opts = PipelineOptions(quant=quant, tuning_db=tuning_db)
        return tvm.transform.Sequential([graph_phases(opts), build_pipeline(target, opts)], name="mobilemoe")
