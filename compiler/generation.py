"""Decode as generation runs it: N consecutive steps from a given depth, the cache growing.

    kv, token = prompt_cache(rt.step, vocab, context=128)          # prefill once: the depth
    g = generation(rt.step, kv, token, steps=128, repeats=5, rt=rt)
    g["tok_s"]            N / (time of the N steps): llama-bench's tg figure, median over repeats
    g["tok_s_min"/"max"]  its spread over the repeats
    g["faults_per_step"]  minor page faults per step (getrusage, whole process), all steps and the
                          steady state (second half of each repeat)
    g["loop_ms"]          per step, wall time outside the runtime's entry call (rt given): the Python
                          loop (argument tensors, logits to the host, argmax, the LayerKV)
    s = single_step(rt.step, kv, token, repeats=40)                # one step from a fixed cache
    k = kernel_time(rt, kv, token)                                 # ms inside kernels per step, storage

Every repeat starts from the same prompt cache (`kv` at depth `context`) and feeds back the argmax
of each step's logits, as greedy generation does. single_step is the older figure: the same step
from the same cache again and again (the cache never grows; no new buffer sizes); it is kept
beside the generation figure and labelled as such. kernel_time runs a few steps with a VM
instrument (wall clock around each kernel call, this machine only); step time less kernel time is
the time outside kernels per token (the VM's interpretation, allocations, the Python loop). The
same instrument counts the VM's storage requests per step and those the previous step's freed
storage cannot serve (new memory for the pooled allocator: allocations per step).
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections import Counter

import numpy as np

SKIP_PREFIXES = ("vm.builtin.", "vm.", "relax.", "runtime.")  # VM builtins are not kernels (compiler/profile.py)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def prompt_cache(step, vocab: int, context: int, seed: int = 0):
    """Prefill `context` random tokens (ids >= 3) -> (kv at depth context, the next token: argmax)."""
    ids = [int(i) for i in np.random.default_rng(seed + context).integers(3, vocab, size=context)]
    logits, kv = step(ids, None)
    return kv, int(np.argmax(np.asarray(logits)))


@contextlib.contextmanager
def timed_calls(rt):
    """Times every entry call of a TVM runtime (rt._invoke) into the yielded list (seconds)."""
    calls: list[float] = []
    if rt is None or not hasattr(rt, "_invoke"):
        yield None
        return
    inner = rt._invoke

    def invoke(entry, args):
        start = time.perf_counter()
        out = inner(entry, args)
        calls.append(time.perf_counter() - start)
        return out
    rt._invoke = invoke
    try:
        yield calls
    finally:
        del rt._invoke  # back to the class's method


def _steps(step, kv, token: int, n: int) -> tuple[list[float], list[int]]:
    """n decode steps from kv (greedy feedback) -> (seconds per step, minor faults per step)."""
    times, faults = [], []
    for _ in range(n):
        f0, t0 = minor_faults(), time.perf_counter()
        logits, kv = step([token], kv)
        token = int(np.argmax(np.asarray(logits)))
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
    return times, faults


def generation(step, kv, token: int, steps: int, repeats: int, warmup: int = 1, rt=None) -> dict:
    """`steps` consecutive decode steps from `kv`, `warmup` + `repeats` times (see the module doc)."""
    if steps < 1 or repeats < 1:
        raise ValueError(f"generation: steps and repeats must be >= 1, got {steps} and {repeats}")
    for _ in range(warmup):
        _steps(step, kv, token, steps)
    runs, faults, steady, calls = [], [], [], []
    for _ in range(repeats):
        with timed_calls(rt) as inner:
            t, f = _steps(step, kv, token, steps)
        runs.append(t)
        faults += f
        steady += f[steps // 2:]
        if inner is not None:
            calls.append([a - b for a, b in zip(t, inner)])
    rates = [steps / sum(t) for t in runs]
    per_step = [s for t in runs for s in t]
    out = {"steps": steps, "repeats": repeats, "tok_s": statistics.median(rates), "tok_s_min": min(rates),
           "tok_s_max": max(rates), "tok_s_runs": rates, "step_ms_median": statistics.median(per_step) * 1e3,
           "step_ms_max": max(per_step) * 1e3, "first_step_ms": statistics.median(t[0] for t in runs) * 1e3,
           "faults_per_step": sum(faults) / len(faults), "faults_per_step_steady": sum(steady) / max(len(steady), 1),
           "loop_ms": None}
    if calls:  # per step: wall time outside the entry call
        out["loop_ms"] = statistics.median(s for c in calls for s in c) * 1e3
    return out


def single_step(step, kv, token: int, repeats: int, warmup: int = 1) -> dict:
    """One decode step from the same cache, `repeats` times: the single-step figure (cache never grows)."""
    for _ in range(warmup):
        step([token], kv)
    times, faults = [], []
    for _ in range(repeats):
        f0, t0 = minor_faults(), time.perf_counter()
        step([token], kv)
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times), "n": repeats, "tok_s": 1.0 / med,
            "faults_per_step": sum(faults) / len(faults)}


PAGE = 4096  # TVM's pooled allocator rounds every request up to a page and keeps freed blocks by size
STORAGE_BUILTINS = ("vm.builtin.alloc_storage", "vm.builtin.alloc_tensor")
DTYPE_BYTES = {"float32": 4, "int32": 4, "int64": 8, "float16": 2, "uint32": 4, "int8": 1, "uint8": 1, "bool": 1}


def _request_bytes(symbol: str, args) -> int | None:
    """Bytes a VM allocation builtin asks the allocator for: alloc_storage(vm, size, ...), or
    alloc_tensor(vm, shape, dtype, ...) for a tensor of its own (dynamic shapes); None for
    alloc_tensor(storage, offset, ...): a tensor placed in a storage already requested."""
    if len(args) < 3 or type(args[1]).__name__ != "Shape":
        return None
    n = int(np.prod([int(x) for x in args[1]]))
    if symbol == "vm.builtin.alloc_storage":
        return n
    return n * DTYPE_BYTES.get(str(args[2]), 4)


def _new_requests(prev: Counter, cur: Counter) -> int:
    """Storage requests of this step that the previous step's (freed) blocks of the same size cannot serve."""
    return sum(max(0, n - prev.get(size, 0)) for size, n in cur.items())


