"""Helpers for pass tests: import the test model once, build a module and run an entry point."""
import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def imported():
    from compiler.importer import import_model
    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.model import MobileMoE
    torch.manual_seed(0)
    model = MobileMoE(MobileMoEConfig.from_name("test-moe")).eval()
    mod, names, values = import_model(model, kv_cache="grow")  # run_entry feeds a growing cache
    return model, mod, values


def run_entry(mod, values, entry, model, tokens, past, seed=0):
    """Build `mod` for the host (unscheduled), run `entry`; -> (tvm logits, torch-feed tuple)."""
    import tvm
    from tvm import relax

    from compiler.importer import example_feed
    from compiler.params import materialize
    from passes.common import get_transforms, weight_params

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    f = mod[entry]
    names = [p.name for p in weight_params(f)]
    params = materialize(names, get_transforms(f), values)
    c = model.config
    kv = np.random.default_rng(seed).standard_normal((c.num_layers, 2, 1, c.num_kv_heads, past, c.head_dim))
    feed = example_feed(model, entry, tokens, past, kv.astype("float32"))
    out = vm[entry](*[tvm.runtime.tensor(x) for x in feed], *[tvm.runtime.tensor(params[n]) for n in names])
    new_kv = np.stack([out[1 + 2 * i + j].numpy().swapaxes(-1, -2) if j == 0 else out[1 + 2 * i + j].numpy()
                       for i in range(c.num_layers) for j in range(2)])  # keys come transposed
    new_kv = new_kv.reshape(c.num_layers, 2, *new_kv.shape[1:])  # [L, 2, 1, nkv, P+S, D]
    return out[0].numpy(), new_kv, (torch.from_numpy(feed[0]), torch.from_numpy(feed[1]),
                                    torch.from_numpy(kv.astype("float32")))


H, E, I, K = 64, 8, 32, 2  # the MoE of the structural tests: hidden, experts, expert width, top-k


def moe_params(attrs, shared: int = 64) -> dict:
    """{role: relax.Var} of a mobilemoe.moe call's parameters (passes/moe_op.py), named p_<role>."""
    from tvm import relax
    shapes = {"router_weight": [E, H], "router_bias": [E], "w1": [E, I, H], "w3": [E, I, H], "w13": [E, 2 * I, H],
              "w2": [E, H, I], "shared_w1": [shared, H], "shared_w3": [shared, H], "shared_w2": [H, shared],
              "shared_gate": [1, H]}
    return {r: relax.Var(f"p_{r}", relax.TensorType(shapes[r], "float32")) for r in attrs.roles() if r != "x"}


def moe_module(attrs, n="n"):
    """main(x [n, H], *params) = mobilemoe.moe(x, *params): one MoE layer, n tokens (a name: symbolic)."""
    import tvm
    from tvm import relax, tirx

    from passes import moe_op
    n = tirx.Var(n, "int64") if isinstance(n, str) else n
    x = relax.Var("x", relax.TensorType([n, H], "float32"))
    params = moe_params(attrs)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *params.values()], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(moe_op.make(attrs, {"x": x, **params}))
        bb.emit_func_output(y)
    return bb.get()
