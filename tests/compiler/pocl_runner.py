"""TVM's OpenCL kernels on POCL (portable OpenCL on this CPU) through pyopencl, for the tests.

    ctx = pocl_context()                               # None when pyopencl / POCL is missing
    sections = opencl_sections(source)                 # {kernel: program text}, as TVM's runtime
    errors = build_sections(ctx, sections)             #   compiles them: one program per kernel
    outputs = run_static_kernel(ctx, func, target, {"x": x, "w": w, ..., "y": zeros})

TVM's OpenCL source (`module.inspect_source()`) holds one section per kernel ("// Function: NAME"):
an fp16 preamble, the prototypes of every kernel, and that kernel. POCL's CPU driver has no
cl_khr_fp16 (half arithmetic), which phone drivers have; our kernels read their fp16 scales as
`convert_float(s_ptr[i])`. For POCL (`for_pocl`) those loads become `vload_half(i, s_ptr)`, core
OpenCL's read of half storage, and the preamble's `#error` for a device without fp16 goes; nothing
else changes. A store into a half buffer would need the extension: for_pocl refuses it.
"""
from __future__ import annotations

import re

import numpy as np

SECTION = re.compile(r"^// Function: (\w+)$", re.M)
SIGNATURE = r"__kernel void {name}\(([^)]*)\)\s*\{{"
FP16_PREAMBLE = re.compile(r"#ifdef cl_khr_fp16\n.*?#endif\n", re.S)
CL_DTYPES = {"float": np.float32, "half": np.float16, "uint": np.uint32, "int": np.int32, "long": np.int64,
             "char": np.int8, "uchar": np.uint8, "bool": np.bool_}


def pocl_context():
    """A pyopencl context on POCL's CPU device, or None (pyopencl or POCL not installed)."""
    try:
        import pyopencl as cl
        platforms = [p for p in cl.get_platforms() if "Portable Computing Language" in p.name]
    except Exception:  # noqa: BLE001 - no ICD loader, no platform: both mean no POCL
        return None
    return cl.Context(platforms[0].get_devices()) if platforms else None


def opencl_sections(source: str) -> dict[str, str]:
    """{kernel name: its section of the source}."""
    marks = list(SECTION.finditer(source))
    ends = [m.start() for m in marks[1:]] + [len(source)]
    return {m.group(1): source[m.start():end] for m, end in zip(marks, ends)}


def _close(text: str, start: int) -> int:
    """Index of the "]" that closes the "[" at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced [ at {start}")


def for_pocl(section: str) -> str:
    """The section with half loads as vload_half and no fp16 #error preamble (see module doc)."""
    text = FP16_PREAMBLE.sub("", section)
    for name in sorted(set(re.findall(r"__global half\* restrict (\w+)", text))):
        out, pos = [], 0
        for m in re.finditer(rf"\b{name}\[", text):
            if m.start() < pos:
                continue
            end = _close(text, m.end() - 1)
            if re.match(r"\s*=[^=]", text[end + 1:end + 4]):
                raise ValueError(f"{name}: a store into a half buffer needs cl_khr_fp16")
            out += [text[pos:m.start()], f"vload_half({text[m.end():end]}, {name})"]
            pos = end + 1
        text = "".join(out) + text[pos:]
    return text


def build_sections(ctx, sections: dict[str, str]) -> dict[str, str]:
    """Build each section as its own program on POCL; -> {kernel: first error line} of failures."""
    import pyopencl as cl
    errors = {}
    for name, text in sections.items():
        try:
            cl.Program(ctx, for_pocl(text)).build()
        except Exception as err:  # noqa: BLE001 - cl.RuntimeError with the build log
            lines = [ln for ln in str(err).splitlines() if "error" in ln.lower()]
            errors[name] = (lines or [str(err)])[0][:300]
    return errors


def _launch(func) -> tuple[list[int], list[int]]:
    """(global size, local size) of a scheduled static kernel, from its thread-bound loops."""
    import tvm
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    extents, todo = {}, [sch.get_sblock("root", "main")]
    while todo:
        for block in sch.get_child_blocks(todo.pop()):
            for loop in map(sch.get, sch.get_loops(block)):
                if loop.kind == tvm.tirx.ForKind.THREAD_BINDING:
                    extents[loop.thread_binding.thread_tag] = int(loop.extent)
            todo.append(block)
    local = [extents.get(f"threadIdx.{a}", 1) for a in "xyz"]
    groups = [extents.get(f"blockIdx.{a}", 1) for a in "xyz"]
    return [g * t for g, t in zip(groups, local)], local


def run_static_kernel(ctx, func, target, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Compile a scheduled, statically shaped PrimFunc for the OpenCL `target` with TVM, run its one
    kernel on POCL with `arrays` (by buffer name, outputs included), -> every buffer after the run."""
    import pyopencl as cl
    import tvm

    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    todo, source = [ex.mod], None
    while todo:
        m = todo.pop()
        source = m.inspect_source() if m.kind == "opencl" else source
        todo += list(m.imports)
    sections = opencl_sections(source)
    assert list(sections) == ["main_kernel"], f"expected one kernel, got {list(sections)}"
    text = for_pocl(sections["main_kernel"])
    params = re.search(SIGNATURE.format(name="main_kernel"), text).group(1).split(",")
    queue = cl.CommandQueue(ctx)
    bufs, outs = [], {}
    for param in params:
        m = re.fullmatch(r"\s*__global (\w+)\* restrict (\w+)_ptr\s*", param)
        if m is None:
            raise ValueError(f"main_kernel: parameter {param.strip()!r} is not a buffer (shapes must be static)")
        dtype, name = CL_DTYPES[m.group(1)], m.group(2)
        host = np.ascontiguousarray(arrays[name], dtype=dtype)
        outs[name] = host.copy()
        bufs.append(cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=host))
    global_size, local_size = _launch(func)
    kernel = cl.Program(ctx, text).build().main_kernel
    kernel(queue, global_size, local_size, *bufs)
    for (name, host), buf in zip(outs.items(), bufs):
        cl.enqueue_copy(queue, host, buf)
    queue.finish()
    return outs
