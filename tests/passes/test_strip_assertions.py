import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from passes.strip_assertions import StripAssertions


@I.ir_module
class Before:
    @R.function(pure=False)
    def main(ids: R.Tensor((4, 2), "int64"), x: R.Tensor((4, 8), "float32")):
        R.func_attr({"num_input": 2})
        ok = R.astype(R.min(R.astype(R.less(ids, R.const(8, "int64")), "int8")), "bool")
        _ = R.assert_op(ok, R.str("one_hot: Class values must be smaller than num_classes."), format=R.str("{}"))
        y = R.add(x, x)
        return y


@I.ir_module
class Expected:
    @R.function(pure=False)
    def main(ids: R.Tensor((4, 2), "int64"), x: R.Tensor((4, 8), "float32")):
        R.func_attr({"num_input": 2})
        y = R.add(x, x)
        return y


def test_before_expected():
    tvm.ir.assert_structural_equal(StripAssertions()(Before), Expected)


def test_noop_without_asserts():
    tvm.ir.assert_structural_equal(StripAssertions()(Expected), Expected)
