"""Cross-compile for aarch64, run over RPC on the emulated arm64 device, check against numpy.

Also: a device that drops off mid-session, and an unreachable tracker, give a DeviceError naming
the device (no hang, no 60 s retry loop).
"""

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from targets.rpc_device import DeviceError, remote_errors, request_session, state_dir, upload_and_load

TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
D_IN, D_OUT = 64, 32


def _softmax_silu_ref(x, w):
    h = x @ w
    h = h / (1.0 + np.exp(-h))  # silu
    e = np.exp(h - h.max(-1, keepdims=True))
    return h, e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def aarch64_lib(tmp_path_factory) -> Path:
    """A Relax module with a dynamic first dim, built for aarch64 and linked by linux-arm64's toolchain
    (zig cc from the ziglang wheel: no system cross compiler)."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.script import ir as I  # pylint: disable=import-outside-toplevel
    from tvm.script import relax as R  # pylint: disable=import-outside-toplevel

    from targets import get_target  # pylint: disable=import-outside-toplevel

    # pylint: disable=invalid-name,missing-class-docstring,no-self-argument
    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor(("n", D_IN), "float32"), w: R.Tensor((D_IN, D_OUT), "float32")):
            with R.dataflow():
                h = R.nn.silu(R.matmul(x, w))  # [n, 64] @ [64, 32] -> [n, 32]
                p = R.nn.softmax(h, axis=-1)
                R.output(p)
            return p

        @R.function
        def sort(h: R.Tensor(("n", D_OUT), "float32")):
            with R.dataflow():
                idx = R.argsort(h, axis=-1, dtype="int32")  # extern sort: libtvm_runtime_extra
                R.output(idx)
            return idx

    path = tmp_path_factory.mktemp("arm64") / "relax_aarch64.so"
    exe = tvm.compile(Model, target=tvm.target.Target(TARGET))
    exe.export_library(str(path), fcompile=get_target("linux-arm64").toolchain.fcompile())
    return path


@pytest.mark.arm64
def test_relax_module_runs_on_arm64_device(arm64_device, aarch64_lib):
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    sess = arm64_device.request_session(timeout=60)
    dev = sess.cpu(0)
    vm = relax.VirtualMachine(upload_and_load(sess, aarch64_lib), dev)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((D_IN, D_OUT), dtype=np.float32)
    w_dev = tvm.runtime.tensor(w, dev)
    for n in (1, 5, 17):  # one build, several lengths of the dynamic dim
        x = rng.standard_normal((n, D_IN), dtype=np.float32)
        h, ref = _softmax_silu_ref(x, w)
        out = vm["main"](tvm.runtime.tensor(x, dev), w_dev).numpy()
        assert out.shape == (n, D_OUT)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)

        idx = vm["sort"](tvm.runtime.tensor(h.astype(np.float32), dev)).numpy()
        assert idx.dtype == np.int32 and idx.shape == (n, D_OUT)
        np.testing.assert_array_equal(np.take_along_axis(h, idx.astype(np.int64), -1),
                                      np.sort(h.astype(np.float32), -1))


@pytest.mark.arm64
def test_killed_server_gives_clear_error(arm64_device, aarch64_lib):
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    sess = arm64_device.request_session(timeout=60)
    dev = sess.cpu(0)
    vm = relax.VirtualMachine(upload_and_load(sess, aarch64_lib), dev)
    x = tvm.runtime.tensor(np.ones((64, D_IN), np.float32), dev)
    w = tvm.runtime.tensor(np.ones((D_IN, D_OUT), np.float32), dev)
    # a remote call that keeps the device busy for >= 60 s unless the device goes away
    timer = vm.time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=60_000)
    outcome = {}

    def call():
        try:
            with remote_errors(sess, "time_evaluator(main)"):
                timer(x, w)
        except BaseException as err:  # pylint: disable=broad-except
            outcome["error"] = err

    worker = threading.Thread(target=call, daemon=True)
    try:
        worker.start()
        time.sleep(2.0)  # the call is now running on the device
        assert worker.is_alive(), f"the remote call ended early: {outcome}"
        t0 = time.monotonic()
        arm64_device.kill_server()
        worker.join(30)
        assert not worker.is_alive(), "remote call still blocked 30 s after the server was killed"
        err = outcome.get("error")
        assert isinstance(err, DeviceError), f"expected DeviceError, got {err!r}"
        assert arm64_device.key in str(err) and "session is lost" in str(err)
        assert time.monotonic() - t0 < 15

        # the tracker is up but the device is gone: a bounded wait, then an error naming both
        with pytest.raises(DeviceError) as info:
            request_session(arm64_device.tracker_host, arm64_device.tracker_port,
                            arm64_device.key, timeout=3)
        where = f"{arm64_device.tracker_host}:{arm64_device.tracker_port}"
        assert where in str(info.value) and f"'{arm64_device.key}'" in str(info.value)
    finally:
        arm64_device.start()  # bring the server back for later tests in this session


def test_unreachable_tracker_and_wrong_library_fail_fast(tmp_path):
    import socket  # pylint: disable=import-outside-toplevel

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=f"127.0.0.1:{port} is not reachable"):
        request_session("127.0.0.1", port, "arm64-qemu", timeout=30)
    assert time.monotonic() - t0 < 5

    host_elf = Path(sys.executable).resolve()  # an x86_64 ELF, not an aarch64 library
    with pytest.raises(ValueError, match="expected AArch64"):
        upload_and_load(object(), host_elf)
    with pytest.raises(FileNotFoundError):
        upload_and_load(object(), tmp_path / "missing.so")


def test_state_dir_is_a_per_user_cache_entry_named_by_its_contents(monkeypatch, tmp_path):
    """Set up once per user (not per clone): $MOBILEMOE_CACHE/arm64-device/KEY, KEY hashing the versions
    it holds; $ARM64_ROOT names the dir itself."""
    monkeypatch.delenv("ARM64_ROOT", raising=False)
    monkeypatch.setenv("MOBILEMOE_CACHE", str(tmp_path))
    d = state_dir()
    assert d.parent == tmp_path / "arm64-device" and len(d.name) == 16 and not d.exists()
    monkeypatch.setenv("ARM64_ROOT", str(tmp_path / "mine"))
    assert state_dir() == tmp_path / "mine"
