"""Tuning tasks: the distinct kernels of a model, each at fixed shapes MetaSchedule can measure.

    mod = lowered_for_tuning(model, "host")           # graph phases + legalize, nothing scheduled
    tasks = extract_tasks(mod, SHAPES)                # [Task], one per distinct (kernel, shape)

A Relax entry calls each PrimFunc (kernel) through `R.call_tir`; the kernel's symbolic dims (our
INT4 kernels' token count, attention's context length) take their values from the call's
arguments. Two model-level dims drive them all:

    tokens   tokens.shape[1] of the entry   (decode: always 1, so decode kernels are static)
    past     kv.shape[4]: the cached context length

A call site whose dims are all known (decode's projections and expert GEMVs) gives a *static*
task: the kernel specialized to those shapes, tuned and applied as is. A call site with free dims
gives one task per shape bucket of SHAPES (prefill at 32/128/512 tokens, decode at a context
length): its record is replayed on the dynamic kernel at build time (passes/apply_tuning_database.py).

A task's workload is `specialize(kernel, dims)` normalised as MetaSchedule does (one function
named "main"); compiler.tune and the build derive it with the same code, so MetaSchedule's
database finds the build's kernels by structural equality.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import tvm
import tvm.sym
import tvm_ffi
from tvm import relax, s_tir, tirx

KERNEL_ATTR = "mobilemoe.kernel"
# the shape buckets a session tunes at: entry -> list of {model dim: value}
SHAPES = {
    "decode": [{"past": 128}],
    "prefill": [{"tokens": 32, "past": 0}, {"tokens": 128, "past": 0}, {"tokens": 512, "past": 0}],
}
# legalized kernels worth tuning: reductions (op_pattern 3 = comm-reduce, 4 = out-ewise-fusable:
# matmul, softmax) and ours; elementwise/injective copies (0-2) and opaque ops (8) are not
TUNED_OP_PATTERNS = (3, 4)


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


def model_dims(func: relax.Function) -> dict[str, tirx.PrimExpr]:
    """{"tokens": tokens.shape[1], "past": v_0.shape[2]} of an entry (inputs tokens, positions, k_0, v_0, ...)."""
    tokens, _, _, v0 = func.params[:4]
    return {"tokens": tokens.ty.shape.values[1], "past": v0.ty.shape.values[2]}


def is_buffer(param) -> bool:
    try:
        return param.shape is not None
    except AttributeError:
        return False


def _arg_shape(expr) -> list | None:
    ty = expr.ty
    shape = getattr(ty, "shape", None)
    return list(shape.values) if shape is not None and hasattr(shape, "values") else None


def is_call_tir(expr) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir"


def call_dims(prim: tirx.PrimFunc, call: relax.Call) -> dict:
    """{kernel tirx.Var: PrimExpr over the caller's dims} from an R.call_tir's argument/output shapes."""
    out_ty = call.ty_args[0]
    outs = [t.shape.values for t in out_ty.fields] if isinstance(out_ty, relax.TupleType) else [out_ty.shape.values]
    actual = [_arg_shape(a) if is_buffer(p) else a for p, a in zip(prim.params, call.args[1].fields)] + outs
    dims = {}
    for param, value in zip(prim.params, actual):
        if is_buffer(param):
            for d, v in zip(param.shape, value or []):
                if isinstance(d, tirx.Var):
                    dims.setdefault(d, v)
        else:  # a scalar (tir var) parameter: the expr itself or R.prim_value(expr)
            dims.setdefault(param, getattr(value, "value", value))
    return dims


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


def resolve(dims: dict, bucket: dict[str, int], entry_dims: dict) -> dict | None:
    """Kernel dims as ints after binding the model dims of `bucket`; None if one stays free."""
    bind = {entry_dims[k]: tirx.IntImm("int64", v) for k, v in bucket.items()
            if isinstance(entry_dims.get(k), tirx.Var)}
    out = {}
    ana = tvm.sym.Analyzer()
    for var, value in bind.items():
        ana.bind(var, value)
    for var, expr in dims.items():
        value = ana.simplify(expr)
        if not isinstance(value, tirx.IntImm):
            return None
        out[var] = int(value)
    return out


def specialize(prim: tirx.PrimFunc, values: dict) -> tirx.PrimFunc:
    """`prim` with its symbolic dims replaced by ints (a buffer per tensor param, scalars by value)."""
    param_map = {}
    for p in prim.params:
        if is_buffer(p):
            if any(isinstance(d, tirx.Var) and d in values for d in p.shape):
                shape = [tirx.IntImm("int64", values[d]) if isinstance(d, tirx.Var) and d in values else d
                         for d in p.shape]
                param_map[p] = tirx.decl_buffer(shape, p.dtype, p.name, strides=list(p.strides) or None,
                                                elem_offset=p.elem_offset, data_alignment=p.data_alignment,
                                                offset_factor=p.offset_factor)
        elif p in values:
            param_map[p] = tirx.IntImm(p.ty.dtype if hasattr(p.ty, "dtype") else "int64", values[p])
    return prim.specialize(param_map) if param_map else prim


def workload(prim: tirx.PrimFunc) -> tvm.IRModule:
    """MetaSchedule's form of a kernel: IRModule {"main": prim}, loops of extent 0 removed (a
    specialized int4_matmul has an empty tile or tail block, which schedules reject)."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod
    return tirx.transform.RemoveNoOp()(_normalize_mod(prim))


def is_tunable(prim: tirx.PrimFunc) -> bool:
    """Our INT4 kernels with plain reduction blocks (the row-reduction ones; not the grouped expert
    kernels, whose loop bounds are data-dependent) and the legalized reductions/matmuls."""
    from .kernels.schedules import KERNEL_BLOCKS

    attrs = prim.attrs or {}
    if KERNEL_ATTR in attrs:
        return str(attrs[KERNEL_ATTR]) in KERNEL_BLOCKS
    return int(attrs.get("op_pattern", 8)) in TUNED_OP_PATTERNS


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
    from targets import get_target

    from .importer import import_model
    from .pipeline import PipelineOptions, graph_phases, phases

    spec = get_target(target_name)
    target = spec.tvm_target()
    opts = PipelineOptions(quant=quant, lowering=spec.lowering)
    mod, _, _ = import_model(model, with_weights=False)
    with tvm.transform.PassContext(opt_level=3):
        mod = graph_phases(opts)(mod)
        with target:
            mod = tvm.transform.Sequential(dict(phases(target, opts))["legalize"])(mod)
    return mod, target
