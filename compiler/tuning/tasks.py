"""Tuning tasks: the distinct kernels of a model, each at fixed shapes MetaSchedule can measure.

    mod = lowered_for_tuning(model, "host")           # graph phases + legalize, nothing scheduled
    tasks = extract_tasks(mod, SHAPES)                # [Task], one per distinct (kernel, shape)

A Relax entry calls each PrimFunc (kernel) through `R.call_tir`; the kernel's symbolic dims (our
INT4 kernels' token count, attention's context length) take their values from the call's
arguments (passes/kernel_workloads.py). Two model-level dims drive them all:

    tokens   tokens.shape[1] of the entry   (decode: always 1, so decode kernels are static)
    past     kv.shape[4]: the cached context length

A call site whose dims are all known (decode's projections and expert GEMVs) gives a *static*
task: the kernel specialized to those shapes, tuned and applied as is. A call site with free dims
gives one task per shape bucket of SHAPES (prefill at 32/128/512 tokens, decode at a context
length): its record is replayed on the dynamic kernel at build time (passes/apply_tuning_database.py).

A task's workload is `specialize(kernel, dims)` normalised as MetaSchedule does (one function
named "main"); compiler.tuning and the build derive it with the same code, so MetaSchedule's
database finds the build's kernels by structural equality.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod  # TVM's private helper: no public equivalent in 0.27

from passes.kernel_workloads import call_dims, is_buffer, is_call_tir, is_tunable, model_dims, resolve, specialize, \
    workload
from targets import get_target

from ..importer import import_model
from ..pipeline import default_schedule, graph_phases, options_for, phases
from .database import SHAPES


@dataclass
class CallSite:
    entry: str  # the Relax function calling it
    callee: tvm.ir.GlobalVar
    dims: dict  # kernel tirx.Var -> PrimExpr over the entry's symbolic dims


@dataclass
class Task:
    name: str  # "int4_matmul2[tokens=1]"
    kernel: str  # callee name in the lowered module
    entry: str
    bucket: dict  # model dims bound for this task ({} for static call sites)
    workload: tvm.IRModule  # normalised specialized PrimFunc
    static: bool  # the build applies it as is (no free dims at the call site)
    kernel_func: tirx.PrimFunc  # the kernel as the build has it (symbolic dims)
    weight: int = 1  # call sites sharing this workload
    flops: float = 0.0
    values: dict | None = None  # the kernel's dims (tirx.Var -> int) that specialize it to the workload

    @property
    def shape(self) -> str:
        f = self.workload["main"]
        return " ".join("x".join(str(d) for d in p.shape) for p in f.params if hasattr(p, "shape")
                        and getattr(p, "shape", None) is not None)


def call_sites(mod: tvm.IRModule) -> list[CallSite]:
    """Every R.call_tir of every Relax function, with the callee's symbolic dims bound."""
    out = []
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                if is_call_tir(binding.value):
                    callee = binding.value.args[0]
                    out.append(CallSite(gv.name_hint, callee, call_dims(mod[callee], binding.value)))
    return out


def is_static(wl: tvm.IRModule) -> bool:
    """Every buffer dim and loop extent of the workload is a constant: MetaSchedule measures static
    shapes only, and rejects data-dependent loops (the grouped expert kernels' rows per expert)."""
    if not all(isinstance(d, tirx.IntImm) for p in wl["main"].params if is_buffer(p) for d in p.shape):
        return False
    try:
        sch = s_tir.Schedule(wl)
        todo = [sch.get_sblock("root")]
        while todo:
            for block in sch.get_child_blocks(todo.pop()):
                if not all(isinstance(sch.get(loop).extent, tirx.IntImm) for loop in sch.get_loops(block)):
                    return False
                todo.append(block)
    except Exception:  # noqa: BLE001 - not a block-structured kernel: nothing MetaSchedule can take
        return False
    return True


def extract_tasks(mod: tvm.IRModule, shapes: dict = SHAPES, only: str | None = None) -> list[Task]:
    """The distinct tunable (kernel, shape) workloads of a legalized module, largest FLOPs first."""
    entry_dims = {gv.name_hint: model_dims(f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)}
    tasks: dict[int, Task] = {}
    for site in call_sites(mod):
        prim = mod[site.callee]
        if not is_tunable(prim):
            continue
        static = resolve(site.dims, {}, entry_dims[site.entry])
        buckets = [({}, static)] if static is not None else \
            [(b, resolve(site.dims, b, entry_dims[site.entry])) for b in shapes.get(site.entry, [])]
        for bucket, values in buckets:
            if values is None:
                continue
            wl = workload(specialize(prim, values))
            if not is_static(wl):  # a dim left as an unfolded expression: nothing to measure
                continue
            key = tvm_ffi.structural_hash(wl)
            if key in tasks:
                tasks[key].weight += 1
                continue
            label = ",".join(f"{k}={v}" for k, v in bucket.items()) or \
                ("tokens=1" if site.entry == "decode" else "static")
            name = f"{site.callee.name_hint}[{label}]"
            if only and not re.search(only, name):
                continue
            try:
                flops = float(s_tir.analysis.estimate_tir_flops(wl))
            except Exception:  # noqa: BLE001 - some ops have no estimate
                flops = 0.0
            tasks[key] = Task(name, site.callee.name_hint, site.entry, bucket, wl, static=bucket == {},
                              kernel_func=prim, flops=flops, values=values)
    return sorted(tasks.values(), key=lambda t: -t.flops * t.weight)


def lowered_for_tuning(model, target_name: str, quant: str = "int4") -> tuple[tvm.IRModule, object]:
    """The module the build's "schedule" phase starts from: graph phases + legalize, unscheduled."""
    spec = get_target(target_name)
    target = spec.tvm_target()
    opts = options_for(spec, target, quant)
    mod, _, _ = import_model(model, with_weights=False)
    with tvm.transform.PassContext(opt_level=3):
        mod = graph_phases(opts)(mod)
        with target:
            mod = tvm.transform.Sequential(dict(phases(target, opts))["legalize"])(mod)
    return mod, target


def untuned_module(task, target, spec):
    """What an untuned build runs for this task: the kernel as built (symbolic dims, when it has no
    scalar parameters) under the build's default schedules."""
    scalar = any(not is_buffer(p) for p in task.kernel_func.params)
    mod = task.workload if scalar else _normalize_mod(task.kernel_func)
    return default_scheduled(mod, target, spec)


def default_scheduled(mod, target, spec):
    """`mod` under the build's default (untuned) schedule passes."""
    with target:
        return tvm.transform.Sequential(default_schedule(options_for(spec, target)))(mod)
