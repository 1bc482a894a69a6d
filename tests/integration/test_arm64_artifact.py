"""A linux-arm64 artifact of a tiny model runs prefill + decode on the emulated arm64 device through
TVM RPC, and its logits match the host artifact built from the same checkpoint (both INT4): our
test-moe, and a Qwen2-MoE checkpoint that transformers wrote (an imported architecture)."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.arm64


@pytest.fixture(scope="module", params=["test-moe", "qwen2_moe"])
def artifacts(tmp_path_factory, request):
    from compiler.build import build
    from mobilemoe.checkpoint import save_checkpoint
    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.model import MobileMoE

    root = tmp_path_factory.mktemp("arm64")
    torch.manual_seed(0)
    if request.param == "test-moe":
        ckpt = save_checkpoint(MobileMoE(MobileMoEConfig.from_name("test-moe")), root / "ckpt")
    else:
        pytest.importorskip("transformers")
        from tests.arch.hf_models import save_tiny
        ckpt = save_tiny(request.param, root / "ckpt")
    return (build(ckpt, "linux-arm64", root / "arm64", verbose=False),
            build(ckpt, "host", root / "host", verbose=False))


def test_linux_arm64_artifact_matches_host(arm64_device, artifacts):
    from mobilemoe.runtimes.tvm_rpc import RemoteRuntime
    from mobilemoe.runtimes import load_artifact

    arm64_dir, host_dir = artifacts
    host = load_artifact(host_dir)
    session = arm64_device.request_session(timeout=120)
    remote = RemoteRuntime(session, arm64_dir)
    prompt = [0, 17, 42, 99, 7, 300]
    r_logits, r_kv = remote.prefill(prompt)
    h_logits, h_kv = host.prefill(prompt)
    np.testing.assert_allclose(r_logits, h_logits, atol=1e-4, rtol=1e-4)
    for token in (5, 11, 23):  # decode steps on the device's own KV cache
        r_logits, r_kv = remote.decode(token, r_kv)
        h_logits, h_kv = host.decode(token, h_kv)
        np.testing.assert_allclose(r_logits, h_logits, atol=1e-4, rtol=1e-4)
    assert int(r_kv.shape[4]) == len(prompt) + 3
    np.testing.assert_allclose(r_kv.numpy(), h_kv.numpy(), atol=1e-4, rtol=1e-4)
