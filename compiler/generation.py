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
    k = kernel_time(rt, kv, token)                                 # ms inside kernels of one step

Every repeat starts from the same prompt cache (`kv` at depth `context`) and feeds back the argmax
of each step's logits, as greedy generation does. single_step is the older figure: the same step
from the same cache again and again (the cache never grows; no new buffer sizes); it is kept
beside the generation figure and labelled as such. kernel_time times one decode step with a VM
instrument (wall clock around each kernel call, this machine only); step time less kernel time is
the time outside kernels per token (the VM's interpretation, allocations, the Python loop).
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import time

import numpy as np

SKIP_PREFIXES = ("vm.builtin.", "vm.", "relax.", "runtime.")  # VM builtins are not kernels (compiler/profile.py)
ALLOC_BUILTINS = ("vm.builtin.alloc_storage", "vm.builtin.alloc_tensor")


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


def kernel_time(rt, kv, token: int, steps: int = 3) -> dict | None:
    """Median over `steps` decode steps (each from `kv`) of the wall time inside kernel calls and the
    number of VM allocation builtins called per step; None where no instrument can run (RPC, ORT)."""
    vm = getattr(rt, "vm", None)
    if vm is None or getattr(rt, "session", None) is not None:
        return None
    spent, allocs, started = [0.0], [0], {}

    def instrument(func, symbol, before, ret, *args):
        symbol = str(symbol)
        if symbol in ALLOC_BUILTINS and before:
            allocs[0] += 1
        if symbol.startswith(SKIP_PREFIXES):
            return 0
        if before:
            started[symbol] = time.perf_counter()
        elif symbol in started:
            spent[0] += time.perf_counter() - started.pop(symbol)
        return 0

    kernel_s, alloc_calls = [], []
    vm.set_instrument(instrument)
    try:
        for _ in range(steps):
            spent[0], allocs[0] = 0.0, 0
            rt.decode(token, kv)
            kernel_s.append(spent[0])
            alloc_calls.append(allocs[0])
    finally:
        vm.set_instrument(None)
    return {"kernel_ms": statistics.median(kernel_s) * 1e3, "vm_alloc_calls": statistics.median(alloc_calls)}


def measure_context(rt, context: int, steps: int, repeats: int, warmup: int = 1, single_repeats: int = 0) -> dict:
    """Everything compiler.bench reports for one decode context (rt: a runtime with step/decode)."""
    kv, token = prompt_cache(rt.step, rt.config.vocab_size, context)
    res = {"context": context, "generation": generation(rt.step, kv, token, steps, repeats, warmup, rt=rt)}
    if single_repeats:
        res["single_step"] = single_step(rt.step, kv, token, single_repeats, warmup)
    k = kernel_time(rt, kv, token)
    if k is not None:
        gen = res["generation"]
        k["outside_kernels_ms"] = gen["step_ms_median"] - k["kernel_ms"]
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
        line += (f"; outside kernels {k['outside_kernels_ms']:.3f} of {g['step_ms_median']:.3f} ms/token "
                 f"(VM alloc calls/step {k['vm_alloc_calls']:.0f})")
    return line
