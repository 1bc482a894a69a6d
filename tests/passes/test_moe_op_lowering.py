"""passes/moe_op.py: the Relax form of mobilemoe::moe, its attributes and operand roles."""
import dataclasses

import pytest
import tvm
from tvm import relax

from passes import moe_op
from tests.passes.conftest import H, moe_module, moe_params


def test_roles_follow_the_attributes():
    a = moe_op.MoEAttrs(top_k=2, scoring="topk_softmax")
    assert a.roles() == ("x", "router_weight", "w1", "w3", "w2")
    b = dataclasses.replace(a, router_bias=True, num_shared_experts=1, shared_expert_gate=True, gate_up="fused")
    assert b.roles() == ("x", "router_weight", "router_bias", "w13", "w2", "shared_w1", "shared_w3", "shared_w2",
                         "shared_gate")


def test_attrs_round_trip_through_the_call():
    attrs = moe_op.MoEAttrs(top_k=3, scoring="softmax_topk", norm_topk_prob=True, num_shared_experts=1,
                            shared_expert_gate=True)
    call = moe_module(attrs)["main"].body.blocks[0].bindings[0].value
    found = moe_op.match(call)
    assert found is not None and found[0] == attrs
    assert [v.name for r, v in found[1].items() if r != "x"] == [f"p_{r}" for r in attrs.roles()[1:]]
    assert call.ty.shape is not None and int(call.ty.shape.values[1]) == H  # y has x's type
    assert moe_op.match(relax.op.add(call.args[0], call.args[0])) is None


def test_bad_attributes_and_operands_name_the_op():
    with pytest.raises(ValueError, match=r"mobilemoe.moe: scoring must be one of"):
        moe_op.MoEAttrs(top_k=2, scoring="sigmoid")
    with pytest.raises(ValueError, match=r"mobilemoe.moe: shared_expert_gate needs a shared expert"):
        moe_op.MoEAttrs(top_k=2, scoring="topk_softmax", shared_expert_gate=True)
    x = relax.Var("x", relax.TensorType([1, H], "float32"))
    with pytest.raises(ValueError, match=r"mobilemoe.moe: operands \['x'\] do not match"):
        moe_op.make(moe_op.MoEAttrs(top_k=2, scoring="topk_softmax"), {"x": x})


def test_registered_once_pure():
    assert moe_op.OP_NAME in tvm.ir.Op.list_op_names()
    assert bool(moe_op.OP.get_attr("FPurity"))


VARIANTS = {
    "topk_softmax": moe_op.MoEAttrs(top_k=2, scoring="topk_softmax", num_shared_experts=1),
    "softmax_topk-norm": moe_op.MoEAttrs(top_k=2, scoring="softmax_topk", norm_topk_prob=True),
    "bias-gated-shared": moe_op.MoEAttrs(top_k=2, scoring="softmax_topk", router_bias=True, num_shared_experts=1,
                                         shared_expert_gate=True),
}


@pytest.mark.parametrize("lowering", ["decompose", "fuse+dispatch", "pack+dispatch"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lowerings_equal_the_torch_op(variant, lowering):
    """Every lowering of the call (the dense reference, the sparse kernels, float or on INT4 experts
    packed on the call with gate and up apart) computes mobilemoe::moe, for each routing variant,
    router bias included; INT4 against the op on the same dequantized expert weights."""
    import numpy as np
    import torch

    from compiler.params import materialize
    from mobilemoe.moe_op import moe
    from mobilemoe.quant import dequantize_int4, quantize_int4
    from passes.common import get_transforms, weight_params
    from passes.decompose_moe import DecomposeMoE
    from passes.fuse_expert_gate_up import FuseExpertGateUp
    from passes.pack_moe_experts_int4 import PackMoEExpertsInt4
    from passes.sparse_moe_dispatch import SparseMoEDispatch

    attrs = VARIANTS[variant]
    mod = moe_module(attrs)  # 3 tokens through the symbolic-n (prefill) form
    passes = {"decompose": [DecomposeMoE()], "fuse+dispatch": [FuseExpertGateUp(), SparseMoEDispatch()],
              "pack+dispatch": [PackMoEExpertsInt4(), SparseMoEDispatch()]}[lowering]
    mod = tvm.transform.Sequential(passes)(mod)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target)),
                              tvm.cpu())
    gen = torch.Generator().manual_seed(0)
    params = {r: torch.randn([int(d) for d in v.ty.shape.values], generator=gen) * (0.3 if r != "router_bias" else 1)
              for r, v in moe_params(attrs).items()}
    x = torch.randn(3, H, generator=gen)
    names = [p.name for p in weight_params(mod["main"])]  # fused / packed: compiler/params.py replays the transforms
    feed = materialize(names, get_transforms(mod["main"]), {f"p_{r}": t.numpy() for r, t in params.items()})
    got = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(feed[n]) for n in names]).numpy()
    if lowering == "pack+dispatch":  # the routed experts (separate gate and up, packed each) through INT4
        params = {r: dequantize_int4(*quantize_int4(t)) if r in moe_op.ROUTED else t for r, t in params.items()}
    ref = moe(x, params["router_weight"], params.get("router_bias"), params["w1"], params["w3"], params["w2"],
              params.get("shared_w1"), params.get("shared_w3"), params.get("shared_w2"), params.get("shared_gate"),
              top_k=attrs.top_k, scoring=attrs.scoring, norm_topk_prob=attrs.norm_topk_prob)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)
