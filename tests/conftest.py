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


@pytest.fixture
def tiny_moe():
    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.model import MobileMoE
    torch.manual_seed(0)
    return MobileMoE(MobileMoEConfig.from_name("test-moe")).eval()
