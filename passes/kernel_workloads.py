"""How a kernel call becomes a MetaSchedule workload, shared by the tuning session (compiler/tuning/)
and the pass that applies its records (apply_tuning_database.py); helpers, not a pass.

A Relax entry calls each PrimFunc (kernel) through `R.call_tir`; the kernel's symbolic dims take
their values from the call's argument shapes (call_dims), bound to the entry's model dims
(model_dims: tokens, past) of a shape bucket (resolve). `workload(specialize(kernel, values))` is
the kernel as MetaSchedule keys it: compiler.tuning and the build derive it with this same code, so
the database finds the build's kernels by structural equality.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import types

import tvm
import tvm.s_tir
import tvm.sym
from tvm import relax, tirx
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod  # TVM's private helper: no public equivalent in 0.27

from tir_kernels.schedules import KERNEL_BLOCKS

KERNEL_ATTR = "mobilemoe.kernel"
# legalized kernels worth tuning: reductions (op_pattern 3 = comm-reduce, 4 = out-ewise-fusable:
# matmul, softmax) and ours; elementwise/injective copies (0-2) and opaque ops (8) are not
TUNED_OP_PATTERNS = (3, 4)


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
    return tirx.transform.RemoveNoOp()(_normalize_mod(prim))


def is_tunable(prim: tirx.PrimFunc) -> bool:
    """Our INT4 kernels with plain reduction blocks (the row-reduction ones; not the grouped expert
    kernels, whose loop bounds are data-dependent) and the legalized reductions/matmuls."""
    attrs = prim.attrs or {}
    if KERNEL_ATTR in attrs:
        return str(attrs[KERNEL_ATTR]) in KERNEL_BLOCKS
    return int(attrs.get("op_pattern", 8)) in TUNED_OP_PATTERNS


@contextlib.contextmanager
def without_tensor_intrinsics():
    """TuneContext imports tvm.s_tir.tensor_intrin: the int8 dot-product intrinsics of every target
    (80+ s on a 2-core host). Our fp32 kernels use none, and compiler.tuning passes the plain LLVM
    rules (which need none), so the import is answered with an empty package while tasks are made."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    stub = types.ModuleType(name)
    stub.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    sys.modules[name] = stub
    try:
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]


# TVM 0.27's OpenCL codegen can print a let-bound index ("long rmod_3 = ...;") inside the expression
# that uses it (seen: dl.gpu.Matmul on the dynamic-length attention einsum p.V, inside a vstore8's
# address): source that no OpenCL compiler accepts ("expected ')'" on POCL), though TVM builds it.
# (the statement keeps its indentation: "+ ((((      long rmod_23 = ..."; "for (int k = 0" has none)
STATEMENT_IN_EXPRESSION = re.compile(r"[(+*,-][ \t]{2,}(?:long|int|uint|ulong) [A-Za-z_]\w* = ")


def _device_sources(module) -> list[str]:
    todo, out = [module], []
    while todo:
        m = todo.pop()
        if m.kind in ("opencl", "vulkan", "cuda"):
            out.append(m.inspect_source())
        todo += list(m.imports)
    return out


def builds(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> str | None:
    """None when `func` (one scheduled kernel) compiles for `target` into well-formed device source,
    else the error's last line."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    try:
        built = tvm.compile(mod, target=target)
    except Exception as err:  # noqa: BLE001 - TVM raises TVMError / InternalError / ValueError
        lines = str(err).strip().splitlines()
        return lines[-1] if lines else type(err).__name__
    for source in _device_sources(getattr(built, "mod", built)):
        bad = STATEMENT_IN_EXPRESSION.search(source)
        if bad:
            return f"malformed device source (a declaration inside an expression: {bad.group(0).strip()!r})"
    return None
