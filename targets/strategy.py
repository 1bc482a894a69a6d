"""How a target lowers: what a target description supplies to the pipeline (compiler/pipeline.py)
besides its TVM target and toolchain. Each target module picks a strategy (targets/host.py:
`strategy=CpuStrategy()`); nothing outside targets/ asks which kind of target it has.

    CpuStrategy   LLVM CPUs: our vector kernels for the cache append, the row softmax and SiLU's
                  sigmoid; INT4 dot-product kernels where the ISA has them (AVX512-VNNI, AVX2, arm64
                  dotprod; int8 activations); our INT4 schedules + dlight CPU rules (cpu_rules.py);
                  the in-place KV cache and the grouped prefill MoE kernels (CPU schedules only);
                  MetaSchedule-tunable.
    GpuStrategy   OpenCL GPUs: the INT4 matmul as one block, then dlight's GPU rules in the target's
                  order, each guarded (gpu_rules.py); the growing KV cache.

The passes, rules and TVM's backend pipelines import TVM; they are imported inside the methods on
purpose: importing `targets` (every CLI, the tracker probe of targets/arm64_device.sh) must stay
free of TVM.
"""
from __future__ import annotations


class Strategy:
    name: str  # recorded in the manifest: "cpu" | "gpu"
    kv_cache_default = "grow"  # decode's KV cache when the build does not say (mobilemoe/kv_cache.py)
    inplace_kv = False  # the in-place cache kernels (tir_kernels/kv_cache.py) have schedules here
    group_prefill = False  # prefill's routed experts as grouped GEMMs (tir_kernels/moe_grouped.py)
    fused_routing = False  # MoE routing as one hand-scheduled kernel (tir_kernels/moe_route.py)
    tunable = False  # compiler.tuning can search its kernels (MetaSchedule's LLVM rules)

    def dot_isa(self, target, quant: str):
        """The int8 dot-product ISA the INT4 kernels use (tir_kernels.int4_dot.DotISA), or None: fp32."""
        return None

    def relax_backend(self):
        """TVM's backend pipeline module (library_dispatch_passes, dataflow_lower_passes, finalize_passes)."""
        raise NotImplementedError

    def legalize_passes(self, target) -> list:
        """Ours, before TVM's legalization."""
        return []

    def kernel_passes(self, isa) -> list:
        """Kernel selection, before the tuning database (a kernel swapped here is not tuned in its old form)."""
        return []

    def schedule_passes(self) -> list:
        """The default schedules, after the tuning database."""
        raise NotImplementedError


class CpuStrategy(Strategy):
    name = "cpu"
    kv_cache_default = "inplace"
    inplace_kv = True
    group_prefill = True
    fused_routing = True
    tunable = True

    def dot_isa(self, target, quant: str):
        from tir_kernels.int4_dot import dot_isa  # deferred: see the module docstring
        return dot_isa(target) if quant == "int4" else None

    def relax_backend(self):
        from tvm.relax.backend.cpu_generic import pipeline  # deferred: see the module docstring
        return pipeline

    def legalize_passes(self, target) -> list:
        """The key cache's append and the row softmax as hand-scheduled vector kernels; SiLU's sigmoid
        without a libm call (vectorizable)."""
        from tvm.target import codegen  # deferred: see the module docstring

        from passes.append_last_axis import AppendLastAxis  # deferred: the passes import TVM
        from passes.fast_sigmoid import FastSigmoid  # deferred: the passes import TVM
        from passes.softmax_rows import SoftmaxRows  # deferred: the passes import TVM
        width = codegen.llvm_get_vector_width(target) if target.kind.name == "llvm" else -1
        return [AppendLastAxis(), SoftmaxRows(lanes=max(4, min(16, width // 32)) if width > 0 else 4), FastSigmoid()]

    def kernel_passes(self, isa) -> list:
        from passes.select_dot_kernels import SelectDotKernels  # deferred: see the module docstring
        return [SelectDotKernels(isa)] if isa is not None else []

    def schedule_passes(self) -> list:
        from tvm.s_tir import dlight as dl  # deferred: see the module docstring

        from passes.schedule_int4_kernels import ScheduleInt4Kernels  # deferred: imports TVM

        from .cpu_rules import BatchMatmul, Injective, SafeReduction  # deferred: imports TVM
        return [ScheduleInt4Kernels(),
                dl.ApplyDefaultSchedule(dl.cpu.GEMV(), SafeReduction(), Injective(), BatchMatmul())]


class GpuStrategy(Strategy):
    name = "gpu"

    def __init__(self, rules: tuple[str, ...]):
        self.rules = rules  # dlight GPU rule names (tvm.s_tir.dlight.gpu), in order

    def relax_backend(self):
        from tvm.relax.backend.gpu_generic import pipeline  # deferred: see the module docstring
        return pipeline

    def schedule_passes(self) -> list:
        from tvm.s_tir import dlight as dl  # deferred: see the module docstring

        from passes.use_gpu_int4_matmul import UseGpuInt4Matmul  # deferred: imports TVM

        from .gpu_rules import GuardedRule  # deferred: imports TVM
        return [UseGpuInt4Matmul(), dl.ApplyDefaultSchedule(*(GuardedRule(getattr(dl.gpu, n)()) for n in self.rules))]
