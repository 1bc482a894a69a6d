import dataclasses
import json

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

from tir_kernels import moe_float, moe_gemv, moe_gemv_weighted_sum, moe_grouped
from tir_kernels.moe_route import moe_route
from passes import moe_op
from passes.common import FLOAT_WEIGHTS
from passes.fuse_expert_gate_up import FuseExpertGateUp
from passes.sparse_moe_dispatch import SparseMoEDispatch
from tests.passes.conftest import H, I, K, moe_module, moe_params, run_entry

ATTRS = moe_op.MoEAttrs(top_k=K, scoring="topk_softmax", gate_up="fused")  # ours without the shared expert
Before = moe_module(ATTRS)  # prefill: the token count n is symbolic
BeforeDecode = moe_module(ATTRS, n=1)  # one static token
ROUTER = json.dumps(["p_router_weight"])


def _linear(bb, x, w):
    return bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w, axes=[1, 0])), out_dtype="float32"))


def _routing(bb, attrs, x, router):
    """The routing ops as TVM's importer made them of the PyTorch model's (mobilemoe.moe_op.route)."""
    logits = _linear(bb, x, router)
    if attrs.scoring == "softmax_topk":
        logits = bb.emit(relax.op.nn.softmax(logits, axis=-1))
    top = bb.emit(relax.op.topk(logits, k=K, axis=-1, ret_type="both", largest=True, dtype="int64"))
    w, ids = bb.emit(relax.TupleGetItem(top, 0)), bb.emit(relax.TupleGetItem(top, 1))
    if attrs.scoring == "topk_softmax":
        w = bb.emit(relax.op.nn.softmax(w, axis=-1))
    elif attrs.norm_topk_prob:
        w = bb.emit(relax.op.divide(w, bb.emit(relax.op.sum(w, axis=[-1], keepdims=True))))
    return w, ids


def _signature(n, attrs=ATTRS):
    x = relax.Var("x", relax.TensorType([n, H], "float32"))
    return x, moe_params(attrs)


def expected_gemv(n, attrs=ATTRS):
    """The per-token GEMV form (decode; prefill with group_prefill=False), + the shared expert if any."""
    x, p = _signature(n, attrs)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *p.values()], attrs={"num_input": 1, FLOAT_WEIGHTS: ROUTER}):
        with bb.dataflow():
            w, ids = _routing(bb, attrs, x, p["router_weight"])
            gu = bb.emit(bb.call_te(moe_float.moe_gate_up, x, ids, p["w13"], primfunc_name_hint="moe_gate_up"))
            g = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[0], end=[I]))
            u = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[I], end=[2 * I]))
            a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
            out = bb.call_te(moe_float.moe_down_combine, a, ids, w, p["w2"], primfunc_name_hint="moe_down_combine")
            if attrs.num_shared_experts:
                routed = bb.emit(out)
                sg = _linear(bb, x, p["shared_w1"])
                act = bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(sg, bb.emit(relax.op.sigmoid(sg)))),
                                                _linear(bb, x, p["shared_w3"])))
                shared = _linear(bb, act, p["shared_w2"])
                if attrs.shared_expert_gate:
                    gate = bb.emit(relax.op.sigmoid(_linear(bb, x, p["shared_gate"])))
                    shared = bb.emit(relax.op.multiply(gate, shared))
                out = relax.op.add(routed, shared)
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get()


