import dataclasses
import json

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

from mobilemoe.quant import dequantize_int4, quantize_int4, sqnr
from passes import moe_op
from passes.common import PARAM_TRANSFORMS
from passes.fuse_expert_gate_up import FuseExpertGateUp
from passes.pack_moe_experts_int4 import PackMoEExpertsInt4
from passes.quantize_int4_weights import QuantizeInt4Weights
from passes.sparse_moe_dispatch import SparseMoEDispatch
from tests.passes.conftest import E, H, I, K, moe_module, moe_params, run_entry
from tir_kernels.int4_dot import X86_AVX2, interleave_for, scales_interleave_for

FUSED = moe_op.MoEAttrs(top_k=K, scoring="softmax_topk", norm_topk_prob=True, num_shared_experts=1, gate_up="fused")
INT4 = dataclasses.replace(FUSED, experts="int4")


def packed(name: str, n: int, k: int) -> tuple[relax.Var, relax.Var]:
    return (relax.Var(f"{name}__q4", relax.TensorType([E, n, k // 8], "uint32")),
            relax.Var(f"{name}__s", relax.TensorType([E, n, k // 32], "float16")))


def transforms(isa=None) -> str:
    out = []
    for name, n, k in (("p_w13", 2 * I, H), ("p_w2", H, I)):
        codes = {"out": f"{name}__q4", "op": "int4_codes", "inputs": [name]}
        scales = {"out": f"{name}__s", "op": "int4_scales", "inputs": [name]}
        if isa is not None:
            codes["interleave"] = list(interleave_for(isa, n, k))
            if scales_interleave_for(isa, n, k) is not None:  # AVX2's row lanes: (rows, 1) scales
                scales["interleave"] = list(scales_interleave_for(isa, n, k))
        out += [codes, scales]
    return json.dumps(out)


def expected(isa=None, keep_w2: bool = False):
    """The call with experts="int4": (codes, scales) operands in place of W13 and W2, by role."""
    x = relax.Var("x", relax.TensorType([tirx.Var("n", "int64"), H], "float32"))
    p = moe_params(FUSED)
    (q13, s13), (q2, s2) = packed("p_w13", 2 * I, H), packed("p_w2", H, I)
    params = [p["router_weight"], q13, s13, *([p["w2"]] if keep_w2 else []), q2, s2,
              p["shared_w1"], p["shared_w3"], p["shared_w2"]]
    ops = {"x": x, "router_weight": p["router_weight"], "w13_codes": q13, "w13_scales": s13, "w2_codes": q2,
           "w2_scales": s2, **{r: p[r] for r in ("shared_w1", "shared_w3", "shared_w2")}}
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *params], attrs={"num_input": 1, PARAM_TRANSFORMS: transforms(isa)}):
        with bb.dataflow():
            y = moe_op.make(INT4, ops)
            y = bb.emit_output(relax.Tuple([bb.emit(y), bb.emit(relax.op.sum(p["w2"]))]) if keep_w2 else y)
        bb.emit_func_output(y)
    return bb.get()


def test_before_expected():
    """The routed experts' operands (w13, w2) become codes + scales parameters; the router and the
    shared expert are untouched (they are not routed roles)."""
    tvm.ir.assert_structural_equal(PackMoEExpertsInt4()(moe_module(FUSED)), expected())


def test_before_expected_interleaved_for_a_dot_isa():
    tvm.ir.assert_structural_equal(PackMoEExpertsInt4(interleave=X86_AVX2)(moe_module(FUSED)), expected(X86_AVX2))


def test_roles_follow_experts_attribute():
    assert INT4.roles() == ("x", "router_weight", "w13_codes", "w13_scales", "w2_codes", "w2_scales",
                            "shared_w1", "shared_w3", "shared_w2")
    separate = dataclasses.replace(INT4, gate_up="separate", num_shared_experts=0)
    assert separate.routed_operands() == ("w1_codes", "w1_scales", "w3_codes", "w3_scales", "w2_codes", "w2_scales")
    found = moe_op.match(expected()["main"].body.blocks[0].bindings[0].value)
    assert found is not None and found[0] == INT4 and found[1]["w2_scales"].name == "p_w2__s"


def test_weight_read_elsewhere_keeps_its_float_parameter():
    func = moe_module(FUSED)["main"]
    p = dict(zip(FUSED.roles()[1:], func.params[1:]))
    bb = relax.BlockBuilder()
    with bb.function("main", list(func.params), attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(moe_op.make(FUSED, {"x": func.params[0], **p}))
            out = bb.emit_output(relax.Tuple([y, bb.emit(relax.op.sum(p["w2"]))]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(PackMoEExpertsInt4()(bb.get()), expected(keep_w2=True))


def test_does_not_fire_on_inputs_or_packed_calls():
    """Expert weights that are user inputs (before "num_input"), not parameters, stay float; a call
    already packed is left alone."""
    func = moe_module(FUSED)["main"].with_attr("num_input", 4)
    mod = tvm.IRModule({"main": func})
    tvm.ir.assert_structural_equal(PackMoEExpertsInt4()(mod), mod)
    tvm.ir.assert_structural_equal(PackMoEExpertsInt4()(expected()), expected())


def test_k_not_multiple_of_group_stays_float():
    """The expert kernels take every routed weight INT4 or none: one K % 32 != 0 keeps the call float."""
    attrs = dataclasses.replace(FUSED, num_shared_experts=0)
    x = relax.Var("x", relax.TensorType([1, H], "float32"))
    ws = {"router_weight": [E, H], "w13": [E, 2 * 48, H], "w2": [E, H, 48]}
    params = {r: relax.Var(f"p_{r}", relax.TensorType(s, "float32")) for r, s in ws.items()}
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *params.values()], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(moe_op.make(attrs, {"x": x, **params}))
        bb.emit_func_output(y)
    mod = bb.get()
    tvm.ir.assert_structural_equal(PackMoEExpertsInt4()(mod), mod)


def _int4_reference(model):
    """The model with every weight but the router's (moe_op.FLOAT_ROLES) and the norms' through INT4."""
    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "router" not in name and p.dim() >= 2:
                p.copy_(dequantize_int4(*quantize_int4(p)))
    return ref


@pytest.mark.parametrize("entry,tokens,past", [("decode", [5], 4), ("prefill", [5, 6, 7, 8, 9], 0)])
def test_numeric_against_pytorch_int4(imported, entry, tokens, past):
    """The graph phases' INT4 order (FuseExpertGateUp, PackMoEExpertsInt4, SparseMoEDispatch,
    QuantizeInt4Weights) matches PyTorch running the same INT4 weights."""
    model, mod, values = imported
    seq = [FuseExpertGateUp(), PackMoEExpertsInt4(), SparseMoEDispatch(), QuantizeInt4Weights()]
    q = tvm.transform.Sequential(seq)(mod)
    text = q[entry].script()
    if entry == "prefill":  # grouped by expert
        assert "moe_grouped_gate_up_int4" in text and "moe_grouped_down_combine_int4" in text
    else:
        assert "moe_gemv_int4" in text and "moe_gemv_weighted_sum_int4" in text
    assert "embedding_int4" in text and "moe_w13__q4" in text and "moe_w2__q4" in text
    assert "router_weight__q4" not in text  # router stays float
    logits, kv, feed = run_entry(q, values, entry, model, tokens, past)
    with torch.no_grad():
        ref_int4 = _int4_reference(model)(*feed)[0][:, -1].numpy()
        ref_float = model(*feed)[0][:, -1].numpy()
    np.testing.assert_allclose(logits, ref_int4, atol=2e-5, rtol=1e-5)  # same INT4 weights: exact up to fp32
    snr = sqnr(torch.from_numpy(ref_float), torch.from_numpy(logits))
    print(f"{entry}: logits SQNR INT4 vs float = {snr:.1f} dB")
    assert snr > 15.0
