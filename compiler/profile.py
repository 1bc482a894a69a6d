"""Per-kernel time of one Relax VM call, grouped by layer part (compiler.bench --profile).

    build:  RecordKernelCalls (passes/record_kernel_calls.py, end of the schedule phase) -> manifest
            entry_points[e]["kernel_calls"] = [[kernel, part, n], ...]: the entry's kernel calls in order, run-length encoded
    bench:  rows = profile_call(vm, module, device, entry, args)   # [(kernel, seconds)] in call order
            report = group(rows, manifest["entry_points"][entry]["kernel_calls"])

TVM 0.27's Relax VM has no profiler (no `profile=True`); it calls an instrument function before
and after every call instruction (VirtualMachine.set_instrument). Before each kernel call the
instrument times that call alone with the module's time_evaluator, on the arguments it is about to
get: on a device over RPC this runs on the device, so the breakdown is the device's. Kernels are
pure (destination-passing), so the extra runs do not change the result.

Layer parts are the build's (the weights a kernel reads, passes/record_kernel_calls.py).
"""
from __future__ import annotations

import time

from passes.record_kernel_calls import PARTS

SKIP_PREFIXES = ("vm.builtin.", "vm.", "relax.", "runtime.")  # VM builtins are not kernels


def expand(runs: list[list] | None) -> list[tuple[str, str]]:
    return [(k, p) for k, p, n in (runs or []) for _ in range(n)]


def profile_call(vm, module, device, entry: str, args, number: int = 3):
    """Run `entry` once; -> ([(kernel, seconds)] for every kernel call in order, wall seconds).
    Each call is timed alone with `number` runs on `device` through `module` (the loaded library,
    local or remote); a function the library does not export (VM shape functions) is timed by
    the wall clock around its call instead."""
    rows, evaluators, started = [], {}, {}

    def instrument(func, symbol, before, ret, *call_args):
        symbol = str(symbol)
        if symbol.startswith(SKIP_PREFIXES):
            return 0
        if not before:
            if symbol in started:
                rows.append((symbol, time.perf_counter() - started.pop(symbol)))
            return 0
        if symbol not in evaluators:
            try:
                evaluators[symbol] = module.time_evaluator(symbol, device, number=number, repeat=1)
            except Exception:  # noqa: BLE001 - not in the library (e.g. a VM shape function)
                evaluators[symbol] = None
        if evaluators[symbol] is None:
            started[symbol] = time.perf_counter()
        else:
            rows.append((symbol, float(evaluators[symbol](*call_args).mean)))
        return 0  # VMInstrumentReturnKind.kNoOp: the VM then makes the call itself

    vm.set_instrument(instrument)
    try:
        vm.set_input(entry, *args)
        start = time.perf_counter()
        vm.invoke_stateful(entry)
        wall = time.perf_counter() - start
    finally:
        vm.set_instrument(None)
    return rows, wall


def group(rows: list[tuple[str, float]], runs: list[list] | None) -> dict:
    """{"parts": {part: seconds}, "kernels": [{kernel, part, calls, seconds}], "total_s"}; the
    kernels of `rows` are matched in order with the build's recorded calls (`runs`); a kernel
    not found there (a lowering-introduced call) counts as "other"."""
    recorded = expand(runs)
    parts = dict.fromkeys(PARTS, 0.0)
    kernels: dict[tuple[str, str], list] = {}
    j = 0
    for kernel, secs in rows:
        k = j
        while k < len(recorded) and recorded[k][0] != kernel:
            k += 1
        if k < len(recorded):
            part, j = recorded[k][1], k + 1
        else:
            part = "other"
        parts[part] = parts.get(part, 0.0) + secs
        entry = kernels.setdefault((kernel, part), [0, 0.0])
        entry[0] += 1
        entry[1] += secs
    table = [{"kernel": k, "part": p, "calls": c, "seconds": s} for (k, p), (c, s) in kernels.items()]
    table.sort(key=lambda r: -r["seconds"])
    return {"parts": {p: s for p, s in parts.items() if s > 0}, "kernels": table,
            "total_s": sum(s for _, s in rows)}


def format_report(name: str, report: dict, top: int = 12) -> str:
    total = report["total_s"] or 1e-12
    lines = [f"{name}: kernel time {total * 1e3:.3f} ms",
             f"  {'layer part':<16} {'ms':>9} {'share':>6}"]
    for part, secs in sorted(report["parts"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {part:<16} {secs * 1e3:>9.3f} {secs / total:>6.1%}")
    lines.append(f"  {'kernel':<34} {'part':<16} {'calls':>5} {'ms':>9}")
    for row in report["kernels"][:top]:
        lines.append(f"  {row['kernel'][:34]:<34} {row['part']:<16} {row['calls']:>5} {row['seconds'] * 1e3:>9.3f}")
    return "\n".join(lines)
