import json

import numpy as np
import pytest
import torch
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from passes.common import PARAM_TRANSFORMS
from passes.fuse_expert_gate_up import FuseExpertGateUp
from tests.passes.conftest import run_entry

TRANSFORMS = json.dumps([{"out": "p_moe_w13", "op": "concat", "inputs": ["p_moe_w1", "p_moe_w3"], "axis": 1}])


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor(("n", 64), "float32"), p_moe_w1: R.Tensor((8, 32, 64), "float32"),
             p_moe_w3: R.Tensor((8, 32, 64), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            g = R.einsum((x, p_moe_w1), subscripts="nh,eih->nei")
            u = R.einsum((x, p_moe_w3), subscripts="nh,eih->nei")
            s = R.sigmoid(g)
            a = R.multiply(R.multiply(g, s), u)
            R.output(a)
        return a


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor(("n", 64), "float32"), p_moe_w13: R.Tensor((8, 64, 64), "float32")):
        R.func_attr({"num_input": 1, PARAM_TRANSFORMS: TRANSFORMS})
        with R.dataflow():
            gu = R.einsum((x, p_moe_w13), subscripts="nh,eih->nei")
            g = R.strided_slice(gu, axes=[2], begin=[0], end=[32])
            u = R.strided_slice(gu, axes=[2], begin=[32], end=[64])
            s = R.sigmoid(g)
            a = R.multiply(R.multiply(g, s), u)
            R.output(a)
        return a


def test_before_expected():
    tvm.ir.assert_structural_equal(FuseExpertGateUp()(Before), Expected)


@I.ir_module
class NoGate:  # neither projection feeds a sigmoid: not a SwiGLU expert, leave it alone
    @R.function
    def main(x: R.Tensor(("n", 64), "float32"), p_a: R.Tensor((8, 32, 64), "float32"),
             p_b: R.Tensor((8, 32, 64), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            g = R.einsum((x, p_a), subscripts="nh,eih->nei")
            u = R.einsum((x, p_b), subscripts="nh,eih->nei")
            a = R.multiply(g, u)
            R.output(a)
        return a


def test_does_not_fire_without_swiglu():
    tvm.ir.assert_structural_equal(FuseExpertGateUp()(NoGate), NoGate)


@pytest.mark.parametrize("entry,tokens,past", [("decode", [5], 4), ("prefill", [5, 6, 7, 8], 0)])
def test_numeric_against_pytorch(imported, entry, tokens, past):
    model, mod, values = imported
    fused = FuseExpertGateUp()(mod)
    assert "_w13" in fused[entry].script() and "moe_w1:" not in fused[entry].script()
    logits, kv, feed = run_entry(fused, values, entry, model, tokens, past)
    with torch.no_grad():
        ref_logits, ref_kv = model(*feed)
    np.testing.assert_allclose(logits, ref_logits[:, -1].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(kv, ref_kv.numpy(), atol=1e-5)
