import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import json

from passes.common import PARAM_TRANSFORMS, WEIGHT_PARTS
from passes.record_kernel_calls import RecordKernelCalls


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def mm(x: T.Buffer((1, 8), "float32"), w: T.Buffer((8, 8), "float32"), y: T.Buffer((1, 8), "float32")):
        for i, j, k in T.grid(1, 8, 8):
            with T.sblock("mm"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    y[vi, vj] = T.float32(0)
                y[vi, vj] = y[vi, vj] + x[vi, vk] * w[vj, vk]

    @T.prim_func(private=True, s_tir=True)
    def act(x: T.Buffer((1, 8), "float32"), y: T.Buffer((1, 8), "float32")):
        for i, j in T.grid(1, 8):
            with T.sblock("act"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = T.max(x[vi, vj], T.float32(0))

    @R.function
    def decode(x: R.Tensor((1, 8), "float32"), p_layers_0_attn_wq_weight: R.Tensor((8, 8), "float32"),
               p_layers_0_attn_wk_weight: R.Tensor((8, 8), "float32"),
               p_layers_0_moe_gate_weight: R.Tensor((8, 8), "float32")):
        cls = Before
        with R.dataflow():
            q = R.call_tir(cls.mm, (x, p_layers_0_attn_wq_weight), out_ty=R.Tensor((1, 8), "float32"))
            k = R.call_tir(cls.mm, (q, p_layers_0_attn_wk_weight), out_ty=R.Tensor((1, 8), "float32"))
            a = R.call_tir(cls.act, (k,), out_ty=R.Tensor((1, 8), "float32"))  # no weight: attention's
            r = R.call_tir(cls.mm, (a, p_layers_0_moe_gate_weight), out_ty=R.Tensor((1, 8), "float32"))
            R.output(r)
        return r


def with_parts(mod, parts: dict, transforms: list | None = None):
    """`mod` with the importer's WEIGHT_PARTS (and parameter transforms) on `decode`."""
    f = mod["decode"].with_attr(WEIGHT_PARTS, json.dumps(parts))
    if transforms is not None:
        f = f.with_attr(PARAM_TRANSFORMS, json.dumps(transforms))
    return tvm.IRModule({gv: (f if gv.name_hint == "decode" else g) for gv, g in mod.functions_items()})


# the parts the importer records (MobileMoE.weight_parts): by module and MoE operand role, not by name
PARTS = {"p_layers_0_attn_wq_weight": "attention", "p_layers_0_attn_wk_weight": "attention",
         "p_layers_0_moe_gate_weight": "router"}


def test_before_expected():
    into = {}
    before = with_parts(Before, PARTS)
    after = RecordKernelCalls(into)(before)
    tvm.ir.assert_structural_equal(after, before)  # analysis only
    assert into == {"decode": [["mm", "attention", 2], ["act", "attention", 1], ["mm", "router", 1]]}


def test_parts_follow_parameter_transforms():
    """A parameter a pass made (here: the router's, renamed by a transform) has its source's part."""
    into = {}
    parts = {**PARTS, "p_model_router_src": "router"}
    parts.pop("p_layers_0_moe_gate_weight")
    transforms = [{"out": "p_layers_0_moe_gate_weight", "op": "int4_codes", "inputs": ["p_model_router_src"]}]
    RecordKernelCalls(into)(with_parts(Before, parts, transforms))
    assert into["decode"][-1] == ["mm", "router", 1]
    RecordKernelCalls(into)(Before)  # no parts recorded: every kernel "other"
    assert into["decode"] == [["mm", "other", 2], ["act", "other", 1], ["mm", "other", 1]]
