import json

import tvm
from tvm import relax, tirx
from tvm.script import ir as I
from tvm.script import relax as R

from tir_kernels import int4_matmul
from passes.common import FLOAT_WEIGHTS, PARAM_TRANSFORMS
from passes.quantize_int4_weights import QuantizeInt4Weights
from passes.sparse_moe_dispatch import SparseMoEDispatch


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor(("n", 64), "float32"), p_wq_weight: R.Tensor((32, 64), "float32"),
             p_gate: R.Tensor((8, 64), "float32")):
        R.func_attr({"num_input": 1, FLOAT_WEIGHTS: '["p_gate"]'})
        with R.dataflow():
            y = R.matmul(x, R.permute_dims(p_wq_weight, axes=[1, 0]))
            r = R.matmul(x, R.permute_dims(p_gate, axes=[1, 0]))
            out = (y, r)
            R.output(out)
        return out


def expected():
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 64], "float32"))
    q = relax.Var("p_wq_weight__q4", relax.TensorType([32, 8], "uint32"))
    s = relax.Var("p_wq_weight__s", relax.TensorType([32, 2], "float16"))
    gate = relax.Var("p_gate", relax.TensorType([8, 64], "float32"))
    transforms = json.dumps([{"out": "p_wq_weight__q4", "op": "int4_codes", "inputs": ["p_wq_weight"]},
                             {"out": "p_wq_weight__s", "op": "int4_scales", "inputs": ["p_wq_weight"]}])
    bb = relax.BlockBuilder()
    attrs = {"num_input": 1, FLOAT_WEIGHTS: '["p_gate"]', PARAM_TRANSFORMS: transforms}
    with bb.function("main", [x, q, s, gate], attrs=attrs):
        with bb.dataflow():
            gv = bb.add_func(int4_matmul(32, 64), "int4_matmul")
            y = bb.emit(relax.call_tir(gv, [x, q, s], relax.TensorType([n, 32], "float32")))
            rt = bb.emit(relax.op.permute_dims(gate, axes=[1, 0]))
            r = bb.emit(relax.op.matmul(x, rt))
            out = bb.emit_output(relax.Tuple([y, r]))
        bb.emit_func_output(out)
    return bb.get()


def test_before_expected_float_weights_stay_float():
    """A parameter in FLOAT_WEIGHTS (SparseMoEDispatch lists the router there) is not quantized,
    whatever its name."""
    tvm.ir.assert_structural_equal(QuantizeInt4Weights()(Before), expected())


def test_routed_experts_are_not_this_passs():
    """The float expert kernels of a call PackMoEExpertsInt4 did not pack keep their float weights:
    the routed experts are packed on the mobilemoe.moe call, by role, not from the kernels."""
    from tests.passes.test_sparse_moe_dispatch import Before as MoEBefore

    out = QuantizeInt4Weights()(SparseMoEDispatch()(MoEBefore))
    kernels = {gv.name_hint for gv in out.get_global_vars()}
    assert "moe_grouped_gate_up" in kernels and not any(k.endswith("_int4") for k in kernels)
    assert [p.name for p in out["main"].params[1:]] == ["p_router_weight", "p_w13", "p_w2"]


def test_k_not_multiple_of_group_stays_float():
    @I.ir_module
    class Odd:
        @R.function
        def main(x: R.Tensor(("n", 48), "float32"), p_w: R.Tensor((32, 48), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                y = R.matmul(x, R.permute_dims(p_w, axes=[1, 0]))
                R.output(y)
            return y
    out = QuantizeInt4Weights()(Odd)
    assert "int4_matmul" not in out.script() and "__q4" not in out.script()