def _int4_params(n):
    """x and the parameters of an experts="int4" call (PackMoEExpertsInt4's): (codes, scales) per routed weight."""
    x, p = _signature(n)
    q = {role: (relax.Var(f"p_{role}__q4", relax.TensorType([8, rows, cols // 8], "uint32")),
                relax.Var(f"p_{role}__s", relax.TensorType([8, rows, cols // 32], "float16")))
         for role, rows, cols in (("w13", 2 * I, H), ("w2", H, I))}
    return x, p["router_weight"], q


def int4_call(n):
    x, router, q = _int4_params(tirx.Var(n, "int64") if isinstance(n, str) else n)
    bb = relax.BlockBuilder()
    ops = {"x": x, "router_weight": router,
           **{f"{r}_{part}": v for r in q for part, v in zip(("codes", "scales"), q[r])}}
    with bb.function("main", [x, router, *q["w13"], *q["w2"]], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(moe_op.make(dataclasses.replace(ATTRS, experts="int4"), ops))
        bb.emit_func_output(y)
    return bb.get()


def expected_prefill(int4: bool = False):
    """The grouped form (symbolic N): float kernels, or (int4) the *_int4 ones reading (codes, scales)."""
    n = tirx.Var("n", "int64")
    if int4:
        x, router, q = _int4_params(n)
        params, w13, w2, weights, sfx = [router, *q["w13"], *q["w2"]], q["w13"], q["w2"], "int4", "_int4"
    else:
        x, p = _signature(n)
        router, params, w13, w2 = p["router_weight"], list(p.values()), [p["w13"]], [p["w2"]]
        weights, sfx = "float32", ""
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *params], attrs={"num_input": 1, FLOAT_WEIGHTS: ROUTER}):
        with bb.dataflow():
            w, ids = _routing(bb, ATTRS, x, router)
            plan_gv = bb.add_func(moe_grouped.moe_route_plan(8, 2, "int64"), "moe_route_plan")
            plan = bb.emit(relax.call_tir(plan_gv, [ids], [relax.TensorType([9], "int32"),
                                                           relax.TensorType([n * 2], "int32")]))
            offsets, order = bb.emit(relax.TupleGetItem(plan, 0)), bb.emit(relax.TupleGetItem(plan, 1))
            gate_up = bb.add_func(moe_grouped.moe_grouped_gate_up(8, 64, 64, 2, weights), "moe_grouped_gate_up" + sfx)
            gu = bb.emit(relax.call_tir(gate_up, [x, offsets, order, *w13], relax.TensorType([n * 2, 64], "float32")))
            g = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[0], end=[32]))
            u = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[32], end=[64]))
            a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
            down = bb.add_func(moe_grouped.moe_grouped_down_combine(8, 64, 32, 2, weights),
                               "moe_grouped_down_combine" + sfx)
            out = bb.emit_output(relax.call_tir(down, [a, offsets, order, w, *w2],
                                                relax.TensorType([n, 64], "float32")))
        bb.emit_func_output(out)
    return bb.get()


def test_before_expected_decode_gathers_per_token():
    tvm.ir.assert_structural_equal(SparseMoEDispatch()(BeforeDecode), expected_gemv(1))


def test_before_expected_prefill_groups_by_expert():
    tvm.ir.assert_structural_equal(SparseMoEDispatch()(Before), expected_prefill())


def test_group_prefill_off_keeps_gemvs():
    """GPU pipelines (the grouped kernels are CPU-only) keep the per-token GEMVs for prefill too."""
    out = SparseMoEDispatch(group_prefill=False)(Before)
    tvm.ir.assert_structural_equal(out, expected_gemv(tirx.Var("n", "int64")))


def test_before_expected_routing_variant_and_gated_shared_expert():
    """Qwen2-MoE's variant: softmax over all experts then top-k, renormalised, a sigmoid-gated shared expert."""
    attrs = dataclasses.replace(ATTRS, scoring="softmax_topk", norm_topk_prob=True, num_shared_experts=1,
                                shared_expert_gate=True)
    tvm.ir.assert_structural_equal(SparseMoEDispatch()(moe_module(attrs, n=1)), expected_gemv(1, attrs))


def _fused_routing(bb, attrs, x, router, n):
    """The routing as one moe_route call (fused_routing=True, the CPU strategy's choice)."""
    gv = bb.add_func(moe_route(8, H, K, attrs.scoring, attrs.norm_topk_prob, attrs.router_bias), "moe_route")
    out = bb.emit(relax.call_tir(gv, [x, router], [relax.TensorType([n, K], "float32"),
                                                   relax.TensorType([n, K], "int64")]))
    return bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))


@pytest.mark.parametrize("attrs", [ATTRS, dataclasses.replace(ATTRS, scoring="softmax_topk", norm_topk_prob=True)],
                         ids=["topk_softmax", "softmax_topk_normalized"])
def test_before_expected_fused_routing_decode(attrs):
    x, p = _signature(1, attrs)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *p.values()], attrs={"num_input": 1, FLOAT_WEIGHTS: ROUTER}):
        with bb.dataflow():
            w, ids = _fused_routing(bb, attrs, x, p["router_weight"], 1)
            gu = bb.emit(bb.call_te(moe_float.moe_gate_up, x, ids, p["w13"], primfunc_name_hint="moe_gate_up"))
            g = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[0], end=[I]))
            u = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[I], end=[2 * I]))
            a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
            out = bb.emit_output(bb.call_te(moe_float.moe_down_combine, a, ids, w, p["w2"],
                                            primfunc_name_hint="moe_down_combine"))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(SparseMoEDispatch(fused_routing=True)(moe_module(attrs, n=1)), bb.get())


def test_fused_routing_prefill_feeds_the_grouped_kernels():
    text = SparseMoEDispatch(fused_routing=True)(Before)["main"].script()
    assert "call_tir(moe_route," in text and "R.topk" not in text and "R.nn.softmax" not in text
    assert "moe_route_plan" in text and "moe_grouped_gate_up" in text


