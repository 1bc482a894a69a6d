"""The host target links lib.so with zig cc (the ziglang wheel), not the system's `cc`: a fresh machine
without a C compiler builds and runs host artifacts (`make demo` does)."""
import numpy as np

from compiler.build import build
from mobilemoe.runtimes import load_artifact
from targets.host import host_toolchain


def test_zig_for_linux_hosts_default_cc_elsewhere():
    assert host_toolchain("linux", "x86_64").zig_target == "x86_64-linux-gnu.2.17"
    assert host_toolchain("linux", "aarch64").zig_target == "aarch64-linux-gnu.2.17"
    assert "-shared" in host_toolchain("linux", "AMD64").flags
    assert host_toolchain("darwin", "arm64") is None and host_toolchain("linux", "riscv64") is None


def test_host_build_needs_no_compiler_on_path(ckpt, host_int4, tmp_path, monkeypatch):
    """PATH empty: no cc, gcc, clang or ld to find; the artifact links, loads and gives the shared host artifact's logits."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    art = build(ckpt, "host", tmp_path / "host", verbose=False)
    got, ref = load_artifact(art), load_artifact(host_int4)
    ids = [1, 5, 9, 2]
    a, _ = got.prefill(ids)
    b, _ = ref.prefill(ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
