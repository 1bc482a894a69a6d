"""tir_kernels/softmax.py against numpy: vector body and scalar tail, masked scores, the exp."""
import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from tir_kernels.softmax import exp_le0, softmax_rows


@pytest.fixture(scope="module", params=[4, 16])
def kernel(request):
    func = softmax_rows(request.param).with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target({"kind": "llvm", "num-cores": 2}))


@pytest.mark.parametrize("n,t", [(1, 1), (3, 5), (7, 16), (9, 37), (64, 512)])
def test_rows_match_numpy_with_masked_scores(kernel, n, t):
    rng = np.random.default_rng(n * t)
    x = (rng.standard_normal((n, t)) * 6).astype("float32")
    x[1::2, (t + 1) // 2:] = -np.finfo(np.float32).max  # the additive causal mask
    y = tvm.runtime.tensor(np.zeros((n, t), "float32"))
    kernel["main"](tvm.runtime.tensor(x), y)
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    ref = e / e.sum(1, keepdims=True)
    np.testing.assert_allclose(y.numpy(), ref, rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(y.numpy().sum(1), 1.0, rtol=1e-5)
    # masked (and far-below-max) scores give exactly 0, never a denormal: p.V over denormal
    # probabilities ran 80x slower on x86 (microcode assists)
    out = np.abs(y.numpy())
    assert np.all((out == 0) | (out >= np.finfo(np.float32).tiny))
    assert np.all(y.numpy()[1::2, (t + 1) // 2:] == 0)


def test_polynomial_exp_relative_error():
    @T.prim_func(private=True)
    def f(x: T.Buffer((4096,), "float32"), y: T.Buffer((4096,), "float32")):
        for i in range(4096):
            y[i] = exp_le0(x[i], 1)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target({"kind": "llvm"}))
    x = -np.linspace(0, 87, 4096).astype("float32")
    y = tvm.runtime.tensor(np.zeros(4096, "float32"))
    lib["main"](tvm.runtime.tensor(x), y)
    rel = np.abs(y.numpy() - np.exp(x.astype(np.float64))) / np.exp(x.astype(np.float64))
    assert rel.max() < 5e-7


def test_bad_lanes_are_refused():
    with pytest.raises(ValueError, match="lanes"):
        softmax_rows(3)
