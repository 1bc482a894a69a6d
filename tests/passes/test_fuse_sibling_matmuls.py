import json

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from compiler.params import materialize
from passes.common import FLOAT_WEIGHTS, PARAM_TRANSFORMS, get_transforms
from passes.fuse_sibling_matmuls import FuseSiblingMatmuls


@I.ir_module
class Before:
    @R.function
    def main(h: R.Tensor((1, 2, 8), "float32"), router: R.Tensor((4, 8), "float32"), wq: R.Tensor((8, 8), "float32"),
             wk: R.Tensor((4, 8), "float32"), wv: R.Tensor((4, 8), "float32"), wo: R.Tensor((8, 8), "float32")):
        R.func_attr({"num_input": 1, FLOAT_WEIGHTS: json.dumps(["router"])})
        with R.dataflow():
            q = R.matmul(R.reshape(h, R.shape([2, 8])), R.permute_dims(wq, axes=[1, 0]))
            k = R.matmul(R.reshape(h, R.shape([2, 8])), R.permute_dims(wk, axes=[1, 0]))
            x = R.reshape(h, R.shape([2, 8]))
            v = R.matmul(x, R.permute_dims(wv, axes=[1, 0]))
            r = R.matmul(x, R.permute_dims(router, axes=[1, 0]))  # a float weight: not fused
            o = R.matmul(q, R.permute_dims(wo, axes=[1, 0]))  # another input: alone, unchanged
            out = (o, k, v, r)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @R.function
    def main(h: R.Tensor((1, 2, 8), "float32"), router: R.Tensor((4, 8), "float32"),
             wq__siblings: R.Tensor((16, 8), "float32"), wo: R.Tensor((8, 8), "float32")):
        R.func_attr({"num_input": 1, FLOAT_WEIGHTS: json.dumps(["router"]), PARAM_TRANSFORMS: json.dumps(
            [{"out": "wq__siblings", "op": "concat", "inputs": ["wq", "wk", "wv"], "axis": 0}])})
        with R.dataflow():
            y = R.matmul(R.reshape(h, R.shape([2, 8])), R.permute_dims(wq__siblings, axes=[1, 0]))
            q = R.strided_slice(y, axes=[1], begin=[0], end=[8])
            k = R.strided_slice(y, axes=[1], begin=[8], end=[12])
            x = R.reshape(h, R.shape([2, 8]))
            v = R.strided_slice(y, axes=[1], begin=[12], end=[16])
            r = R.matmul(x, R.permute_dims(router, axes=[1, 0]))
            o = R.matmul(q, R.permute_dims(wo, axes=[1, 0]))
            out = (o, k, v, r)
            R.output(out)
        return out


def test_before_expected():
    tvm.ir.assert_structural_equal(FuseSiblingMatmuls()(Before), Expected)


def test_noop_without_siblings():
    tvm.ir.assert_structural_equal(FuseSiblingMatmuls()(Expected), Expected)


def test_same_outputs_as_before():
    """The fused module computes what the separate matmuls did (the concat replayed by compiler/params.py)."""
    rng = np.random.default_rng(0)
    ws = {n: rng.standard_normal(s).astype("float32") for n, s in
          (("router", (4, 8)), ("wq", (8, 8)), ("wk", (4, 8)), ("wv", (4, 8)), ("wo", (8, 8)))}
    h = rng.standard_normal((1, 2, 8)).astype("float32")
    after = FuseSiblingMatmuls()(Before)
    fused = materialize(["wq__siblings"], get_transforms(after["main"]), ws)

    def run(mod, args):
        ex = tvm.compile(mod, target="llvm")
        vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
        return [t.numpy() for t in vm["main"](*[tvm.runtime.tensor(a) for a in args])]

    want = run(Before, [h, ws["router"], ws["wq"], ws["wk"], ws["wv"], ws["wo"]])
    got = run(after, [h, ws["router"], fused["wq__siblings"], ws["wo"]])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
