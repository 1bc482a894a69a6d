"""A linux-arm64 artifact of a tiny model runs prefill + decode on the emulated arm64 device through
TVM RPC, and its logits match the host artifact built from the same checkpoint (both INT4): our
test-moe, and a Qwen2-MoE checkpoint that transformers wrote (an imported architecture)."""
import numpy as np
import pytest

pytestmark = pytest.mark.arm64


@pytest.fixture(scope="module", params=["test-moe", "qwen2_moe"])
def artifacts(request):
    """(linux-arm64, host) artifacts of one checkpoint; the host ones and test-moe's linux-arm64 one are
    the session's (tests/conftest.py)."""
    if request.param == "test-moe":
        return request.getfixturevalue("linux_arm64"), request.getfixturevalue("host_int4")
    from compiler.build import build
    ckpt = request.getfixturevalue("qwen2_moe_ckpt")
    return (build(ckpt, "linux-arm64", request.getfixturevalue("tmp_path_factory").mktemp("arm64") / "art",
                  verbose=False),
            request.getfixturevalue("qwen2_moe_host"))


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
