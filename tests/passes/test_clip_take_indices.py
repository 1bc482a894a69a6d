import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from passes.clip_take_indices import ClipTakeIndices


@I.ir_module
class Before:
    @R.function
    def main(ids: R.Tensor((1, 3), "int64"), embed: R.Tensor((16, 8), "float32")):
        R.func_attr({"num_input": 1})
        e = R.take(embed, ids, axis=0, mode="fast")
        return e


@I.ir_module
class Expected:
    @R.function
    def main(ids: R.Tensor((1, 3), "int64"), embed: R.Tensor((16, 8), "float32")):
        R.func_attr({"num_input": 1})
        e = R.take(embed, ids, axis=0, mode="clip")
        return e


def test_before_expected():
    tvm.ir.assert_structural_equal(ClipTakeIndices()(Before), Expected)


def test_other_modes_untouched():
    tvm.ir.assert_structural_equal(ClipTakeIndices()(Expected), Expected)


def test_out_of_range_index_is_clamped_when_run():
    import numpy as np
    from tvm import relax
    mod = ClipTakeIndices()(Before)
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    embed = np.arange(16 * 8, dtype="float32").reshape(16, 8)
    out = vm["main"](tvm.runtime.tensor(np.array([[0, 15, 99]], dtype="int64")), tvm.runtime.tensor(embed)).numpy()
    np.testing.assert_array_equal(out[0], embed[[0, 15, 15]])
