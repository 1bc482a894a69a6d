"""tir_kernels/moe_route.py: the fused routing kernel against mobilemoe.moe_op.route (the op's meaning)."""
import numpy as np
import pytest
import torch
import tvm
from tvm.target import Target, codegen

from mobilemoe.moe_op import route
from tir_kernels.moe_route import moe_route

HOST = Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2})


def run_route(E, H, k, scoring, norm, bias, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, H, generator=g), torch.randn(E, H, generator=g) * 0.1
    b = torch.randn(E, generator=g) * 0.5 if bias else None
    func = moe_route(E, H, k, scoring, norm, bias)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    rw, ids = tvm.runtime.empty((n, k), "float32"), tvm.runtime.empty((n, k), "int64")
    args = [tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(w.numpy())]
    args += [tvm.runtime.tensor(b.numpy())] if bias else []
    lib["main"](*args, rw, ids)
    logits = x @ w.T + (b if bias else 0)
    ref_w, ref_ids = route(logits, k, scoring, norm)
    return rw.numpy(), ids.numpy(), ref_w.numpy(), ref_ids.numpy()


@pytest.mark.parametrize("E,H,k,scoring,norm,bias,n", [
    (32, 1024, 4, "topk_softmax", False, False, 1),    # mobilemoe-s decode
    (16, 256, 2, "softmax_topk", False, False, 5),     # Mixtral-style
    (64, 128, 8, "softmax_topk", True, False, 3),      # OLMoE / Qwen3-MoE: normalized top-k
    (60, 96, 4, "softmax_topk", False, True, 2),       # a router bias, H not a multiple of 16
    (8, 64, 2, "topk_softmax", False, False, 600),     # many tokens: the parallel branch
])
def test_route_matches_the_op(E, H, k, scoring, norm, bias, n):
    rw, ids, ref_w, ref_ids = run_route(E, H, k, scoring, norm, bias, n)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(rw, ref_w, rtol=1e-5, atol=1e-6)


def test_decode_routing_has_no_parallel_launch():
    """One decode token routes in the calling thread (tir_kernels/launch.py); many tokens in parallel."""
    text = moe_route(32, 1024, 4, "topk_softmax").script()
    assert text.count("T.parallel") == 1  # only in the branch taken for n * E > SERIAL_MAX_ELEMENTS
    assert "n * T.int64(32) <= T.int64(16384)" in text.replace("T.int64(32) * n", "n * T.int64(32)")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="scoring"):
        moe_route(8, 64, 2, "sigmoid")
    with pytest.raises(ValueError, match="top_k = 9"):
        moe_route(8, 64, 9, "topk_softmax")
