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


# Issue 5 (tuning sessions, OpenCL targets) is still open: these tests describe behaviour that does
# not work yet. They run and report XFAIL until the issue lands; strict=False so a fix shows as XPASS.
_ISSUE5_OPEN = ("test_opencl_targets.py::test_build_embeds_opencl_source_and_links",
                "test_tune.py::test_tuned_build_applies_database_with_same_numerics",
                "test_tune.py::test_a_bucket_record_replays_on_the_dynamic_kernel")


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        if any(key in item.nodeid for key in _ISSUE5_OPEN):
            item.add_marker(pytest.mark.xfail(reason="issue 5 open: tuned/OpenCL builds not finished", strict=False))
