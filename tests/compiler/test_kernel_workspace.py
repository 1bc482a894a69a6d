"""No workspace allocation inside the parallel bodies of the INT4 dot kernels (int4_dot._STACK_NOTE).

TVM 0.27 gives a buffer of a parallel body that is not in the "global" scope (``T.alloc_local``
included) a TVMBackendAllocWorkspace / FreeWorkspace pair per ITERATION, i.e. per 8-row block of
weights: int4_dot_gemm's m = 1 remainder (every decode GEMV) allocated its accumulator and token
index that way, four pool calls per 4 KiB of weights, and decoded ~9% slower (moe-1b-32k, Zen 3).
Checked here in the LLVM IR TVM emits: the parallel lambdas must not load the allocator's pointer.
"""
import re

import pytest
import tvm
from tvm.target import Target

from tir_kernels import int4_dot, int4_dot_gemm

TARGETS = {  # one ISA per kernel layout: row lanes (AVX2), word lanes (VNNI, arm64 dotprod)
    "avx2": (Target({"kind": "llvm", "mcpu": "znver3"}), int4_dot.X86_AVX2),
    "vnni": (Target({"kind": "llvm", "mcpu": "icelake-server"}), int4_dot.X86_VNNI),
    "dotprod": (Target({"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon", "+dotprod"]}),
                int4_dot.ARM_DOTPROD),
}
KERNELS = {
    "int4_matmul_dot": lambda isa: int4_dot.int4_matmul_dot(64, 256, isa),
    "int4_matmul_dot_tiled": lambda isa: int4_dot_gemm.int4_matmul_dot_tiled(64, 256, isa),
    "moe_gemv_dot": lambda isa: int4_dot.moe_gemv_dot(4, 64, 256, 2, isa),
    "moe_gemv_weighted_sum_dot": lambda isa: int4_dot.moe_gemv_weighted_sum_dot(4, 64, 256, 2, isa),
    "moe_grouped_gate_up": lambda isa: int4_dot_gemm.moe_grouped_dot("gate_up", 4, 64, 256, 2, isa),
    "moe_grouped_down_combine": lambda isa: int4_dot_gemm.moe_grouped_dot("down_combine", 4, 64, 256, 2, isa),
}


def workspace_loads(ll: str) -> dict[str, int]:
    """{LLVM function: loads of @__TVMBackendAllocWorkspace (one per allocation site)}."""
    counts, fn = {}, None
    for line in ll.splitlines():
        m = re.match(r"define [^@]*@([\w.]+)\(", line)
        if m:
            fn = m.group(1)
        elif fn and "load" in line and "@__TVMBackendAllocWorkspace" in line:
            counts[fn] = counts.get(fn, 0) + 1
    return counts


@pytest.mark.parametrize("isa_name", TARGETS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_parallel_bodies_allocate_nothing(kernel, isa_name):
    target, isa = TARGETS[isa_name]
    func = KERNELS[kernel](isa)
    ll = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).mod \
        .inspect_source("ll")
    counts = workspace_loads(ll)
    assert any(f.startswith("__tvm_parallel_lambda") for f in re.findall(r"define [^@]*@([\w.]+)\(", ll)), \
        "no parallel body: the kernel changed shape; this check then needs another reading"
    inside = {f: n for f, n in counts.items() if f.startswith("__tvm_parallel_lambda")}
    assert not inside, f"{kernel} ({isa_name}): workspace allocations per parallel iteration: {inside}"


def test_workspace_loads_sees_an_allocation():
    """The reading itself: a local buffer in a parallel body IS found (so the test above can fail)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def func(a: T.Buffer((64, 8), "float32"), b: T.Buffer((64,), "float32")):
        for i in T.parallel(64):
            acc = T.alloc_local((8,), "float32")
            for j in range(8):
                acc[j] = a[i, j] * T.float32(2)
            b[i] = acc[0] + acc[7]

    ll = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                     target=TARGETS["avx2"][0]).mod.inspect_source("ll")
    assert any(f.startswith("__tvm_parallel_lambda") for f in workspace_loads(ll))
