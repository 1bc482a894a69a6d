"""Shared by every test: the source tree on sys.path, torch on at most 2 threads, and the test-moe
checkpoint with the artifacts that many test files build from it, each built once per run
(a TVM build of test-moe takes tens of seconds on 2 cores; tests only read artifacts: one that
changes an artifact copies it first).

`make test` runs 2 pytest-xdist workers (--dist loadfile): a file's tests stay on one worker (its
module fixtures build once; a worker starts its own emulated arm64 device if it gets a file that needs
one), and the session artifacts below are built by whichever worker asks first, under a file lock,
then shared by both.
"""
import fcntl
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "arm64: needs the emulated arm64 device (targets/arm64_device.sh)")


def made_once(tmp_path_factory, name: str, make) -> Path:
    """`make(path)` run once per test run, even across xdist workers (the first one to ask makes it, under
    a file lock; the others wait, then reuse it) -> path."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            make(path)
            done.touch()
    return path


@pytest.fixture
def tiny_moe():
    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.model import MobileMoE
    torch.manual_seed(0)
    return MobileMoE(MobileMoEConfig.from_name("test-moe")).eval()


def _save_test_moe(path):
    from mobilemoe.checkpoint import save_checkpoint
    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.model import MobileMoE
    torch.manual_seed(0)
    save_checkpoint(MobileMoE(MobileMoEConfig.from_name("test-moe")), path)


def _built(tmp_path_factory, ckpt, target, name, **kw) -> Path:
    """The `target` artifact of `ckpt`, built once per run (made_once) beside it: ckpt.parent / f"{ckpt.name}-{name}"."""
    from compiler.build import build
    return made_once(tmp_path_factory, f"{ckpt.name}-{name}",
                     lambda out: build(ckpt, target, out, verbose=False, **kw))


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """test-moe (seed 0), saved once per run; test files that need another model override `ckpt`.
    Its directory is shared: artifacts of the tests' own go under tmp_path (_factory)."""
    return made_once(tmp_path_factory, "test-moe", _save_test_moe)


@pytest.fixture(scope="session")
def host_int4(ckpt, tmp_path_factory):
    """The host INT4 artifact of `ckpt`, with its IR dumps in f"{host_int4}-ir"."""
    return _built(tmp_path_factory, ckpt, "host", "host-int4", dump_ir=ckpt.parent / "test-moe-host-int4-ir")


@pytest.fixture(scope="session")
def linux_arm64(ckpt, tmp_path_factory):
    """The linux-arm64 INT4 artifact of `ckpt` (what the emulated arm64 device runs)."""
    return _built(tmp_path_factory, ckpt, "linux-arm64", "linux-arm64")


@pytest.fixture(scope="session")
def android_arm64(ckpt, tmp_path_factory):
    """The android-arm64 INT4 artifact of `ckpt` (no i8mm)."""
    return _built(tmp_path_factory, ckpt, "android-arm64", "android")


def _save_qwen2_moe(path):
    from tests.arch.hf_models import CHATML, save_tiny
    save_tiny("qwen2_moe", path)
    (path / "chat_template.jinja").write_text(CHATML)


@pytest.fixture(scope="session")
def qwen2_moe_ckpt(tmp_path_factory):
    """transformers' own tiny Qwen2-MoE (tests/arch/hf_models.py, sharded) with a chat template: the
    imported architecture that the default run builds (tests/arch, tests/integration)."""
    pytest.importorskip("transformers")
    return made_once(tmp_path_factory, "qwen2_moe", _save_qwen2_moe)


@pytest.fixture(scope="session")
def qwen2_moe_host(qwen2_moe_ckpt, tmp_path_factory):
    """The host INT4 artifact of qwen2_moe_ckpt."""
    return _built(tmp_path_factory, qwen2_moe_ckpt, "host", "host")
