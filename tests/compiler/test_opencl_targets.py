"""android-adreno / android-mali: the test model builds through the GPU lowering; every kernel the
model calls is an OpenCL kernel (none left in the host library), lib.so is an AArch64 shared
object with the OpenCL source embedded; every emitted kernel compiles on POCL, and the INT4 expert
GEMVs and the INT4 matmul, scheduled as the build schedules them, match numpy on POCL."""
import re
import subprocess

import numpy as np
import pytest
import torch

from targets import get_target
from tests.compiler.pocl_runner import build_sections, opencl_sections, pocl_context, run_static_kernel

GPU_TARGETS = ["android-adreno", "android-mali"]


@pytest.fixture(scope="module")
def model():
    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.model import MobileMoE
    torch.manual_seed(0)
    return MobileMoE(MobileMoEConfig.from_name("test-moe")).eval()


@pytest.fixture(scope="module")
def compiled(model):
    """{target: (executable, pipeline phases, report, OpenCL source)}, each built once."""
    from compiler.backends.tvm import compile_model
    out = {}
    for name in GPU_TARGETS:
        report = {}
        executable, _, _, pipeline, _ = compile_model(model, get_target(name), random_weights=True, report=report)
        todo, opencl = [executable.mod], []
        while todo:  # the device module hangs off the host (llvm) library
            m = todo.pop()
            opencl += [m] if m.kind == "opencl" else []
            todo += list(m.imports)
        assert len(opencl) == 1, name
        out[name] = (executable, pipeline, report, opencl[0].inspect_source())
    return out


@pytest.fixture(scope="module")
def pocl():
    ctx = pocl_context()
    if ctx is None:
        pytest.skip("pyopencl with POCL is not installed (pip install -e '.[test]')")
    return ctx


def test_inplace_kv_cache_is_refused_on_gpu_targets(model):
    from compiler.backends.tvm import compile_model
    from targets import TargetError
    with pytest.raises(TargetError, match="--kv-cache inplace: .* CPU schedules only; target 'android-adreno'"):
        compile_model(model, get_target("android-adreno"), random_weights=True, kv_cache="inplace")


def test_specs_are_opencl_with_an_android_host():
    for name, device in (("android-adreno", "adreno"), ("android-mali", "mali")):
        spec = get_target(name)
        target = spec.tvm_target()
        assert spec.strategy.name == "gpu" and target.kind.name == "opencl" and str(target.attrs["device"]) == device
        assert target.host.kind.name == "llvm" and str(target.host.attrs["mtriple"]) == "aarch64-linux-android"
        assert spec.json()["host"]["mtriple"] == "aarch64-linux-android"


@pytest.mark.parametrize("target_name", GPU_TARGETS)
def test_build_embeds_opencl_source_and_links(compiled, target_name, tmp_path):
    spec = get_target(target_name)
    executable, pipeline, report, source = compiled[target_name]
    kernels = set(re.findall(r"__kernel void ([A-Za-z0-9_]+)\(", source))
    # every kernel an entry point calls runs on the GPU: an unscheduled one would be compiled into the
    # host library and read OpenCL buffers through host pointers
    called = {k for calls in report["kernel_calls"].values() for k, _, _ in calls}
    assert {"int4_matmul", "moe_gemv_int4", "moe_gemv_weighted_sum_int4", "embedding_int4"} <= called
    on_host = sorted(k for k in called if f"{k}_kernel" not in kernels)
    assert not on_host, f"kernels compiled for the host CPU, not OpenCL: {on_host}"
    schedule = next(p for p in pipeline if p["phase"] == "schedule")["passes"]
    assert "ScheduleInt4Kernels" not in schedule and schedule[:2] == ["UseGpuInt4Matmul", "ApplyDefaultSchedule"]

    lib = tmp_path / "lib.so"
    spec.export(executable, lib)
    r = subprocess.run(["readelf", "-h", "-d", str(lib)], capture_output=True, text=True, check=True)
    assert "AArch64" in r.stdout and "DYN (Shared object file)" in r.stdout
    assert "Shared library: [libtvm_runtime.so]" in r.stdout
    data = lib.read_bytes()
    assert b"__kernel void moe_gemv_int4" in data and b"__kernel void int4_matmul" in data


@pytest.mark.parametrize("target_name", GPU_TARGETS)
def test_every_emitted_kernel_compiles_on_pocl(compiled, pocl, target_name):
    sections = opencl_sections(compiled[target_name][3])
    assert len(sections) > 50 and "moe_gemv_int4_kernel" in sections and "int4_matmul_kernel" in sections
    assert build_sections(pocl, sections) == {}


