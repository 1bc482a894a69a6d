"""passes/moe_op.py: the Relax form of mobilemoe::moe, its attributes and operand roles."""
import dataclasses

import pytest
import tvm
from tvm import relax

from passes import moe_op
from tests.passes.conftest import H, moe_module


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
