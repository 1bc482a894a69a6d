"""`python -m bench.launch_cost`: what one parallel launch costs against the work of a small kernel.

    python -m bench.launch_cost [--sizes 1024,16384,65536,262144] [--threads 2] [--number 2000]

For each size, a float32 add of that many elements compiled twice for this CPU: its loop serial,
and as one TIR ``T.parallel`` loop (a TVMBackendParallelLaunch: wake the workers, run, barrier),
each timed alone in a fresh process at --threads (TVM's pool reads TVM_NUM_THREADS once), best
and median of 5 repeats of --number calls. Prints parallel / serial: above 1, the launch costs
more than it saves, and the kernel should stay serial (tir_kernels/launch.py's thresholds). The
load average is printed beside: on a loaded machine the median moves by orders of magnitude (a
descheduled worker stalls the barrier), the best less.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

def child(n: int, parallel: bool, number: int) -> dict:
    """Time the add (this process: TVM_NUM_THREADS set by the parent); -> best and median us."""
    import numpy as np  # deferred: the child's work (the parent only starts processes)
    import tvm  # deferred: as above, TVM reads TVM_NUM_THREADS in the child only
    from tvm.script import tirx as T  # deferred: as above
    from tvm.target import codegen  # deferred: as above

    @T.prim_func(private=True)
    def add(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32"), c: T.Buffer((n,), "float32")):
        T.func_attr({"tirx.noalias": True})
        if parallel:
            for i in T.parallel(n // 16):
                c[T.ramp(i * 16, 1, 16)] = a[T.ramp(i * 16, 1, 16)] + b[T.ramp(i * 16, 1, 16)]
        else:
            for i in range(n // 16):
                c[T.ramp(i * 16, 1, 16)] = a[T.ramp(i * 16, 1, 16)] + b[T.ramp(i * 16, 1, 16)]

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    lib = tvm.compile(tvm.IRModule({"main": add.with_attr("global_symbol", "main")}), target=target)
    args = [tvm.runtime.tensor(np.ones(n, "float32")) for _ in range(3)]
    r = sorted(lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=5)(*args).results)
    return {"best_us": r[0] * 1e6, "median_us": r[2] * 1e6}


def time_kernel(n: int, mode: str, threads: int, number: int) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "bench.launch_cost", "--child", str(n), mode, str(number)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(int(argv[1]), argv[2] == "parallel", int(argv[3]))))
        return
    p = argparse.ArgumentParser(prog="python -m bench.launch_cost", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1024,16384,65536,262144")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--number", type=int, default=2000)
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if any(n % 16 for n in sizes):
        p.error("--sizes: each size must be a multiple of 16")
    print(f"float32 add, TVM_NUM_THREADS={a.threads}, load average {os.getloadavg()[0]:.2f} (start)")
    print(f"{'elements':>9} {'serial us (best/median)':>24} {'parallel us (best/median)':>26} {'par/ser best':>12}")
    for n in sizes:
        ser = time_kernel(n, "serial", a.threads, a.number)
        par = time_kernel(n, "parallel", a.threads, a.number)
        print(f"{n:>9} {ser['best_us']:>11.2f} / {ser['median_us']:<10.2f} {par['best_us']:>12.2f} / "
              f"{par['median_us']:<11.2f} {par['best_us'] / ser['best_us']:>11.1f}x")
    print(f"load average {os.getloadavg()[0]:.2f} (end)")


if __name__ == "__main__":
    main()
