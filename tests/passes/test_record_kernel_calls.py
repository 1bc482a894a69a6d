import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from passes.record_kernel_calls import RecordKernelCalls, weight_part


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
               p_layers_0_moe_router_weight: R.Tensor((8, 8), "float32")):
        cls = Before
        with R.dataflow():
            q = R.call_tir(cls.mm, (x, p_layers_0_attn_wq_weight), out_ty=R.Tensor((1, 8), "float32"))
            k = R.call_tir(cls.mm, (q, p_layers_0_attn_wk_weight), out_ty=R.Tensor((1, 8), "float32"))
            a = R.call_tir(cls.act, (k,), out_ty=R.Tensor((1, 8), "float32"))  # no weight: attention's
            r = R.call_tir(cls.mm, (a, p_layers_0_moe_router_weight), out_ty=R.Tensor((1, 8), "float32"))
            R.output(r)
        return r


def test_before_expected():
    into = {}
    after = RecordKernelCalls(into)(Before)
    tvm.ir.assert_structural_equal(after, Before)  # analysis only
    assert into == {"decode": [["mm", "attention", 2], ["act", "attention", 1], ["mm", "router", 1]]}


def test_weight_parts():
    assert weight_part("p_layers_3_moe_w13__q4") == "routed experts"
    assert weight_part("p_layers_0_input_norm_weight") == "norm"
    assert weight_part("p_layers_0_moe_shared_w1_weight") == "shared expert"
    assert weight_part("x") is None
