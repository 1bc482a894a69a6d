"""Budgeted artifacts (compiler.build --memory-budget-mb) over TVM RPC: the expert cache lives in the
RPC server (python -m mobilemoe.runtimes.rpc_server), where the graph's callback runs.

On this machine's loopback server: the same logits, tokens and cache statistics as the local runtime.
On the emulated arm64 device: identical tokens (logits within 1e-5) to the fully resident arm64
artifact at 100%, 50% and the minimum budget (slow: four arm64 builds and the runs under qemu,
4.2 min in all at load 4-7 on the 2-core machine)."""
import gc

import numpy as np
import pytest
import torch

from compiler.build import build
from compiler.residency import budget_mb_for
from mobilemoe.checkpoint import save_checkpoint
from mobilemoe.config import MobileMoEConfig
from mobilemoe.model import MobileMoE
from mobilemoe.runtimes import load_artifact
from mobilemoe.runtimes.tvm_rpc import RemoteExpertCache, RemoteRuntime
from tests.runtime_helpers import logits_trace

CFG = MobileMoEConfig.from_name("test-moe")
ALL = CFG.num_layers * CFG.num_experts
BUDGETS = {"100%": ALL, "50%": ALL // 2, "minimum": CFG.top_k}
PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(MobileMoE(CFG), tmp_path_factory.mktemp("residency-rpc") / "ckpt")



def test_budgeted_artifact_over_rpc_runs_its_cache_in_the_server(local_rpc, ckpt):
    out = build(ckpt, "host", ckpt.parent / "host-50", verbose=False, memory_budget_mb=budget_mb_for(CFG, ALL // 2))
    here = load_artifact(out)
    remote = RemoteRuntime(local_rpc.request_session(timeout=60), out)
    assert isinstance(remote.experts, RemoteExpertCache) and remote.experts.max_tokens == here.experts.max_tokens
    # same kernels, same machine: bit for bit
    np.testing.assert_array_equal(logits_trace(remote, PROMPT, 10), logits_trace(here, PROMPT, 10))
    assert remote.experts.stats() == here.experts.stats() and here.experts.stats()["misses"] > 0
    remote.experts.reset_stats()
    assert remote.generate(PROMPT, 12)[0] == here.generate(PROMPT, 12)[0]
    assert remote.experts.stats()["hits"] > 0
    del remote
    gc.collect()  # the session ends: the server is free for the next test


@pytest.mark.arm64
@pytest.mark.slow
def test_identical_tokens_on_the_arm64_device(arm64_device, ckpt):
    root = ckpt.parent
    ref_dir = build(ckpt, "linux-arm64", root / "arm64-resident", verbose=False)
    budgeted = {name: build(ckpt, "linux-arm64", root / f"arm64-{n}", verbose=False,
                            memory_budget_mb=budget_mb_for(CFG, n)) for name, n in BUDGETS.items()}
    session = arm64_device.request_session(timeout=120)
    ref = RemoteRuntime(session, ref_dir)
    want, want_tokens = logits_trace(ref, PROMPT, 10), ref.generate(PROMPT, 12)[0]
    for name, out in budgeted.items():
        rt = RemoteRuntime(session, out)
        # the grouped prefill sums a token's experts in slot order, not expert order: rounding only
        np.testing.assert_allclose(logits_trace(rt, PROMPT, 10), want, rtol=0, atol=1e-5, err_msg=name)
        assert rt.generate(PROMPT, 12)[0] == want_tokens, name
        s = rt.experts.stats()
        assert s["misses"] > 0 and s["slots"] == BUDGETS[name], (name, s)
        if name == "minimum":  # one layer's top-k at a time: the prompt went one token per call
            assert rt.experts.max_tokens == 1