def kernel_time(rt, kv, token: int, steps: int = 16) -> dict | None:
    """2 x `steps` consecutive decode steps from `kv`, every other one under a VM instrument -> the
    median wall time inside kernel calls per instrumented step (less the instrument's own cost per
    call, measured on the VM's builtin calls), the median time of the plain steps between them and
    their difference (outside kernels), the VM's allocation requests per step and its new storage
    requests per instrumented step after the first (page-rounded sizes the previous instrumented step
    did not request: what the pooled allocator must get fresh memory for; a growing cache makes some
    every few steps, the in-place cache none); None where no instrument can
    run (RPC, ORT)."""
    vm = getattr(rt, "vm", None)
    if vm is None or getattr(rt, "session", None) is not None:
        return None
    spent, calls, sizes, started, builtin = [0.0], [0], Counter(), {}, []

    def instrument(func, symbol, before, ret, *args):
        symbol = str(symbol)
        if before:
            if symbol in STORAGE_BUILTINS:
                nbytes = _request_bytes(symbol, args)
                if nbytes is not None:
                    sizes[-(-nbytes // PAGE)] += 1
            started[symbol] = time.perf_counter()
            return 0
        if symbol not in started:
            return 0
        took = time.perf_counter() - started.pop(symbol)
        if symbol.startswith(SKIP_PREFIXES):
            builtin.append(took)  # a near-empty call: what the instrument itself adds to an interval
        else:
            spent[0] += took
            calls[0] += 1
        return 0

    kernel_s, plain_s, alloc_calls, new, prev = [], [], [], [], None
    try:
        for _ in range(steps):  # an uninstrumented step, then an instrumented one: the same moment's load
            t0 = time.perf_counter()
            logits, kv = rt.decode(token, kv)
            token = int(np.argmax(np.asarray(logits)))
            plain_s.append(time.perf_counter() - t0)
            spent[0], calls[0] = 0.0, 0
            sizes.clear()
            builtin.clear()
            vm.set_instrument(instrument)
            logits, kv = rt.decode(token, kv)
            vm.set_instrument(None)
            token = int(np.argmax(np.asarray(logits)))
            overhead = statistics.median(builtin) if builtin else 0.0
            kernel_s.append(max(spent[0] - overhead * calls[0], 0.0))
            alloc_calls.append(sum(sizes.values()))
            if prev is not None:
                new.append(_new_requests(prev, sizes))
            prev = Counter(sizes)
    finally:
        vm.set_instrument(None)
    kernel_ms, step_ms = statistics.median(kernel_s) * 1e3, statistics.median(plain_s) * 1e3
    # below zero when the instrumented steps ran slower than the plain ones around them (cores shared
    # with other processes, a thread descheduled inside a kernel): no figure rather than a wrong one
    outside = step_ms - kernel_ms if step_ms >= kernel_ms else None
    return {"kernel_ms": kernel_ms, "step_ms": step_ms, "outside_kernels_ms": outside,
            "vm_alloc_calls": statistics.median(alloc_calls), "new_storage_per_step": new}


def measure_context(rt, context: int, steps: int, repeats: int, warmup: int = 1, single_repeats: int = 0) -> dict:
    """Everything compiler.bench reports for one decode context (rt: a runtime with step/decode)."""
    kv, token = prompt_cache(rt.step, rt.config.vocab_size, context)
    res = {"context": context, "generation": generation(rt.step, kv, token, steps, repeats, warmup, rt=rt)}
    if single_repeats:
        res["single_step"] = single_step(rt.step, kv, token, single_repeats, warmup)
    k = kernel_time(rt, kv, token)
    if k is not None:
        res["kernels"] = k
    return res


def describe(r: dict) -> str:
    """One line per context: generation first, the single-step figure beside it, faults and overheads."""
    g = r["generation"]
    line = (f"decode at {r['context']:>5} context, {g['steps']} steps in a row: {g['tok_s']:8.1f} tok/s "
            f"({g['tok_s_min']:.1f}..{g['tok_s_max']:.1f} over {g['repeats']}); minor faults/step "
            f"{g['faults_per_step']:.1f} (steady {g['faults_per_step_steady']:.1f})")
    if "single_step" in r:
        s = r["single_step"]
        line += f"; single step from a fixed cache {s['tok_s']:.1f} tok/s"
    if g["loop_ms"] is not None:
        line += f"; Python loop {g['loop_ms']:.3f} ms/token"
    if "kernels" in r:
        k = r["kernels"]
        new = k["new_storage_per_step"]
        out = "n/a (instrumented steps slower)" if k["outside_kernels_ms"] is None else f"{k['outside_kernels_ms']:.3f}"
        line += (f"; outside kernels {out} of {k['step_ms']:.3f} ms/token "
                 f"(VM storage requests/step {k['vm_alloc_calls']:.0f}, new {sum(new) / max(len(new), 1):.1f})")
    return line
