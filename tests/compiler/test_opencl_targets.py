"""android-adreno / android-mali: the test model builds through the GPU lowering; lib.so is an
AArch64 shared object with the OpenCL kernels' source embedded (no OpenCL runtime here to run it)."""
import re
import subprocess

import pytest
import torch

from targets import get_target


@pytest.fixture(scope="module")
def model():
    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.model import MobileMoE
    torch.manual_seed(0)
    return MobileMoE(MobileMoEConfig.from_name("test-moe")).eval()


def test_specs_are_opencl_with_an_android_host():
    for name, device in (("android-adreno", "adreno"), ("android-mali", "mali")):
        spec = get_target(name)
        target = spec.tvm_target()
        assert spec.lowering == "gpu" and target.kind.name == "opencl" and str(target.attrs["device"]) == device
        assert target.host.kind.name == "llvm" and str(target.host.attrs["mtriple"]) == "aarch64-linux-android"
        assert spec.json()["host"]["mtriple"] == "aarch64-linux-android"


@pytest.mark.parametrize("target_name", ["android-adreno", "android-mali"])
def test_build_embeds_opencl_source_and_links(model, target_name, tmp_path):
    from compiler.build import compile_model

    spec = get_target(target_name)
    executable, params, entries, pipeline, _ = compile_model(model, target_name, random_weights=True)
    todo, opencl = [executable.mod], []
    while todo:  # the device module hangs off the host (llvm) library
        m = todo.pop()
        opencl += [m] if m.kind == "opencl" else []
        todo += list(m.imports)
    assert len(opencl) == 1
    source = opencl[0].inspect_source()
    kernels = set(re.findall(r"__kernel void ([A-Za-z0-9_]+)\(", source))
    # the INT4 expert GEMVs, attention's matmuls and softmax, the INT4 embedding lookup. (int4_matmul,
    # whose tile + tail blocks no dlight GPU rule schedules, is compiled for the host CPU for now.)
    for name in ("moe_gemv_int4", "moe_gemv_weighted_sum_int4", "matmul", "softmax", "embedding_int4"):
        assert any(k.startswith(name) for k in kernels), (name, sorted(kernels)[:20])
    schedule = next(p for p in pipeline if p["phase"] == "schedule")["passes"]
    assert "ScheduleInt4Kernels" not in schedule and "ApplyDefaultSchedule" in schedule

    lib = tmp_path / "lib.so"
    spec.export(executable, lib)
    r = subprocess.run(["readelf", "-h", "-d", str(lib)], capture_output=True, text=True, check=True)
    assert "AArch64" in r.stdout and "DYN (Shared object file)" in r.stdout
    assert "Shared library: [libtvm_runtime.so]" in r.stdout
    data = lib.read_bytes()
    assert b"__kernel void moe_gemv_int4" in data  # the source the phone's OpenCL driver compiles
