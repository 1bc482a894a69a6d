"""Per-kernel time of one Relax VM call, grouped by layer part (compiler.bench --profile).

    build:  RecordKernelCalls (end of the schedule phase) -> manifest entry_points[e]["kernel_calls"]
            = [[kernel, part, n], ...]: the entry's kernel calls in order, run-length encoded
    bench:  rows = profile_call(vm, module, device, entry, args)   # [(kernel, seconds)] in call order
            report = group(rows, manifest["entry_points"][entry]["kernel_calls"])

TVM 0.27's Relax VM has no profiler (no `profile=True`); it calls an instrument function before
and after every call instruction (VirtualMachine.set_instrument). Before each kernel call the
instrument times that call alone with the module's time_evaluator, on the arguments it is about to
get: on a device over RPC this runs on the device, so the breakdown is the device's. Kernels are
pure (destination-passing), so the extra runs do not change the result.

Layer parts come from the weights a kernel reads (LAYER_PARTS: attention projections, router,
routed experts, shared expert, dense FFN, norms -> "other", embedding / LM head -> "other"). A
kernel that reads no weight belongs to the previous weight-reading kernel's part (attention's
softmax after the q/k/v projections, routing's top-k after the router), except the kernels that
lead into a norm's weight (the norm itself, the residual add before it), which are "other".
"""
from __future__ import annotations

import re
import time

import tvm
from tvm import relax

PARTS = ("attention", "router", "routed experts", "shared expert", "dense ffn", "other")
LAYER_PARTS = [  # (regex on the Relax parameter name, part); first match wins
    (r"_norm_weight", "norm"),
    (r"_attn_w[qkvo]_", "attention"),
    (r"_moe_router_", "router"),
    (r"_moe_shared_", "shared expert"),
    (r"_moe_w\d+_", "routed experts"),
    (r"_ffn_w\d_", "dense ffn"),
    (r"_(embed|lm_head)_", "other"),
]
SKIP_PREFIXES = ("vm.builtin.", "vm.", "relax.", "runtime.")  # VM builtins are not kernels


def weight_part(name: str) -> str | None:
    for pattern, part in LAYER_PARTS:
        if re.search(pattern, name):
            return part
    return None


def kernel_calls(func: relax.Function, param_names: set[str]) -> list[list]:
    """[[kernel, part, count], ...] of a Relax function's R.call_tir, in order, run-length encoded."""
    from .tasks import is_call_tir

    calls = []  # [kernel, weight part or None]
    for block in func.body.blocks:
        for binding in block.bindings:
            if is_call_tir(binding.value):
                reads = [a.name for a in binding.value.args[1].fields
                         if isinstance(a, relax.Var) and a.name in param_names]
                parts = [p for p in map(weight_part, reads) if p]
                calls.append([binding.value.args[0].name_hint, parts[0] if parts else None])
    parts, prev = [], None
    for i, (_, part) in enumerate(calls):
        if part is None:
            nxt = next((p for _, p in calls[i + 1:] if p), None)
            part = "other" if nxt == "norm" or prev is None else prev
        else:
            prev = part
        parts.append("other" if part == "norm" else part)
    out = []
    for (kernel, _), part in zip(calls, parts):
        if out and out[-1][0] == kernel and out[-1][1] == part:
            out[-1][2] += 1
        else:
            out.append([kernel, part, 1])
    return out


@tvm.transform.module_pass(opt_level=0, name="RecordKernelCalls")
class RecordKernelCalls:
    """Analysis only: fills `into` with {entry: kernel_calls(entry)}; returns the module unchanged."""

    def __init__(self, into: dict):
        self.into = into

    def transform_module(self, mod, ctx):
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                self.into[gv.name_hint] = kernel_calls(func, {p.name for p in func.params})
        return mod


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
