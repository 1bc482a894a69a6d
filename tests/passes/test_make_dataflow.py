import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from passes.make_dataflow import MakeDataflow


@I.ir_module
class Before:
    @R.function(pure=False)
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8,), "float32")):
        R.func_attr({"num_input": 1})
        y = R.reshape(x, (32,))
        z = R.multiply(R.reshape(y, (4, 8)), w)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8,), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            y = R.reshape(x, (32,))
            lv = R.reshape(y, (4, 8))
            z = R.multiply(lv, w)
            R.output(z)
        return z


@I.ir_module
class StillImpure:
    @R.function(pure=False)
    def main(x: R.Tensor((4,), "float32")):
        _ = R.print(x, format="{}")
        return x


def test_before_expected():
    tvm.ir.assert_structural_equal(MakeDataflow()(Before), Expected)


def test_function_with_an_impure_call_is_left_alone():
    tvm.ir.assert_structural_equal(MakeDataflow()(StillImpure), StillImpure)


def test_fusion_acts_after_it():
    """What the pass is for: FuseOps fuses the elementwise chain only in the dataflow form."""
    def fused_kernels(mod):
        with tvm.target.Target({"kind": "llvm"}):
            mod = relax.transform.LegalizeOps()(mod)
            mod = relax.transform.AnnotateTIROpPattern()(mod)
            mod = relax.transform.FuseOps()(mod)
            mod = relax.transform.FuseTIR()(mod)
        return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    assert len(fused_kernels(MakeDataflow()(Before))) < len(fused_kernels(Before))
