"""targets/cpu_rules.py: SafeReduction refuses the decode RMSNorm shape dlight's rule gets wrong,
keeps the shapes it gets right; Injective parallelises and vectorises one-block copies. Both are
checked for the same results as the unscheduled kernels."""
import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.target import Target

from targets.cpu_rules import Injective, SafeReduction, shares_leading_axes

TARGET = Target({"kind": "llvm", "num-cores": 2})


def rmsnorm(rows: int, dim: int) -> tirx.PrimFunc:
    x = te.placeholder((1, rows, dim), "float32", name="x")
    w = te.placeholder((dim,), "float32", name="w")
    k = te.reduce_axis((0, dim), name="k")
    ss = te.compute((1, rows, 1), lambda b, r, _: te.sum(x[b, r, k] * x[b, r, k], axis=k), name="ss")
    y = te.compute((1, rows, dim), lambda b, r, d: x[b, r, d] * w[d] * tvm.tirx.rsqrt(ss[b, r, 0] / dim + 1e-5),
                   name="y")
    return te.create_prim_func([x, w, y])


def run(func, args):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    tv = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tv)
    return tv[-1].numpy()


def test_safe_reduction_refuses_the_recomputing_shape():
    assert not shares_leading_axes(rmsnorm(1, 1024))  # one decode token: dlight would redo the sum 1024 times
    assert shares_leading_axes(rmsnorm(8, 1024))
    assert SafeReduction().apply(rmsnorm(1, 1024), TARGET, False) is None
    sch = SafeReduction().apply(rmsnorm(8, 256), TARGET, False)
    assert sch is not None
    x, w = np.random.rand(1, 8, 256).astype("float32"), np.random.rand(256).astype("float32")
    ref = run(rmsnorm(8, 256), [x, w, np.empty_like(x)])
    got = run(sch.mod["main"], [x, w, np.empty_like(x)])
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_injective_copy_is_parallel_and_vectorized():
    a = te.placeholder((4, 96, 64), "float32", name="a")
    b = te.placeholder((4, 1, 64), "float32", name="b")
    cat = te.compute((4, 97, 64), lambda h, t, d: tvm.tirx.if_then_else(t < 96, a[h, t, d], b[h, t - 96, d]),
                     name="cat")
    func = te.create_prim_func([a, b, cat])
    sch = Injective().apply(func, TARGET, False)
    text = sch.mod["main"].script()
    assert "T.parallel" in text and "T.vectorized" in text
    xa, xb = np.random.rand(4, 96, 64).astype("float32"), np.random.rand(4, 1, 64).astype("float32")
    out = np.empty((4, 97, 64), "float32")
    np.testing.assert_array_equal(run(sch.mod["main"], [xa, xb, out]), np.concatenate([xa, xb], axis=1))
    reduction = rmsnorm(2, 64)
    assert Injective().apply(reduction, TARGET, False) is None


def test_injective_small_static_kernel_stays_serial():
    """One decode token's elementwise kernel (<= SERIAL_MAX_ELEMENTS, static): vectorized, no parallel
    launch; the same op over a symbolic token count stays parallel."""
    x = te.placeholder((1, 1, 1024), "float32", name="x")
    y = te.compute((1, 1, 1024), lambda a, b, c: x[a, b, c] * 2.0, name="y")
    text = Injective().apply(te.create_prim_func([x, y]), TARGET, False).mod["main"].script()
    assert "T.parallel" not in text and "T.vectorized" in text
    n = tvm.tirx.Var("n", "int64")
    xs = te.placeholder((n, 1024), "float32", name="x")
    ys = te.compute((n, 1024), lambda a, c: xs[a, c] * 2.0, name="y")
    assert "T.parallel" in Injective().apply(te.create_prim_func([xs, ys]), TARGET, False).mod["main"].script()


def test_batch_matmul_rule_dynamic_and_static_shapes():
    from targets.cpu_rules import BatchMatmul

    def matmul(a, b):  # what LegalizeOps makes of R.matmul: one block named "matmul"
        k = te.reduce_axis((0, a.shape[-1]), name="k")
        if len(a.shape) == 2:
            return te.compute((a.shape[0], b.shape[1]), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="matmul")
        return te.compute((a.shape[0], a.shape[1], b.shape[2]),
                          lambda z, i, j: te.sum(a[z, i, k] * b[z, k, j], axis=k), name="matmul")

    n = tirx.Var("n", "int64")
    for a_shape, b_shape in [((4, 3, 64), (4, 64, n)), ((4, 3, n), (4, n, 64)), ((1, 1024), (1024, 32))]:
        a = te.placeholder(a_shape, "float32", name="a")
        b = te.placeholder(b_shape, "float32", name="b")
        func = te.create_prim_func([a, b, matmul(a, b)])
        sch = BatchMatmul().apply(func, TARGET, False)
        assert sch is not None and "T.parallel" in sch.mod["main"].script()
        concrete = [[37 if not isinstance(d, int) else d for d in s] for s in (a_shape, b_shape)]
        xa = np.random.rand(*concrete[0]).astype("float32")
        xb = np.random.rand(*concrete[1]).astype("float32")
        out = np.empty((xa @ xb).shape, "float32")
        np.testing.assert_allclose(run(sch.mod["main"], [xa, xb, out]), xa @ xb, rtol=1e-5)
    assert BatchMatmul().apply(rmsnorm(2, 64), TARGET, False) is None
