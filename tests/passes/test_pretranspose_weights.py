import json

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from compiler.params import materialize
from passes.common import PARAM_TRANSFORMS, get_transforms
from passes.pretranspose_weights import PretransposeWeights


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((8, 8), "float32"), router: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 8), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            rt = R.permute_dims(router, axes=[1, 0])
            logits = R.matmul(x, rt)
            y = R.add(R.matmul(x, R.permute_dims(w, axes=[1, 0])), w)  # w is also read directly: kept
            out = (logits, y)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((8, 8), "float32"), router__t: R.Tensor((8, 4), "float32"), w: R.Tensor((8, 8), "float32")):
        R.func_attr({"num_input": 1, PARAM_TRANSFORMS: json.dumps(
            [{"out": "router__t", "op": "transpose", "inputs": ["router"]}])})
        with R.dataflow():
            logits = R.matmul(x, router__t)
            y = R.add(R.matmul(x, R.permute_dims(w, axes=[1, 0])), w)
            out = (logits, y)
            R.output(out)
        return out


def test_before_expected():
    tvm.ir.assert_structural_equal(PretransposeWeights()(Before), Expected)


def test_noop_without_transposed_weights():
    tvm.ir.assert_structural_equal(PretransposeWeights()(Expected), Expected)


def test_transform_replays_the_transpose():
    router = np.arange(32, dtype="float32").reshape(4, 8)
    got = materialize(["router__t"], get_transforms(Expected["main"]), {"router": router})
    np.testing.assert_array_equal(got["router__t"], router.T)
