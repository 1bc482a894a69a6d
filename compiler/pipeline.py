"""The registered compilation pipeline: phases in order, each a named tvm.transform.Sequential.

    moe        FuseExpertGateUp, PackMoEExpertsInt4, SparseMoEDispatch    (passes/; on each
               mobilemoe.moe call: the packing only with quant int4*, the routed experts; grouped
               prefill GEMMs where the target strategy has their schedules),
               FuseSiblingMatmuls (q|k|v and the shared expert's gate|up as one matmul each)
    quantize   QuantizeInt4Weights                        (passes/; only with quant int4*: the
               other linears and the embedding)
               (INT4 codes recorded interleaved when the strategy picked dot-product kernels)
    cleanup    StripAssertions, ClipTakeIndices (bounds-safe gathers), PretransposeWeights (float
               weights read transposed, the router),
               MakeDataflow (pure functions in dataflow blocks: what FuseOps and
               RewriteDataflowReshape act on), PruneUnusedParams, DeadCodeElimination
    legalize   TVM's library dispatch, the strategy's own passes (CPU: AppendLastAxis + SoftmaxRows
               + FastSigmoid, tir_kernels/append.py, softmax.py; SiLU's sigmoid as a polynomial),
               LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR
    schedule   the strategy's kernel selection (CPU with VNNI/AVX2/dotprod: SelectDotKernels, int8-activation
               dot-product INT4 kernels; quant="int4" only, not "int4-f32"), ApplyTuningDatabase (with
               a tuning database: MetaSchedule records of compiler.tuning), the strategy's default
               schedules (CPU: ScheduleInt4Kernels + dlight CPU rules; GPU: UseGpuInt4Matmul + the
               target's guarded dlight GPU rules), RecordKernelCalls (with a report)
    lower      TVM's dataflow lowering + finalisation of the strategy's backend (memory planning, VM
               shape lowering)

What varies by target comes from its strategy (targets/strategy.py, PipelineOptions.strategy);
`options_for(spec, target, quant)` makes the options of a target. `python -m compiler.build
--dump-ir DIR` runs it under TVM's DumpIR instrument (IR after every pass, numbered) and
PassTimingInstrument. The phases before `legalize` are the graph-level ones a parameter transform
list comes from (see passes/common.py). With PipelineOptions.report (a dict), the schedule phase
records what it did: "tuning" (ApplyTuningDatabase) and "kernel_calls" (passes/record_kernel_calls.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.relax.pipeline import PIPELINE_MAP, register_pipeline

from passes.apply_tuning_database import ApplyTuningDatabase
from passes.clip_take_indices import ClipTakeIndices
from passes.fuse_expert_gate_up import FuseExpertGateUp
from passes.fuse_sibling_matmuls import FuseSiblingMatmuls
from passes.make_dataflow import MakeDataflow
from passes.pack_moe_experts_int4 import PackMoEExpertsInt4
from passes.pretranspose_weights import PretransposeWeights
from passes.prune_unused_params import PruneUnusedParams
from passes.quantize_int4_weights import QuantizeInt4Weights
from passes.record_kernel_calls import RecordKernelCalls
from passes.sparse_moe_dispatch import SparseMoEDispatch
from passes.strip_assertions import StripAssertions
from targets.strategy import CpuStrategy, Strategy

# int4: INT4 weights, int8 activations in the dot-product kernels where the CPU has them (else fp32);
# int4-f32: INT4 weights, fp32 activations everywhere; none: float32 weights.
QUANT_MODES = ("int4", "int4-f32", "none")


@dataclass(frozen=True)
class PipelineOptions:
    quant: str = "int4"
    strategy: Strategy = field(default_factory=CpuStrategy)  # the target's (TargetSpec.strategy)
    dot_isa: object | None = None  # strategy.dot_isa(target, quant): the INT4 kernels' int8 dot ISA, if any
    tuning: Callable | None = None  # opens the tuning database's reader (compiler.tuning.database.TunedKernels)
    schedule: bool = True  # False: leave kernels unscheduled (reference timings)
    report: dict | None = field(default=None, compare=False)  # filled by the schedule phase


def options_for(spec, target: tvm.target.Target, quant: str = "int4", **kwargs) -> PipelineOptions:
    """The options of a target (a targets.TargetSpec and its tvm target): its strategy and dot ISA."""
    return PipelineOptions(quant=quant, strategy=spec.strategy, dot_isa=spec.strategy.dot_isa(target, quant),
                           **kwargs)


def default_schedule(opts: PipelineOptions) -> list:
    """The schedule passes of an untuned build (compiler.tuning times kernels with them)."""
    return opts.strategy.kernel_passes(opts.dot_isa) + opts.strategy.schedule_passes()


def phases(target: tvm.target.Target, opts: PipelineOptions) -> list[tuple[str, list]]:
    if opts.quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {opts.quant!r}")
    strategy = opts.strategy
    backend = strategy.relax_backend()
    schedule = []
    if opts.schedule:
        schedule += strategy.kernel_passes(opts.dot_isa)  # before the database: a kernel with a dot form is not tuned
        if opts.tuning is not None:
            report = opts.report.setdefault("tuning", {}) if opts.report is not None else None
            schedule.append(ApplyTuningDatabase(opts.tuning, report))
        schedule += strategy.schedule_passes()
    if opts.report is not None:
        schedule.append(RecordKernelCalls(opts.report.setdefault("kernel_calls", {})))
    # the generic GPU legalize list ends with its own dlight rules: ours come in `schedule`
    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    int4 = opts.quant.startswith("int4")
    return [
        ("moe", [FuseExpertGateUp(), *([PackMoEExpertsInt4(interleave=opts.dot_isa)] if int4 else []),
                 SparseMoEDispatch(group_prefill=strategy.group_prefill, fused_routing=strategy.fused_routing),
                 FuseSiblingMatmuls()]),
        ("quantize", [QuantizeInt4Weights(interleave=opts.dot_isa)] if int4 else []),
        ("cleanup", [StripAssertions(), ClipTakeIndices(), PretransposeWeights(), MakeDataflow(), PruneUnusedParams(),
                     relax.transform.DeadCodeElimination()]),
        ("legalize", backend.library_dispatch_passes(target) + strategy.legalize_passes(target) + legalize),
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
    def _registered(target=None, quant: str = "int4", tuning=None):
        """relax.get_pipeline("mobilemoe", target=..., quant=...): every phase, in order (tuning: a
        tuning database reader's opener, see PipelineOptions)."""
        target = target or tvm.target.Target.current()
        opts = PipelineOptions(quant=quant, tuning=tuning)
        return tvm.transform.Sequential([graph_phases(opts), build_pipeline(target, opts)], name="mobilemoe")
