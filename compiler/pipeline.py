"""The registered compilation pipeline: phases in order, each a named tvm.transform.Sequential.

    moe        FuseExpertGateUp, SparseMoEDispatch        (passes/)
    quantize   QuantizeInt4Weights                        (passes/; only with quant="int4")
    cleanup    StripAssertions, ClipTakeIndices (bounds-safe gathers), PretransposeWeights (float
               weights read transposed, the router),
               MakeDataflow (pure functions in dataflow blocks: what FuseOps and
               RewriteDataflowReshape act on), PruneUnusedParams, DeadCodeElimination
    legalize   DispatchSampling, DispatchSortScan, AppendLastAxis + SoftmaxRows + FastSigmoid (CPU:
               the transposed key cache's append and the attention softmax as vector kernels,
               compiler/kernels/append.py, softmax.py; SiLU's sigmoid as a polynomial), LegalizeOps, AnnotateTIROpPattern, FoldConstant,
               FuseOps, FuseTIR
    schedule   CPU: SelectDotKernels (compiler/kernels/select_dot.py: int8-activation dot-product INT4
               kernels where the CPU has VNNI/dotprod; quant="int4" only, not "int4-f32"),
               ApplyTuningDatabase (with a tuning database: passes/, MetaSchedule records of
               compiler.tune), ScheduleInt4Kernels (compiler/kernels/schedules.py) for the INT4
               kernels left, dlight CPU rules for the remaining GEMV/reductions.
               GPU: UseGpuInt4Matmul (int4_matmul as one block, compiler/kernels/int4_matmul_gpu.py),
               then the target's dlight GPU rules, each guarded (GuardedRule: a rule whose schedule
               raises or fails to build is skipped for that kernel).
    lower      TVM's CPU or generic-GPU dataflow lowering + finalisation (memory planning, VM shape
               lowering)

The target spec picks the variant (TargetSpec.lowering, targets/). `python -m compiler.build
--dump-ir DIR` runs it under TVM's DumpIR instrument (IR after every pass, numbered) and
PassTimingInstrument. The phases before `legalize` are the graph-level ones a parameter transform
list comes from (see passes/common.py). With PipelineOptions.report (a dict), the schedule phase
records what it did: "tuning" (ApplyTuningDatabase) and "kernel_calls" (compiler/profile.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.relax.pipeline import PIPELINE_MAP, register_pipeline

from passes.fuse_expert_gate_up import FuseExpertGateUp
from passes.make_dataflow import MakeDataflow
from passes.pretranspose_weights import PretransposeWeights
from passes.prune_unused_params import PruneUnusedParams
from passes.quantize_int4_weights import QuantizeInt4Weights
from passes.sparse_moe_dispatch import SparseMoEDispatch
from passes.clip_take_indices import ClipTakeIndices
from passes.strip_assertions import StripAssertions

# int4: INT4 weights, int8 activations in the dot-product kernels where the CPU has them (else fp32);
# int4-f32: INT4 weights, fp32 activations everywhere; none: float32 weights.
QUANT_MODES = ("int4", "int4-f32", "none")
LOWERINGS = ("cpu", "gpu")


@dataclass(frozen=True)
class PipelineOptions:
    quant: str = "int4"
    tuning_db: str | None = None
    schedule: bool = True  # False: leave kernels unscheduled (reference timings)
    lowering: str = "cpu"  # "cpu" | "gpu": from the target spec (TargetSpec.lowering)
    gpu_rules: tuple[str, ...] = ()  # dlight GPU rule names, in order (TargetSpec.gpu_rules)
    target_name: str | None = None  # checked against the tuning database's target
    report: dict | None = field(default=None, compare=False)  # filled by the schedule phase


@tvm.transform.module_pass(opt_level=0, name="ScheduleInt4Kernels")
class ScheduleInt4Kernels:
    def transform_module(self, mod, ctx):
        from compiler.kernels import schedule_int4_kernels
        return schedule_int4_kernels(mod, tvm.target.Target.current(allow_none=True))


def _dlight_cpu():
    from tvm.s_tir import dlight as dl
    from .cpu_rules import BatchMatmul, Injective, SafeReduction
    return dl.ApplyDefaultSchedule(dl.cpu.GEMV(), SafeReduction(), Injective(), BatchMatmul())


def _dlight_gpu(rule_names: tuple[str, ...]):
    from tvm.s_tir import dlight as dl

    from .gpu_rules import GuardedRule
    return dl.ApplyDefaultSchedule(*(GuardedRule(getattr(dl.gpu, name)()) for name in rule_names))


def default_schedule(opts: PipelineOptions) -> list:
    """The schedule passes of an untuned build (compiler.tune times kernels with them)."""
    if opts.lowering == "gpu":
        from .kernels.int4_matmul_gpu import UseGpuInt4Matmul
        return [UseGpuInt4Matmul(), _dlight_gpu(opts.gpu_rules)]
    return _select_dot(opts) + [ScheduleInt4Kernels(), _dlight_cpu()]


def _select_dot(opts: PipelineOptions) -> list:
    from .kernels.select_dot import SelectDotKernels
    return [SelectDotKernels()] if opts.lowering == "cpu" and opts.quant == "int4" else []


def _cpu_kernels(target: tvm.target.Target, opts: PipelineOptions) -> list:
    """CPU only: the key cache's append and the row softmax as hand-scheduled vector kernels; SiLU's
    sigmoid without a libm call (vectorizable)."""
    from tvm.target import codegen

    from passes.append_last_axis import AppendLastAxis
    from passes.fast_sigmoid import FastSigmoid
    from passes.softmax_rows import SoftmaxRows
    if opts.lowering != "cpu":
        return []
    width = codegen.llvm_get_vector_width(target) if target.kind.name == "llvm" else -1
    return [AppendLastAxis(), SoftmaxRows(lanes=max(4, min(16, width // 32)) if width > 0 else 4), FastSigmoid()]


def phases(target: tvm.target.Target, opts: PipelineOptions) -> list[tuple[str, list]]:
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.gpu_generic import pipeline as gpu

    if opts.quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {opts.quant!r}")
    if opts.lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {opts.lowering!r}")
    backend = gpu if opts.lowering == "gpu" else cpu
    schedule = []
    if opts.schedule:
        schedule += _select_dot(opts)  # before the database: a kernel with a dot form is not tuned
        if opts.tuning_db:
            from passes.apply_tuning_database import ApplyTuningDatabase
            report = opts.report.setdefault("tuning", {}) if opts.report is not None else None
            schedule.append(ApplyTuningDatabase(opts.tuning_db, opts.target_name, report))
        schedule += default_schedule(opts)[len(_select_dot(opts)):]
    if opts.report is not None:
        from .profile import RecordKernelCalls
        schedule.append(RecordKernelCalls(opts.report.setdefault("kernel_calls", {})))
    # the generic GPU legalize list ends with its own dlight rules: ours come in `schedule`
    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    return [
        # grouped prefill kernels (compiler/kernels/moe_grouped.py) are CPU-only
        ("moe", [FuseExpertGateUp(), SparseMoEDispatch(group_prefill=opts.lowering == "cpu")]),
        ("quantize", [QuantizeInt4Weights()] if opts.quant.startswith("int4") else []),
        ("cleanup", [StripAssertions(), ClipTakeIndices(), PretransposeWeights(), MakeDataflow(), PruneUnusedParams(),
                     relax.transform.DeadCodeElimination()]),
        ("legalize", backend.library_dispatch_passes(target) + _cpu_kernels(target, opts) + legalize),
        ("schedule", schedule),
        ("lower", backend.dataflow_lower_passes(target) + backend.finalize_passes(target)),
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
