import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx
from tvm.script import ir as I
from tvm.script import relax as R

from tir_kernels import moe_float, moe_grouped
from passes.fuse_expert_gate_up import FuseExpertGateUp
from passes.sparse_moe_dispatch import SparseMoEDispatch
from tests.passes.conftest import run_entry


@I.ir_module
class Before:  # prefill: the token count n is symbolic
    @R.function
    def main(x: R.Tensor(("n", 64), "float32"), ids: R.Tensor(("n", 2), "int64"), w: R.Tensor(("n", 2), "float32"),
             p_w13: R.Tensor((8, 64, 64), "float32"), p_w2: R.Tensor((8, 64, 32), "float32")):
        R.func_attr({"num_input": 3})
        with R.dataflow():
            e = R.expand_dims(ids, axis=[-1])
            r = R.arange(0, 8, 1, dtype="int64")
            onehot = R.astype(R.astype(R.equal(e, r), "int64"), "float32")
            combine = R.sum(R.multiply(onehot, R.expand_dims(w, axis=[2])), axis=[1])
            gu = R.einsum((x, p_w13), subscripts="nh,eih->nei")
            g = R.strided_slice(gu, axes=[2], begin=[0], end=[32])
            u = R.strided_slice(gu, axes=[2], begin=[32], end=[64])
            a = R.multiply(R.multiply(g, R.sigmoid(g)), u)
            y = R.einsum((a, p_w2), subscripts="nei,ehi->neh")
            out = R.einsum((y, combine), subscripts="neh,ne->nh")
            R.output(out)
        return out


BeforeDecode = tvm.IRModule({"main": Before["main"].bind_symbolic_vars({"n": 1})})  # one static token


def _signature(n):
    x = relax.Var("x", relax.TensorType([n, 64], "float32"))
    ids = relax.Var("ids", relax.TensorType([n, 2], "int64"))
    w = relax.Var("w", relax.TensorType([n, 2], "float32"))
    w13 = relax.Var("p_w13", relax.TensorType([8, 64, 64], "float32"))
    w2 = relax.Var("p_w2", relax.TensorType([8, 64, 32], "float32"))
    return x, ids, w, w13, w2


def expected_gemv(n):
    """The per-token GEMV form (decode; prefill with group_prefill=False)."""
    x, ids, w, w13, w2 = _signature(n)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, ids, w, w13, w2], attrs={"num_input": 3}):
        with bb.dataflow():
            gu = bb.emit(bb.call_te(moe_float.moe_gate_up, x, ids, w13, primfunc_name_hint="moe_gate_up"))
            g = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[0], end=[32]))
            u = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[32], end=[64]))
            a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
            out = bb.emit_output(bb.call_te(moe_float.moe_down_combine, a, ids, w, w2,
                                            primfunc_name_hint="moe_down_combine"))
        bb.emit_func_output(out)
    return bb.get()


def expected_prefill():
    n = tirx.Var("n", "int64")
    x, ids, w, w13, w2 = _signature(n)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, ids, w, w13, w2], attrs={"num_input": 3}):
        with bb.dataflow():
            plan_gv = bb.add_func(moe_grouped.moe_route_plan(8, 2, "int64"), "moe_route_plan")
            plan = bb.emit(relax.call_tir(plan_gv, [ids], [relax.TensorType([9], "int32"),
                                                           relax.TensorType([n * 2], "int32")]))
            offsets, order = bb.emit(relax.TupleGetItem(plan, 0)), bb.emit(relax.TupleGetItem(plan, 1))
            gate_up = bb.add_func(moe_grouped.moe_grouped_gate_up(8, 64, 64, 2, "float32"), "moe_grouped_gate_up")
            gu = bb.emit(relax.call_tir(gate_up, [x, offsets, order, w13], relax.TensorType([n * 2, 64], "float32")))
            g = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[0], end=[32]))
            u = bb.emit(relax.op.strided_slice(gu, axes=[1], begin=[32], end=[64]))
            a = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
            down = bb.add_func(moe_grouped.moe_grouped_down_combine(8, 64, 32, 2, "float32"),
                               "moe_grouped_down_combine")
            out = bb.emit_output(relax.call_tir(down, [a, offsets, order, w, w2], relax.TensorType([n, 64], "float32")))
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


def test_does_not_fire_on_dense_matmul():
    @I.ir_module
    class Dense:
        @R.function
        def main(x: R.Tensor(("n", 64), "float32"), p_w: R.Tensor((64, 64), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                y = R.matmul(x, R.permute_dims(p_w, axes=[1, 0]))
                R.output(y)
            return y
    tvm.ir.assert_structural_equal(SparseMoEDispatch()(Dense), Dense)


@pytest.mark.parametrize("entry,tokens,past", [("decode", [5], 4), ("prefill", [5, 6, 7, 8, 9], 0),
                                               ("prefill", [3, 4, 5], 2)])
def test_numeric_against_pytorch(imported, entry, tokens, past):
    model, mod, values = imported
    sparse = SparseMoEDispatch()(FuseExpertGateUp()(mod))
    text = sparse[entry].script()
    assert not any(sub in text for sub in ("nh,eih->nei", "nei,ehi->neh", "neh,ne->nh"))  # the MoE einsums
    if entry == "prefill":  # symbolic token count: grouped by expert
        assert "moe_route_plan" in text and "moe_grouped_gate_up" in text and "moe_grouped_down_combine" in text
    else:
        assert "moe_grouped" not in text and "moe_gate_up" in text and "moe_down_combine" in text
    logits, kv, feed = run_entry(sparse, values, entry, model, tokens, past)
    with torch.no_grad():
        ref_logits, ref_kv = model(*feed)
    np.testing.assert_allclose(logits, ref_logits[:, -1].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(kv, ref_kv.numpy(), atol=1e-5)


@pytest.mark.parametrize("before,tokens", [(BeforeDecode, 1), (Before, 3)], ids=["decode", "prefill"])
def test_reads_only_selected_experts(before, tokens):
    """The kernels' weight reads are indexed by the routed ids: poisoning an unselected expert
    with NaN leaves the output finite and unchanged."""
    import tvm.runtime
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    mod = SparseMoEDispatch()(before)
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, 64)).astype("float32")
    ids = np.array([[0, 1], [1, 2], [2, 0]][:tokens], "int64")
    w = rng.random((tokens, 2)).astype("float32")
    w13 = rng.standard_normal((8, 64, 64)).astype("float32")
    w2 = rng.standard_normal((8, 64, 32)).astype("float32")
    args = lambda a, b: [tvm.runtime.tensor(v) for v in (x, ids, w, a, b)]
    clean = vm["main"](*args(w13, w2)).numpy()
    w13[3:], w2[3:] = np.nan, np.nan
    poisoned = vm["main"](*args(w13, w2)).numpy()
    np.testing.assert_array_equal(clean, poisoned)
    ref = np.einsum("tj,tjhi,tji->th", w, w2[ids], _swiglu(np.einsum("th,tjih->tji", x, w13[ids])))
    np.testing.assert_allclose(clean, ref, rtol=1e-4, atol=1e-4)


def _swiglu(gu):
    g, u = np.split(gu, 2, axis=-1)
    return g / (1 + np.exp(-g)) * u

