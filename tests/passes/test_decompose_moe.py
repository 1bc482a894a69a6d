import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

from passes import moe_op
from passes.decompose_moe import DecomposeMoE
from tests.passes.conftest import E, H, K, moe_module, moe_params, run_entry

ATTRS = moe_op.MoEAttrs(top_k=K, scoring="topk_softmax")  # as imported: gate and up separate, no shared expert


def expected():
    """The dense form the exporter emitted before the op: every expert on every token."""
    x = relax.Var("x", relax.TensorType([tirx.Var("n", "int64"), H], "float32"))
    p = moe_params(ATTRS)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *p.values()], attrs={"num_input": 1}):
        with bb.dataflow():
            rt = bb.emit(relax.op.permute_dims(p["router_weight"], axes=[1, 0]))
            logits = bb.emit(relax.op.matmul(x, rt, out_dtype="float32"))
            top = bb.emit(relax.op.topk(logits, k=K, axis=-1, ret_type="both", largest=True, dtype="int64"))
            v, ids = bb.emit(relax.TupleGetItem(top, 0)), bb.emit(relax.TupleGetItem(top, 1))
            w = bb.emit(relax.op.nn.softmax(v, axis=-1))
            e = bb.emit(relax.op.expand_dims(ids, axis=[-1]))
            onehot = bb.emit(relax.op.equal(e, bb.emit(relax.op.arange(0, E, 1, "int64"))))
            onehot = bb.emit(relax.op.astype(onehot, "float32"))
            combine = bb.emit(relax.op.sum(bb.emit(relax.op.multiply(onehot, bb.emit(relax.op.expand_dims(w, axis=[2])))),
                                           axis=[1]))
            g = bb.emit(relax.op.einsum([x, p["w1"]], "nh,eih->nei"))
            u = bb.emit(relax.op.einsum([x, p["w3"]], "nh,eih->nei"))
            a = bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(g, bb.emit(relax.op.sigmoid(g)))), u))
            y = bb.emit(relax.op.einsum([a, p["w2"]], "nei,ehi->neh"))
            out = bb.emit_output(relax.op.einsum([y, combine], "neh,ne->nh"))
        bb.emit_func_output(out)
    return bb.get()


def test_before_expected():
    tvm.ir.assert_structural_equal(DecomposeMoE()(moe_module(ATTRS)), expected())


def test_without_moe_unchanged():
    mod = DecomposeMoE()(moe_module(ATTRS))
    tvm.ir.assert_structural_equal(DecomposeMoE()(mod), mod)


@pytest.mark.parametrize("entry,tokens,past", [("decode", [5], 4), ("prefill", [5, 6, 7], 0)])
def test_numeric_against_pytorch(imported, entry, tokens, past):
    """The imported model (one mobilemoe.moe per layer) with the op decomposed equals PyTorch."""
    model, mod, values = imported
    assert mod[entry].script().count('T.Call("mobilemoe.moe"') == model.config.num_layers
    logits, kv, feed = run_entry(DecomposeMoE()(mod), values, entry, model, tokens, past)
    with torch.no_grad():
        ref_logits, ref_kv = model(*feed)
    np.testing.assert_allclose(logits, ref_logits[:, -1].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(kv, ref_kv.numpy(), atol=1e-5)


def test_unlowered_op_fails_naming_it():
    """The op has no legalization: a module still holding it fails to build, naming the op."""
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    with pytest.raises(Exception, match="mobilemoe.moe"):
        tvm.compile(moe_module(ATTRS), target=target, relax_pipeline=relax.get_default_pipeline(target))
