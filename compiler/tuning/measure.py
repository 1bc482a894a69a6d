"""How compiler.tuning builds and times a kernel: MetaSchedule builder and runner for a target.

    builder = make_builder(spec)                      # tvm.compile + export with the target's linker
    runner = make_runner(spec, rpc=("127.0.0.1", 9190, "android"))   # or rpc=None: this machine
    seconds = measure(builder, runner, spec.tvm_target(), mod, args_from=workload)

- The builder runs our own f_build (tvm.compile of one PrimFunc): MetaSchedule's default one first
  imports every target's tensor intrinsics (22-120 s, longer than its 30 s timeout). It exports a
  shared object with the target's cross toolchain (spec.export's linker): a phone cannot link.
- Arguments are made here in numpy and copied to the device: the RPC server needs no random
  module, and integer tensors (expert ids) hold valid indices (< the expert count of the weights)
  so the sparse expert kernels gather inside their weights.
- Over RPC, sessions come from targets.rpc_device.request_session (bounded waits, clear errors).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import tvm
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.builder import BuilderInput, LocalBuilder
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner, RPCConfig, RPCRunner, RunnerInput
from tvm.s_tir.meta_schedule.utils import remove_build_dir

from targets.rpc_device import DeviceError, registered_servers, request_session

EVALUATOR = {"number": 5, "repeat": 3, "min_repeat_ms": 20}  # per measurement: median of 3 x (>=20 ms)
RPC_SESSION_TIMEOUT = 120  # seconds a device may take for one candidate (qemu is slow)


def _build(mod, target, _params):
    return tvm.compile(mod, target=target)


def _exporter(fcompile):
    def export(rt_mod) -> str:
        path = os.path.join(tempfile.mkdtemp(prefix="mobilemoe-tune-"), "kernel.so")
        if fcompile is None:
            rt_mod.export_library(path)
        else:
            rt_mod.export_library(path, fcompile=fcompile)
        return path
    return export


def make_builder(spec, max_workers: int | None = None, timeout_sec: float = 60):
    fcompile = spec.toolchain.fcompile() if spec.toolchain is not None else None
    return LocalBuilder(f_build=_build, f_export=_exporter(fcompile), timeout_sec=timeout_sec,
                        max_workers=max_workers or max(1, min(4, os.cpu_count() or 1)))


def _numpy_args(args_info) -> list[np.ndarray]:
    """Random inputs; integer tensors hold indices below the expert count (3-D uint32 weights)."""
    rng = np.random.default_rng(0)
    experts = [shape[0] for kind, dtype, shape in args_info if kind == "TENSOR" and dtype == "uint32"
               and len(shape) == 3]
    bound = min(experts) if experts else 1
    out = []
    for _, dtype, shape in args_info:
        if dtype.startswith("int"):
            out.append(rng.integers(0, bound, size=shape).astype(dtype))
        elif dtype.startswith("uint"):
            out.append(rng.integers(0, 2**31, size=shape).astype(dtype))
        elif dtype == "bool":
            out.append(rng.integers(0, 2, size=shape).astype(dtype))
        else:
            out.append((rng.standard_normal(shape) * 0.1).astype(dtype))
    return out


def alloc_local(device, args_info, alloc_repeat):
    return [[tvm.runtime.tensor(a, device) for a in _numpy_args(args_info)] for _ in range(alloc_repeat)]


def alloc_remote(session, device, args_info, alloc_repeat):
    return [[tvm.runtime.tensor(a, device) for a in _numpy_args(args_info)] for _ in range(alloc_repeat)]


def create_session(rpc_config):
    """A session on the device; when no server of the key is registered at all (the device dropped
    off), fail within seconds: compiler.tuning then waits for the device once, not per candidate."""
    host, port, key = rpc_config.tracker_host, int(rpc_config.tracker_port), rpc_config.tracker_key
    try:
        present = registered_servers(host, port, key) > 0
    except DeviceError:
        present = False
    return request_session(host, port, key, timeout=60 if present else 3,
                           session_timeout=rpc_config.session_timeout_sec)


def make_runner(spec, rpc: tuple[str, int, str] | None = None, timeout_sec: float | None = None):
    """LocalRunner on this machine (rpc None), else RPCRunner on the device registered as rpc[2]."""
    config = EvaluatorConfig(**EVALUATOR, enable_cpu_cache_flush=False)
    if rpc is None:
        return LocalRunner(timeout_sec=timeout_sec or 30, evaluator_config=config, f_alloc_argument=alloc_local)
    host, port, key = rpc
    rpc_config = RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                           session_timeout_sec=RPC_SESSION_TIMEOUT)
    return RPCRunner(rpc_config, evaluator_config=config, max_workers=1, f_create_session=create_session,
                     f_alloc_argument=alloc_remote)  # times out after rpc_config.session_timeout_sec


class MeasureError(RuntimeError):
    pass


# what a runner's error says when the candidate was lost with the device (not the candidate's fault)
LOST = ("DeviceError", "RPC session is lost", "kShutdown", "SockChannel", "Broken pipe", "Connection reset",
        "Connection refused", "not reachable", "no RPC server")


def is_lost(error_msg: str | None) -> bool:
    return bool(error_msg) and any(m in error_msg for m in LOST)


def measure(builder, runner, target, mod, args_from) -> float:
    """Seconds (median) of `mod`'s "main" on the runner's device, with the arguments of `args_from`
    (a static workload: `mod` may be the dynamic kernel it was specialized from)."""
    (result,) = measure_many(builder, runner, target, [(mod, args_from)])
    if isinstance(result, MeasureError):
        raise result
    return result


def measure_many(builder, runner, target, jobs: list) -> list:
    """measure() of each (mod, args_from) in `jobs`, built in one batch and run in one batch (one
    worker pool each): -> [seconds or MeasureError]. A lost device raises DeviceError."""
    if not jobs:
        return []
    out: list = [None] * len(jobs)
    built = builder.build([BuilderInput(mod, target) for mod, _ in jobs])
    runs = []
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    for i, ((_, args_from), b) in enumerate(zip(jobs, built)):
        if b.error_msg:
            out[i] = MeasureError(f"build failed: {b.error_msg.strip().splitlines()[-1]}")
        else:
            runs.append((i, b.artifact_path, RunnerInput(b.artifact_path, device,
                                                         ArgInfo.from_prim_func(args_from["main"]))))
    try:
        results = [f.result() for f in runner.run([r for _, _, r in runs])] if runs else []
    finally:
        for _, path, _ in runs:
            remove_build_dir(path)
    for (i, _, _), result in zip(runs, results):
        if result.error_msg and is_lost(result.error_msg):
            raise DeviceError(f"the device was lost while measuring: {result.error_msg.strip().splitlines()[-1]}")
        out[i] = (MeasureError(f"run failed: {result.error_msg.strip().splitlines()[-1]}") if result.error_msg
                  else float(np.median([float(s) for s in result.run_secs])))
    return out
