import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tir_kernels.append import append_last
from passes.append_last_axis import AppendLastAxis


@I.ir_module
class Before:
    @R.function
    def main(k: R.Tensor((1, 2, 8, "p"), "float32"), new: R.Tensor((1, 2, 8, "s"), "float32"),
             v: R.Tensor((1, 2, "p", 8), "float32"), vn: R.Tensor((1, 2, "s", 8), "float32")):
        p = T.int64()
        s = T.int64()
        with R.dataflow():
            k_all = R.concat((k, new), axis=3)
            v_all = R.concat((v, vn), axis=2)  # not the last axis: left alone
            out = (k_all, v_all)
            R.output(out)
        return out


def _expected():
    """Expected, built with the BlockBuilder: main calls the append_last kernel for the key concat."""
    from tvm import relax, tirx
    p, s = tirx.Var("p", "int64"), tirx.Var("s", "int64")
    k = relax.Var("k", R.Tensor((1, 2, 8, p), "float32"))
    new = relax.Var("new", R.Tensor((1, 2, 8, s), "float32"))
    v = relax.Var("v", R.Tensor((1, 2, p, 8), "float32"))
    vn = relax.Var("vn", R.Tensor((1, 2, s, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [k, new, v, vn]):
        with bb.dataflow():
            gv = bb.add_func(append_last((1, 2, 8)), "append_last")
            k_all = bb.emit(relax.call_tir(gv, [k, new], out_ty=R.Tensor((1, 2, 8, p + s), "float32")))
            v_all = bb.emit(relax.op.concat([v, vn], axis=2))
            out = bb.emit_output(relax.Tuple([k_all, v_all]))
        bb.emit_func_output(out)
    return bb.get()


@I.ir_module
class Static:
    @R.function
    def main(a: R.Tensor((1, 2, 8, 3), "float32"), b: R.Tensor((1, 2, 8, 1), "float32")):
        with R.dataflow():
            y = R.concat((a, b), axis=3)
            R.output(y)
        return y


def test_before_expected():
    got = AppendLastAxis()(Before)
    assert "append_last" in got.script() and got.script().count("R.concat") == 1
    tvm.ir.assert_structural_equal(got["main"], _expected()["main"], map_free_vars=True)


def test_static_concat_is_left_alone():
    tvm.ir.assert_structural_equal(AppendLastAxis()(Static), Static)


@pytest.mark.parametrize("p,s", [(0, 1), (5, 1), (37, 4), (1024, 1)])
def test_kernel_matches_numpy(p, s):
    lib = tvm.compile(tvm.IRModule({"main": append_last((1, 4, 16)).with_attr("global_symbol", "main")}),
                      target=tvm.target.Target({"kind": "llvm", "num-cores": 2}))
    rng = np.random.default_rng(p)
    a, b = rng.standard_normal((1, 4, 16, p), "float32"), rng.standard_normal((1, 4, 16, s), "float32")
    out = tvm.runtime.tensor(np.zeros((1, 4, 16, p + s), "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    np.testing.assert_array_equal(out.numpy(), np.concatenate([a, b], axis=3))


def test_bad_dims_are_refused():
    with pytest.raises(ValueError, match="3 static positive leading dims"):
        append_last((1, 4))
