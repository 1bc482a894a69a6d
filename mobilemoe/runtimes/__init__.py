"""Runtimes: open a compiled artifact (mobilemoe/artifact.py) and run it. They know the artifact
format only, never the compiler that wrote it.

    rt = load_artifact("dist/mobilemoe-tiny-host")              # the runtime the manifest's backend names
    rt = load_artifact(artifact, session=rpc_session)            # the same artifact on a TVM RPC device
    logits, kv = rt.prefill([0, 17, 42]); logits, kv = rt.decode(99, kv)
    ids, stats = rt.generate(prompt_ids, max_new_tokens=32)

    base.py         Runtime (verify every hash, check the backend, read the config; generate), LayerKV
    tvm_local.py    TVMRuntime: a TVM artifact on this machine's CPU
    tvm_rpc.py      RemoteRuntime: a TVM artifact on a TVM RPC device (rpc_session.py: upload, errors)
    ort.py          OrtRuntime: an ONNX artifact in an onnxruntime CPU session
    iree.py         IreeRuntime: an MLIR artifact's host module on IREE's local-task driver

A new runtime is one module in this folder and one entry in RUNTIMES. The registry names modules
rather than importing them: each runtime module loads its engine (tvm, onnxruntime, iree), and
importing this package (targets/rpc_device.py does, for rpc_session) must load none of them.
"""
from __future__ import annotations

import importlib

from ..artifact import ArtifactError, read_manifest

# (manifest backend, where it runs) -> "module:class" in this package
RUNTIMES: dict[tuple[str, str], str] = {
    ("tvm", "local"): "tvm_local:TVMRuntime",
    ("tvm", "rpc"): "tvm_rpc:RemoteRuntime",
    ("onnx", "local"): "ort:OrtRuntime",
    ("iree", "local"): "iree:IreeRuntime",
}


def runtime_class(backend: str, where: str = "local"):
    """The Runtime subclass registered for a manifest backend, run "local" or over "rpc"."""
    name = RUNTIMES.get((backend, where))
    if name is None:
        known = ", ".join(f"{b} ({w})" for b, w in RUNTIMES)
        raise ArtifactError(f"no runtime for backend {backend!r} ({where}); known: {known}")
    module, cls = name.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def load_artifact(artifact_dir, num_threads: int | None = None, kv_capacity: int | None = None, session=None):
    """Open an artifact with the runtime its manifest names: on this machine, or on the device of a
    TVM RPC `session` (kv_capacity: TVM's in-place cache, fixed)."""
    backend = read_manifest(artifact_dir).get("backend")
    try:
        runtime = runtime_class(backend, "local" if session is None else "rpc")
    except ArtifactError as err:
        raise ArtifactError(f"{artifact_dir}: {err}") from None
    return runtime.load(artifact_dir, num_threads=num_threads, kv_capacity=kv_capacity, session=session)


__all__ = ["RUNTIMES", "load_artifact", "runtime_class"]
