import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from passes.fast_sigmoid import FastSigmoid, fast_sigmoid


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((3, 1000), "float32")):
        with R.dataflow():
            y = R.multiply(x, R.sigmoid(x))
            R.output(y)
        return y


def _expected():
    x = relax.Var("x", R.Tensor((3, 1000), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            s = bb.emit(bb.call_te(fast_sigmoid, x, primfunc_name_hint="fast_sigmoid"))
            y = bb.emit_output(relax.op.multiply(x, s))
        bb.emit_func_output(y)
    return bb.get()


def test_before_expected():
    got = FastSigmoid()(Before)
    assert "R.sigmoid" not in got.script()
    tvm.ir.assert_structural_equal(got, _expected())


def test_silu_matches_numpy_over_a_wide_range():
    ex = tvm.compile(FastSigmoid()(Before), target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = (np.random.default_rng(0).standard_normal((3, 1000)) * 30).astype("float32")
    x[0, :4] = [0.0, -0.0, 200.0, -200.0]
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = x / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-30)


@I.ir_module
class Silu:
    @R.function
    def main(x: R.Tensor((2, 64), "float32")):
        with R.dataflow():
            y = R.nn.silu(x)
            R.output(y)
        return y


def test_silu_op_is_rewritten_too():
    got = FastSigmoid()(Silu)
    assert "R.nn.silu" not in got.script() and "fast_silu" in got.script()
    ex = tvm.compile(got, target=tvm.target.Target({"kind": "llvm"}))
    x = (np.random.default_rng(1).standard_normal((2, 64)) * 10).astype("float32")
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(y, x / (1 + np.exp(-x.astype(np.float64))), rtol=1e-6, atol=1e-30)
