import json

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx
from tvm.script import ir as I
from tvm.script import relax as R

from tir_kernels import int4_matmul, moe_grouped
from mobilemoe.quant import dequantize_int4, quantize_int4, sqnr
from passes.common import FLOAT_WEIGHTS, PARAM_TRANSFORMS
from passes.fuse_expert_gate_up import FuseExpertGateUp
from passes.quantize_int4_weights import QuantizeInt4Weights
from passes.sparse_moe_dispatch import SparseMoEDispatch
from tests.passes.conftest import run_entry


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


def test_before_expected_grouped_prefill_kernels():
    """SparseMoEDispatch's prefill form: the float grouped kernels become their INT4 versions; the
    router stays float."""
    from tests.passes.test_sparse_moe_dispatch import ATTRS, Before as MoEBefore, _routing

    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 64], "float32"))
    router = relax.Var("p_router_weight", relax.TensorType([8, 64], "float32"))
    q13 = relax.Var("p_w13__q4", relax.TensorType([8, 64, 8], "uint32"))
    s13 = relax.Var("p_w13__s", relax.TensorType([8, 64, 2], "float16"))
    q2 = relax.Var("p_w2__q4", relax.TensorType([8, 64, 4], "uint32"))
    s2 = relax.Var("p_w2__s", relax.TensorType([8, 64, 1], "float16"))
    transforms = json.dumps([{"out": f"{p}__{sfx}", "op": f"int4_{op}", "inputs": [p]}
                             for p in ("p_w13", "p_w2") for sfx, op in (("q4", "codes"), ("s", "scales"))])
    bb = relax.BlockBuilder()
    attrs = {"num_input": 1, FLOAT_WEIGHTS: '["p_router_weight"]', PARAM_TRANSFORMS: transforms}
    with bb.function("main", [x, router, q13, s13, q2, s2], attrs=attrs):
        with bb.dataflow():
            w, ids = _routing(bb, ATTRS, x, router)
            plan_gv = bb.add_func(moe_grouped.moe_route_plan(8, 2, "int64"), "moe_route_plan")
            plan = bb.emit(relax.call_tir(plan_gv, [ids], [relax.TensorType([9], "int32"),
                                                           relax.TensorType([n * 2], "int32")]))
            offsets, order = bb.emit(relax.TupleGetItem(plan, 0)), bb.emit(relax.TupleGetItem(plan, 1))
            gate_up = bb.add_func(moe_grouped.moe_grouped_gate_up(8, 64, 64, 2, "int4"), "moe_grouped_gate_up_int4")
            gu = bb.emit(relax.call_tir(gate_up, [x, offsets, order, q13, s13],
                                        relax.TensorType([n * 2, 64], "float32")))
            g = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[0], end=[32]))
            u = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[32], end=[64]))
            a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
            down = bb.add_func(moe_grouped.moe_grouped_down_combine(8, 64, 32, 2, "int4"),
                               "moe_grouped_down_combine_int4")
            out = bb.emit_output(relax.call_tir(down, [a, offsets, order, w, q2, s2],
                                                relax.TensorType([n, 64], "float32")))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(QuantizeInt4Weights()(SparseMoEDispatch()(MoEBefore)), bb.get())


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


def _int4_reference(model):
    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "router" not in name and p.dim() >= 2:
                p.copy_(dequantize_int4(*quantize_int4(p)))
    return ref


@pytest.mark.parametrize("entry,tokens,past", [("decode", [5], 4), ("prefill", [5, 6, 7, 8, 9], 0)])
def test_numeric_against_pytorch_int4(imported, entry, tokens, past):
    model, mod, values = imported
    q = QuantizeInt4Weights()(SparseMoEDispatch()(FuseExpertGateUp()(mod)))
    text = q[entry].script()
    if entry == "prefill":  # grouped by expert
        assert "moe_grouped_gate_up_int4" in text and "moe_grouped_down_combine_int4" in text
    else:
        assert "moe_gemv_int4" in text and "moe_gemv_weighted_sum_int4" in text
    assert "embedding_int4" in text
    assert "router_weight__q4" not in text  # router stays float
    logits, kv, feed = run_entry(q, values, entry, model, tokens, past)
    with torch.no_grad():
        ref_int4 = _int4_reference(model)(*feed)[0][:, -1].numpy()
        ref_float = model(*feed)[0][:, -1].numpy()
    np.testing.assert_allclose(logits, ref_int4, atol=2e-5, rtol=1e-5)  # same INT4 weights: exact up to fp32
    snr = sqnr(torch.from_numpy(ref_float), torch.from_numpy(logits))
    print(f"{entry}: logits SQNR INT4 vs float = {snr:.1f} dB")
    assert snr > 15.0
