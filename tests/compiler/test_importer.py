"""compiler/importer.py: each MoE layer imports as one mobilemoe.moe call (passes/moe_op.py) carrying
its routing variant as attributes and the layer's parameters as operands, for every routing variant
of the registry's MoE architectures."""
import pytest
import torch
import tvm
from tvm import relax

from compiler.importer import ENTRY_POINTS, import_model
from mobilemoe.model import MobileMoE
from passes import moe_op
from passes.common import bindings
from tests.arch.hf_models import variant_config

# one architecture per routing variant (tests/test_moe_op.py checks they cover them all)
VARIANTS = ["granitemoeshared", "granitemoe", "olmoe", "qwen3_moe", "qwen2_moe"]
PARAM_OF_ROLE = {"router_weight": "router_weight", "w1": "w1", "w3": "w3", "w2": "w2", "shared_w1": "shared_w1_weight",
                 "shared_w3": "shared_w3_weight", "shared_w2": "shared_w2_weight", "shared_gate": "shared_gate_weight"}


def expected_attrs(c) -> moe_op.MoEAttrs:
    return moe_op.MoEAttrs(top_k=c.top_k, scoring=c.router, norm_topk_prob=c.norm_topk_prob,
                           num_shared_experts=int(c.shared_expert_hidden > 0), shared_expert_gate=c.shared_expert_gate)


@pytest.mark.parametrize("model_type", VARIANTS)
def test_one_call_per_moe_layer(model_type):
    cfg = variant_config(model_type)
    torch.manual_seed(0)
    mod, names, _ = import_model(MobileMoE(cfg), with_weights=False)
    attrs = expected_attrs(cfg)
    for entry in ENTRY_POINTS:
        func = mod[entry]
        params = {p.name: p for p in func.params}
        calls = [v for v in bindings(func).values() if moe_op.match(v) is not None]
        assert len(calls) == cfg.num_layers, entry
        for i, call in enumerate(calls):
            ops = {r: params[f"p_model_layers_{i}_moe_{PARAM_OF_ROLE[r]}"] for r in attrs.roles() if r != "x"}
            expected = relax.BlockBuilder().normalize(moe_op.make(attrs, {"x": call.args[0], **ops}))
            tvm.ir.assert_structural_equal(call, expected)
        text = func.script()
        assert not any(sub in text for sub in ("nh,eih->nei", "nei,ehi->neh", "neh,ne->nh", "R.topk"))
