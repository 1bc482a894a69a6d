"""How every bench script measures, and what it prints about the conditions it measured under.

    threads = pin_threads(a)          # one thread count for PyTorch, TVM and ONNX Runtime, first
    r = measure(rt.step, vocab, prompt_lens, context, decode_tokens, repeats)   # any runtime's step
    r = run_artifact(artifact, prompts, contexts, decode_steps, repeats)        # compiler.bench.run
    print(conditions(threads, repeats))   # threads, load average, repeats: printed with every result

Why two scripts can disagree: a figure depends on the threads (TVM's pool reads TVM_NUM_THREADS
once; PyTorch's default differs), on what else ran on the cores (the load average; CPU/wall time
says whether a run got the threads it asked for, thread_check), on the repeats (medians of few
runs on a shared machine move), and on which decode figure it is (generation, the cache growing,
vs the single step from a fixed cache; compiler/generation.py). Every script prints these with its
numbers, so two results are comparable only where they match.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch
from tvm.target import codegen

from bench.common import log
from compiler.bench import run
from compiler.generation import generation, prompt_cache, single_step


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def best_time(fn, repeats: int = 5) -> tuple[float, float]:
    """(best wall seconds of `repeats` calls after a warm-up, process CPU / wall over them): the peaks'
    measure (bench/roofline.py: a peak is the best run, where median_time is for the artifact's figures)."""
    fn()
    best, c0, w0 = float("inf"), time.process_time(), time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best, (time.process_time() - c0) / (time.perf_counter() - w0)


def torch_step(model):
    @torch.no_grad()
    def step(ids, kv):
        logits, kv = model(torch.tensor([ids]), kv=kv, last_only=True)
        return logits[0, -1], kv
    return step


def measure(step, vocab: int, prompt_lens: list[int], context: int, decode_tokens: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {"prefill": {}, "decode": {}}
    for n in prompt_lens:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out["prefill"][n] = n / median_time(lambda: step(ids, None), repeats)
    # decode as generation runs (compiler/generation.py): decode_tokens steps in a row from the
    # prompt's cache, the cache growing; the single step from a fixed cache is kept beside it
    kv, token = prompt_cache(step, vocab, context)
    gen = generation(step, kv, token, decode_tokens, repeats)
    out["decode"][context] = gen["tok_s"]
    out["decode_spread"] = {context: [gen["tok_s_min"], gen["tok_s_max"]]}
    out["decode_single_step"] = {context: single_step(step, kv, token, max(8, 4 * repeats))["tok_s"]}
    out["decode_faults_per_step"] = {context: gen["faults_per_step"]}
    return out


def add_measure_args(p: argparse.ArgumentParser) -> None:
    """The measurement options every bench script shares (see measure())."""
    p.add_argument("--prompt-lens", default="32,128")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)


def set_threads(a) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    return torch.get_num_threads()


def pin_threads(a) -> int:
    """One thread count for PyTorch (set_threads), TVM and ONNX Runtime.

    TVM's thread pool reads TVM_NUM_THREADS once, at its first use: call this before any TVM work
    (TVM's default on x86 is half the logical cores)."""
    threads = set_threads(a)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return threads


def run_artifact(artifact: Path, prompts, contexts, decode_steps: int, repeats: int, rpc=None) -> dict:
    """compiler.bench.run (medians after a warm-up) -> {"prefill": {n: tok/s}, "decode": {ctx: generation
    tok/s (decode_steps steps in a row, the cache growing)}, "decode_detail": {ctx: its spread, the
    single-step figure, faults and overheads per step}, "cpu_per_wall": process CPU seconds / wall
    seconds, "bench": the full result}."""
    c0, w0 = time.process_time(), time.perf_counter()
    res = run(artifact, rpc, tuple(prompts), tuple(contexts), decode_steps, 1, repeats, log=log)
    detail = {}
    for r in res["decode"]:
        g = r["generation"]
        detail[r["context"]] = {"tok_s_min": g["tok_s_min"], "tok_s_max": g["tok_s_max"],
                                "single_step_tok_s": r["single_step"]["tok_s"],
                                "faults_per_step": g["faults_per_step"],
                                "faults_per_step_steady": g["faults_per_step_steady"], "loop_ms": g["loop_ms"],
                                "outside_kernels_ms": (r.get("kernels") or {}).get("outside_kernels_ms"),
                                "new_storage_per_step": (r.get("kernels") or {}).get("new_storage_per_step")}
    return {"prefill": {r["tokens"]: r["tok_s"] for r in res["prefill"]},
            "decode": {r["context"]: r["tok_s"] for r in res["decode"]}, "decode_detail": detail,
            "cpu_per_wall": (time.process_time() - c0) / (time.perf_counter() - w0), "bench": res}


def thread_check(cpu_per_wall: float, threads: int) -> str:
    """Did a run use the threads it was given? (process CPU time / wall time)"""
    if cpu_per_wall > threads + 0.25:
        return f"WARNING: CPU/wall {cpu_per_wall:.2f} > {threads} threads: more threads ran than asked"
    if cpu_per_wall < 0.8 * threads:
        return f"note: CPU/wall {cpu_per_wall:.2f} < {threads}: the cores were shared with other processes"
    return f"CPU/wall {cpu_per_wall:.2f} for {threads} thread(s): ok"


def load_note() -> str:
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def machine() -> dict:
    """CPU model, cores, load average (a shared machine's numbers are only as good as its load)."""
    flags = ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        flags = next((ln.split(":", 1)[1] for ln in info.splitlines() if ln.startswith(("flags", "Features"))), "")
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?") if Path("/proc/cpuinfo").is_file() else "?"
    return {"cpu": model, "llvm_mcpu": codegen.llvm_get_system_cpu(), "cores": os.cpu_count(),
            "flags": flags.split(), "load_average": os.getloadavg()}


def conditions(threads: int, repeats: int | None = None) -> str:
    """The line every script prints with its results: threads, load, repeats."""
    return f"{threads} thread(s), {load_note()}" + (f", median of {repeats} repeats" if repeats else "")
