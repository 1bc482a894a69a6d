"""Fixtures shared by the compiler tests: one test-moe checkpoint and one host TVM artifact per session."""
import pytest
import torch

from compiler.build import build
from mobilemoe.checkpoint import save_checkpoint
from mobilemoe.config import MobileMoEConfig
from mobilemoe.model import MobileMoE


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("build")
    return save_checkpoint(MobileMoE(MobileMoEConfig.from_name("test-moe")), root / "ckpt")


@pytest.fixture(scope="session")
def host_int4(ckpt):
    return build(ckpt, "host", ckpt.parent / "host-int4", dump_ir=ckpt.parent / "ir", verbose=False)

