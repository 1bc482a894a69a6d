"""UseExpertSlots: the INT4 expert kernels read a slot cache filled by the runtime's callback."""
import numpy as np
import pytest
import tvm
from tvm import relax

from compiler.expert_file import expert_layout, write_expert_file
from compiler.params import materialize
from mobilemoe.runtimes.expert_cache import ExpertCache
from passes import moe_op
from passes.common import get_transforms, is_op, weight_params
from passes.fuse_expert_gate_up import FuseExpertGateUp
from passes.pack_moe_experts_int4 import PackMoEExpertsInt4
from passes.quantize_int4_weights import QuantizeInt4Weights
from passes.sparse_moe_dispatch import SparseMoEDispatch
from passes.use_expert_slots import CALLBACK, GEMV, GROUPED, UseExpertSlots
from tir_kernels.moe_grouped import ARGS_ATTR
from tests.passes.conftest import E, H, K, moe_module

ATTRS = moe_op.MoEAttrs(top_k=K, scoring="topk_softmax", num_shared_experts=1)
SLOTS = 3


def int4_module(n):
    seq = tvm.transform.Sequential([FuseExpertGateUp(), PackMoEExpertsInt4(), SparseMoEDispatch(),
                                    QuantizeInt4Weights()])
    return seq(moe_module(ATTRS, n))


def calls(func, pred):
    out = []
    relax.analysis.post_order_visit(func.body, lambda e: out.append(e) if pred(e) else None)
    return out


@pytest.mark.parametrize("n", [1, "n"], ids=["decode-gemv", "prefill-grouped"])
def test_structure(n):
    report = {}
    after = UseExpertSlots(SLOTS, report)(int4_module(n))
    func = after["main"]
    names = [p.name for p in weight_params(func)]
    assert report["layers"] == [["p_w13__q4", "p_w13__s", "p_w2__q4", "p_w2__s"]]
    assert not any(x in names for x in report["layers"][0])  # the stacked experts left the parameters
    assert names[-4:] == [f"expert_pool_{i}" for i in range(4)]
    assert [p["shape"][0] for p in report["pools"]] == [SLOTS] * 4
    packed = calls(func, lambda e: is_op(e, "relax.call_pure_packed"))
    assert len(packed) == 1 and packed[0].args[0].global_symbol == CALLBACK
    kernels = [f for f in after.functions.values() if isinstance(f, tvm.tirx.PrimFunc)
               and str((f.attrs or {}).get("mobilemoe.kernel")) in (*GEMV, *GROUPED)]
    dims = [int((f.attrs.get("mobilemoe.dims") or f.attrs[ARGS_ATTR])["num_experts"]) for f in kernels]
    assert dims == [SLOTS, SLOTS]  # the gate/up and down kernels, built for SLOTS experts
    plans = calls(func, lambda e: is_op(e, "relax.call_tir") and e.args[0].name_hint.startswith("moe_route_plan"))
    assert [int(p.ty_args[0].fields[0].shape.values[0]) for p in plans] == ([] if n == 1 else [SLOTS + 1])


def test_does_not_fire_without_int4_expert_kernels():
    """Float expert kernels (quant none) keep their stacked weights: nothing to read through slots."""
    mod = tvm.transform.Sequential([FuseExpertGateUp(), SparseMoEDispatch()])(moe_module(ATTRS, 1))
    report = {}
    tvm.ir.assert_structural_equal(UseExpertSlots(SLOTS, report)(mod), relax.transform.DeadCodeElimination()(mod))
    assert report == {}


@pytest.mark.parametrize("n,slots", [(1, SLOTS), (2, 2 * K)], ids=["decode-gemv", "prefill-grouped"])
def test_same_output_through_the_expert_cache(tmp_path, n, slots):
    """Compiled with and without slots, fed the same weights: the cache's callback (the runtime's
    ExpertCache over an expert file) makes the routed experts resident and the outputs agree, over
    inputs in a row (the cache evicting)."""
    before = int4_module(1 if n == 1 else "n")
    report = {}
    after = UseExpertSlots(slots, report)(before)
    rng = np.random.default_rng(0)
    func = before["main"]
    sources = {"p_w1": (E, 32, H), "p_w3": (E, 32, H), "p_w2": (E, H, 32), "p_router_weight": (E, H),
               "p_shared_w1": (64, H), "p_shared_w3": (64, H), "p_shared_w2": (H, 64)}
    source = {k: rng.standard_normal(s).astype("float32") * 0.1 for k, s in sources.items()}
    params = materialize([p.name for p in weight_params(func)], get_transforms(func), source)
    block = {**expert_layout(report["layers"], report["pools"], E), "slots": slots, "top_k": K}
    write_expert_file(tmp_path / "experts.bin", block, iter((k, params[k]) for k in report["layers"][0]))
    cache = ExpertCache(tmp_path, block, tvm.cpu())
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    runs = []
    for mod, args in ((before, [params[p.name] for p in weight_params(func)]),
                      (after, [params[p.name] if p.name in params else cache.pools[p.name]
                               for p in weight_params(after["main"])])):
        vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target)),
                                  tvm.cpu())
        args = [a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(a) for a in args]
        runs.append(lambda x, vm=vm, args=args: vm["main"](tvm.runtime.tensor(x), *args).numpy())
    for _ in range(6):
        x = rng.standard_normal((n, H)).astype("float32")
        np.testing.assert_allclose(runs[1](x), runs[0](x), rtol=0, atol=1e-5)
    s = cache.stats()
    assert s["misses"] > slots and s["bytes_read"] == s["misses"] * sum(t["nbytes"] for t in block["tensors"])
