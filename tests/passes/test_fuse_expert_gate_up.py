import dataclasses
import json

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

from passes import moe_op
from passes.common import PARAM_TRANSFORMS
from passes.decompose_moe import DecomposeMoE
from passes.fuse_expert_gate_up import FuseExpertGateUp
from tests.passes.conftest import K, moe_module, moe_params, run_entry

SEPARATE = moe_op.MoEAttrs(top_k=K, scoring="topk_softmax", num_shared_experts=1)
FUSED = dataclasses.replace(SEPARATE, gate_up="fused")
TRANSFORMS = json.dumps([{"out": "p_w13", "op": "concat", "inputs": ["p_w1", "p_w3"], "axis": 1}])


def expected():
    x = relax.Var("x", relax.TensorType([tirx.Var("n", "int64"), 64], "float32"))
    params = moe_params(FUSED)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *params.values()], attrs={"num_input": 1, PARAM_TRANSFORMS: TRANSFORMS}):
        with bb.dataflow():
            y = bb.emit_output(moe_op.make(FUSED, {"x": x, **params}))
        bb.emit_func_output(y)
    return bb.get()


def test_before_expected():
    """The call's w1, w3 operands become one w13 parameter (gate_up="fused"); the rest is unchanged."""
    tvm.ir.assert_structural_equal(FuseExpertGateUp()(moe_module(SEPARATE)), expected())


def test_does_not_fire_when_a_weight_is_read_elsewhere():
    mod = moe_module(SEPARATE)
    func = mod["main"]
    w1 = func.params[2]
    bb = relax.BlockBuilder()
    with bb.function("main", list(func.params), attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(moe_op.make(SEPARATE, dict(zip(SEPARATE.roles(), func.params))))
            out = bb.emit_output(relax.Tuple([y, bb.emit(relax.op.sum(w1))]))
        bb.emit_func_output(out)
    other = bb.get()
    tvm.ir.assert_structural_equal(FuseExpertGateUp()(other), other)


def test_does_not_fire_on_inputs():
    """Gate and up weights that are user inputs (before "num_input"), not parameters, stay apart."""
    mod = moe_module(SEPARATE)
    func = mod["main"].with_attr("num_input", 4)
    tvm.ir.assert_structural_equal(FuseExpertGateUp()(tvm.IRModule({"main": func})), tvm.IRModule({"main": func}))


@pytest.mark.parametrize("entry,tokens,past", [("decode", [5], 4), ("prefill", [5, 6, 7, 8], 0)])
def test_numeric_against_pytorch(imported, entry, tokens, past):
    model, mod, values = imported
    fused = FuseExpertGateUp()(mod)
    text = fused[entry].script()
    assert "_w13" in text and "moe_w1:" not in text and text.count('"gate_up": "fused"') == model.config.num_layers
    logits, kv, feed = run_entry(DecomposeMoE()(fused), values, entry, model, tokens, past)
    with torch.no_grad():
        ref_logits, ref_kv = model(*feed)
    np.testing.assert_allclose(logits, ref_logits[:, -1].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(kv, ref_kv.numpy(), atol=1e-5)
