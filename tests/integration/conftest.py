"""Integration tests: real servers (RPC tracker, emulated arm64 device), real toolchains.

Markers:  arm64 - needs the emulated arm64 device (targets/arm64_device.sh); slow - takes minutes.
The device is set up by `targets/arm64_device.sh setup` (once, ~1 min, needs root for apt) or by the
`arm64_device` fixture itself when MOBILEMOE_ARM64=1 (CI); otherwise arm64 tests skip.
The `local_rpc` fixture (targets/local_rpc.py: a loopback tracker + an x86 rpc_server) needs nothing.
"""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `targets` etc. without an editable install
    sys.path.insert(0, str(REPO))


def pytest_configure(config):
    config.addinivalue_line("markers", "arm64: needs the emulated arm64 RPC device "
                            "(targets/arm64_device.sh setup, or MOBILEMOE_ARM64=1)")
    config.addinivalue_line("markers", "slow: takes minutes; deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def arm64_device():
    """A running EmulatedArm64Device (private tracker + qemu arm64 RPC server) for the session."""
    from targets.rpc_device import EmulatedArm64Device  # pylint: disable=import-outside-toplevel

    device = EmulatedArm64Device()
    problem = device.setup_problem()
    if problem and os.environ.get("MOBILEMOE_ARM64") == "1" and os.geteuid() != 0 and "host tools" in problem:
        pytest.skip(f"emulated arm64 device: its host tools come from apt, which needs root. {problem}")
    if problem and os.environ.get("MOBILEMOE_ARM64") != "1":
        pytest.skip("emulated arm64 device not set up; enable with `targets/arm64_device.sh setup` "
                    f"(once, ~1 min, root for apt) or MOBILEMOE_ARM64=1 to set it up here. {problem}")
    device.setup_first = problem is not None  # setup is a no-op when already complete
    with device:
        yield device



@pytest.fixture(scope="session")
def local_rpc():
    """A loopback tracker + an rpc_server of this machine (targets/local_rpc.py), for the session."""
    from targets.local_rpc import LocalRpcDevice  # pylint: disable=import-outside-toplevel

    with LocalRpcDevice() as device:
        yield device
