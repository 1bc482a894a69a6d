import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from passes.prune_unused_params import PruneUnusedParams


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((2, 4), "float32"), unused_input: R.Tensor((1,), "float32"),
             p_used: R.Tensor((4, 4), "float32"), p_tied_copy: R.Tensor((4, 4), "float32")):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            y = R.matmul(x, p_used)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((2, 4), "float32"), unused_input: R.Tensor((1,), "float32"),
             p_used: R.Tensor((4, 4), "float32")):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            y = R.matmul(x, p_used)
            R.output(y)
        return y


def test_before_expected_keeps_user_inputs():
    tvm.ir.assert_structural_equal(PruneUnusedParams()(Before), Expected)


def test_noop_when_all_used():
    tvm.ir.assert_structural_equal(PruneUnusedParams()(Expected), Expected)
