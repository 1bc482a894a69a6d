import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tir_kernels.softmax import softmax_rows
from passes.softmax_rows import SoftmaxRows


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 2, 3, "s", "t"), "float32"), r: R.Tensor((4, 8), "float32")):
        s = T.int64()
        t = T.int64()
        with R.dataflow():
            p = R.nn.softmax(x, axis=-1)
            q = R.nn.softmax(r, axis=0)  # not the last axis: left alone
            out = (p, q)
            R.output(out)
        return out


def _expected():
    s, t = tvm.tirx.Var("s", "int64"), tvm.tirx.Var("t", "int64")
    x = relax.Var("x", R.Tensor((1, 2, 3, s, t), "float32"))
    r = relax.Var("r", R.Tensor((4, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, r]):
        with bb.dataflow():
            gv = bb.add_func(softmax_rows(8), "softmax_rows")
            rows = bb.emit(relax.op.reshape(x, [-1, t]))
            y = bb.emit(relax.call_tir(gv, [rows], out_ty=rows.ty))
            p = bb.emit(relax.op.reshape(y, [1, 2, 3, s, t]))
            q = bb.emit(relax.op.nn.softmax(r, axis=0))
            out = bb.emit_output(relax.Tuple([p, q]))
        bb.emit_func_output(out)
    return bb.get()


def test_before_expected():
    tvm.ir.assert_structural_equal(SoftmaxRows(lanes=8)(Before)["main"], _expected()["main"], map_free_vars=True)


@pytest.mark.parametrize("lanes", [4, 16])
def test_rewritten_module_matches_numpy(lanes):
    mod = SoftmaxRows(lanes=lanes)(Before)
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "num-cores": 2}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(lanes)
    x, r = rng.standard_normal((1, 2, 3, 5, 21), "float32") * 4, rng.standard_normal((4, 8), "float32")
    p, q = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(r))
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(p.numpy(), e / e.sum(-1, keepdims=True), rtol=2e-6, atol=1e-7)
    e = np.exp(r - r.max(0, keepdims=True))
    np.testing.assert_allclose(q.numpy(), e / e.sum(0, keepdims=True), rtol=1e-5)
