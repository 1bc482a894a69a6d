"""Shared pieces of our Relax passes: binding lookup, parameter rewrites, parameter transforms.

Parameter transforms. Passes that change how weights are stored (fuse two weights, quantize one) do
not compute anything at compile time: they replace function parameters and record, as the function
attribute PARAM_TRANSFORMS (a JSON list), how each new parameter is made from the old ones:
    {"out": "p_..._w13", "op": "concat", "inputs": ["p_..._w1", "p_..._w3"], "axis": 1}
    {"out": "p_..._wq_weight__q4", "op": "int4_codes", "inputs": ["p_..._wq_weight"]}
    {"out": "p_..._wq_weight__s", "op": "int4_scales", "inputs": ["p_..._wq_weight"]}
compiler/params.py replays the list on the checkpoint's tensors (with mobilemoe.quant, the one INT4
implementation), so the packed weights are exactly those QAT simulated.

Float weights. A pass that lowers an op whose weight must stay float (SparseMoEDispatch: the MoE
router) lists that parameter in the function attribute FLOAT_WEIGHTS (a JSON list of names);
QuantizeInt4Weights leaves the listed parameters float. The role comes from the op, not the name.

Weight parts. The importer lists each imported parameter's part of the layer (MobileMoE.weight_parts:
the module holding it, the MoE op's operand role) in the function attribute WEIGHT_PARTS (JSON
{name: part}); `param_parts` extends it to every parameter a transform made, by its first input.
"""
from __future__ import annotations

import json

import tvm
from tvm import relax

PARAM_TRANSFORMS = "mobilemoe.param_transforms"
FLOAT_WEIGHTS = "mobilemoe.float_weights"
WEIGHT_PARTS = "mobilemoe.weight_parts"
NUM_INPUT = "num_input"


def is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def bindings(func: relax.Function) -> dict:
    """var -> bound value, over every binding of the function body."""
    out = {}
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                out[b.var] = b.value
    return out


def users(func: relax.Function) -> dict:
    """var -> list of vars whose bound value uses it directly."""
    out: dict = {}

    def collect(value, var):
        relax.analysis.post_order_visit(value, lambda e: out.setdefault(e, []).append(var)
                                        if isinstance(e, relax.Var) else None)
    for var, value in bindings(func).items():
        collect(value, var)
    return out


def weight_params(func: relax.Function) -> list:
    n = int(func.attrs[NUM_INPUT]) if func.attrs and NUM_INPUT in func.attrs else 0
    return list(func.params[n:])


def get_transforms(func: relax.Function) -> list[dict]:
    if func.attrs is None or PARAM_TRANSFORMS not in func.attrs:
        return []
    return json.loads(str(func.attrs[PARAM_TRANSFORMS]))


def float_weights(func: relax.Function) -> set[str]:
    """Names of the parameters listed as staying float (FLOAT_WEIGHTS)."""
    if func.attrs is None or FLOAT_WEIGHTS not in func.attrs:
        return set()
    return set(json.loads(str(func.attrs[FLOAT_WEIGHTS])))


def param_parts(func: relax.Function) -> dict[str, str]:
    """{parameter name: part} of the imported parameters (WEIGHT_PARTS) and of every one made from
    them since (PARAM_TRANSFORMS, in order: a fused or packed weight has its first input's part)."""
    parts = {} if func.attrs is None or WEIGHT_PARTS not in func.attrs else json.loads(str(func.attrs[WEIGHT_PARTS]))
    for t in get_transforms(func):
        if t["inputs"] and t["inputs"][0] in parts:
            parts[t["out"]] = parts[t["inputs"][0]]
    return parts


def add_float_weights(func: relax.Function, params: list) -> relax.Function:
    """`func` with `params` (its parameters) added to FLOAT_WEIGHTS; unchanged when there are none."""
    if not params:
        return func
    names = sorted(float_weights(func) | {p.name for p in params})
    return func.with_attr(FLOAT_WEIGHTS, json.dumps(names))


def rebuild(func: relax.Function, body_func: relax.Function, replace: dict, new_transforms: list[dict]):
    """New function with body from `body_func` and parameters rewritten: `replace` maps an old param
    to a list of new params (empty list: dropped). Records `new_transforms`."""
    params = []
    for p in func.params:
        params.extend(replace.get(p, [p]))
    out = relax.Function(params, body_func.body, body_func.ret_ty, body_func.is_pure, body_func.attrs)
    out = out.with_attr(PARAM_TRANSFORMS, json.dumps(get_transforms(func) + new_transforms))
    return out


def tensor_shape(expr) -> list[int] | None:
    """Static int shape of a Relax tensor expression, or None if any dim is symbolic."""
    ty = expr.ty if hasattr(expr, "ty") else None
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape.values]
    except (TypeError, ValueError):
        return None


def static_dim(expr, axis: int) -> int | None:
    """One static dimension of a Relax tensor expression (None when symbolic)."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None:
        return None
    try:
        return int(shape.values[axis])
    except (TypeError, ValueError):
        return None


def emit_like(bb: relax.BlockBuilder, expr, var: relax.Var):
    """Emit `expr` as the replacement of binding `var`: a dataflow output stays an output."""
    if isinstance(var, relax.DataflowVar) or not bb.current_block_is_dataflow():
        return bb.emit(expr, var.name)
    return bb.emit_output(expr, var.name)


def rewrite_relax_functions(rewriter, mod: tvm.IRModule) -> tvm.IRModule:
    """Run a relax.PyExprMutator (built on `mod`) over every Relax function; -> its builder's module."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()