def test_before_expected_int4_experts_decode():
    """experts="int4": the INT4 GEMVs read (codes, scales) of the k selected experts."""
    x, router, q = _int4_params(1)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, router, *q["w13"], *q["w2"]], attrs={"num_input": 1, FLOAT_WEIGHTS: ROUTER}):
        with bb.dataflow():
            w, ids = _routing(bb, ATTRS, x, router)
            gate_up = bb.add_func(moe_gemv(8, 2 * I, H, K, index_dtype="int64"), "moe_gemv_int4")
            gu = bb.emit(relax.call_tir(gate_up, [x, ids, *q["w13"]], relax.TensorType([1, K, 2 * I], "float32")))
            g = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[0], end=[I]))
            u = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[I], end=[2 * I]))
            a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
            down = bb.add_func(moe_gemv_weighted_sum(8, H, I, K, index_dtype="int64"), "moe_gemv_weighted_sum_int4")
            out = bb.emit_output(relax.call_tir(down, [a, ids, w, *q["w2"]], relax.TensorType([1, H], "float32")))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(SparseMoEDispatch()(int4_call(1)), bb.get())


def test_before_expected_int4_experts_prefill():
    """experts="int4", symbolic N: the grouped INT4 GEMMs; the router stays float."""
    tvm.ir.assert_structural_equal(SparseMoEDispatch()(int4_call("n")), expected_prefill(int4=True))


def test_does_not_fire_on_dense_matmul():
    from tvm.script import ir as I_
    from tvm.script import relax as R

    @I_.ir_module
    class Dense:
        @R.function
        def main(x: R.Tensor(("n", 64), "float32"), p_w: R.Tensor((64, 64), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                y = R.matmul(x, R.permute_dims(p_w, axes=[1, 0]))
                R.output(y)
            return y
    tvm.ir.assert_structural_equal(SparseMoEDispatch()(Dense), Dense)


@pytest.mark.parametrize("fused", [False, True], ids=["routing_ops", "fused_routing"])
@pytest.mark.parametrize("entry,tokens,past", [("decode", [5], 4), ("prefill", [5, 6, 7, 8, 9], 0),
                                               ("prefill", [3, 4, 5], 2)])
def test_numeric_against_pytorch(imported, entry, tokens, past, fused):
    model, mod, values = imported
    sparse = SparseMoEDispatch(fused_routing=fused)(FuseExpertGateUp()(mod))
    text = sparse[entry].script()
    assert ("call_tir(moe_route," in text) == fused
    assert "mobilemoe.moe" not in text  # every MoE call lowered, none to the dense einsums:
    assert not any(sub in text for sub in ("nh,eih->nei", "nei,ehi->neh", "neh,ne->nh"))
    if entry == "prefill":  # symbolic token count: grouped by expert
        assert "moe_route_plan" in text and "moe_grouped_gate_up" in text and "moe_grouped_down_combine" in text
    else:
        assert "moe_grouped" not in text and "moe_gate_up" in text and "moe_down_combine" in text
    assert json.loads(str(sparse[entry].attrs[FLOAT_WEIGHTS])) == [f"p_model_layers_{i}_moe_router_weight"
                                                                  for i in range(model.config.num_layers)]
    logits, kv, feed = run_entry(sparse, values, entry, model, tokens, past)
    with torch.no_grad():
        ref_logits, ref_kv = model(*feed)
    np.testing.assert_allclose(logits, ref_logits[:, -1].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(kv, ref_kv.numpy(), atol=1e-5)


@pytest.mark.parametrize("before,tokens", [(BeforeDecode, 1), (Before, 3)], ids=["decode", "prefill"])
def test_reads_only_selected_experts(before, tokens):
    """The kernels' weight reads are indexed by the routed ids: poisoning every unselected expert
    with NaN leaves the output finite and unchanged."""
    import tvm.runtime
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    mod = SparseMoEDispatch()(before)
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, 64)).astype("float32")
    router = rng.standard_normal((8, 64)).astype("float32")
    w13 = rng.standard_normal((8, 64, 64)).astype("float32")
    w2 = rng.standard_normal((8, 64, 32)).astype("float32")
    logits = x @ router.T
    ids = np.argsort(-logits, axis=-1)[:, :2]
    top = np.take_along_axis(logits, ids, -1)
    w = np.exp(top - top.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    args = lambda a, b: [tvm.runtime.tensor(v) for v in (x, router, a, b)]
    clean = vm["main"](*args(w13, w2)).numpy()
    unused = sorted(set(range(8)) - set(ids.ravel()))
    assert unused
    w13[unused], w2[unused] = np.nan, np.nan
    poisoned = vm["main"](*args(w13, w2)).numpy()
    np.testing.assert_array_equal(clean, poisoned)
    ref = np.einsum("tj,tjhi,tji->th", w, w2[ids], _swiglu(np.einsum("th,tjih->tji", x, w13[ids])))
    np.testing.assert_allclose(clean, ref, rtol=1e-4, atol=1e-4)


def _swiglu(gu):
    g, u = np.split(gu, 2, axis=-1)
    return g / (1 + np.exp(-g)) * u