def _int4_weights(shape, rng):
    """(packed uint32 [..., N, K/8], scales fp16 [..., N, K/32], dequantized fp32 [..., N, K])."""
    from mobilemoe.quant import dequantize_int4, pack_int4, quantize_int4
    codes, scales = quantize_int4(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)))
    return pack_int4(codes).numpy(), scales.numpy(), dequantize_int4(codes, scales).numpy()


def _gpu_scheduled(prim, dims: dict, target_name: str):
    """`prim` with its dims bound, scheduled by the build's GPU schedule phase (int4_matmul swapped)."""
    import tvm

    from compiler.pipeline import PipelineOptions, default_schedule
    from passes.kernel_workloads import specialize

    spec = get_target(target_name)
    size = {v.name: v for p in prim.params if hasattr(p, "shape") for v in p.shape if isinstance(v, tvm.tirx.Var)}
    func = specialize(prim, {size[k]: v for k, v in dims.items()}).with_attr("global_symbol", "main")
    target = spec.tvm_target()
    with target:
        mod = tvm.transform.Sequential(default_schedule(PipelineOptions(strategy=spec.strategy)))(
            tvm.IRModule({"main": func}))
    assert mod["main"].attrs.get("tirx.is_scheduled"), "the GPU rules left the kernel unscheduled"
    return mod["main"], target


@pytest.mark.parametrize("target_name", GPU_TARGETS)
def test_int4_expert_gemvs_on_pocl_match_numpy(pocl, target_name):
    from tir_kernels import moe_gemv, moe_gemv_weighted_sum
    rng = np.random.default_rng(0)
    experts, n, k, top_k, tokens = 6, 48, 128, 2, 3
    w, s, ref_w = _int4_weights((experts, n, k), rng)
    ids = np.array([[0, 5], [3, 1], [5, 2]], dtype=np.int64)
    x = rng.standard_normal((tokens, k)).astype(np.float32)

    func, target = _gpu_scheduled(moe_gemv(experts, n, k, top_k, "int64"), {"t": tokens}, target_name)
    y = run_static_kernel(pocl, func, target, {"x": x, "ids": ids, "w": w, "s": s,
                                               "y": np.zeros((tokens, top_k, n), np.float32)})["y"]
    np.testing.assert_allclose(y, np.einsum("tk,tjnk->tjn", x, ref_w[ids]), rtol=1e-4, atol=1e-4)

    xs = rng.standard_normal((tokens, top_k, k)).astype(np.float32)
    rw = rng.random((tokens, top_k)).astype(np.float32)
    func, target = _gpu_scheduled(moe_gemv_weighted_sum(experts, n, k, top_k, "int64"), {"t": tokens}, target_name)
    y = run_static_kernel(pocl, func, target, {"x": xs, "ids": ids, "rw": rw, "w": w, "s": s,
                                               "y": np.zeros((tokens, n), np.float32)})["y"]
    np.testing.assert_allclose(y, np.einsum("tj,tjk,tjnk->tn", rw, xs, ref_w[ids]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5])
def test_int4_matmul_on_pocl_matches_numpy(pocl, rows):
    from tir_kernels import int4_matmul
    from passes.use_gpu_int4_matmul import UseGpuInt4Matmul
    import tvm

    rng = np.random.default_rng(rows)
    n, k = 80, 96
    w, s, ref_w = _int4_weights((n, k), rng)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    prim = UseGpuInt4Matmul()(tvm.IRModule({"f": int4_matmul(n, k)}))["f"]
    func, target = _gpu_scheduled(prim, {"m": rows}, "android-adreno")
    y = run_static_kernel(pocl, func, target, {"x": x, "w": w, "s": s, "y": np.zeros((rows, n), np.float32)})["y"]
    np.testing.assert_allclose(y, x @ ref_w.T, rtol=1e-4, atol=1e-4)


def test_guard_spots_a_declaration_inside_an_expression():
    """TVM 0.27's OpenCL codegen bug the GPU rule guard rejects (seen on the attention einsum p.V)."""
    from passes.kernel_workloads import STATEMENT_IN_EXPRESSION
    bad = "  vstore8(acc[0], 0, out + ((((      long rmod_23 = ((convert_long(get_group_id(1))) % n);"
    good = ["    long rmod_16 = ((convert_long(get_group_id(1))) % cse_v4);",
            "    for (int k = 0; k < 16; ++k) {", "    float x = (a + b);"]
    assert STATEMENT_IN_EXPRESSION.search(bad)
    assert not any(STATEMENT_IN_EXPRESSION.search(line) for line in good)
