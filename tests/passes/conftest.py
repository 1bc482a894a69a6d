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
    mod, names, values = import_model(model)
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
    feed = example_feed(model, entry, tokens, past)
    feed = (feed[0], feed[1], np.random.default_rng(seed).standard_normal(feed[2].shape).astype("float32"))
    out = vm[entry](*[tvm.runtime.tensor(x) for x in feed], *[tvm.runtime.tensor(params[n]) for n in names])
    return out[0].numpy(), out[1].numpy(), tuple(torch.from_numpy(x) for x in feed)
