"""Run an MLIR artifact (compiler/backends/mlir.py, manifest backend "iree") with IREE's runtime.

    rt = load_artifact("dist/mobilemoe-tiny-mlir")     # -> IreeRuntime
    logits, kv = rt.prefill([0, 17, 42])               # logits np [V]; kv an IREE DeviceArray
    logits, kv = rt.decode(99, kv)

Same API as TVMRuntime. The host module (iree-host.vmfb) runs on the local-task driver (CPU
threads); its weights are IREE parameters (scope "model") mapped from params.safetensors, so the
weights are read once at load and never copied per call. The KV cache [L, 2, 1, nkv, P, D] stays a
device array between calls. All IreeRuntimes of a process share one local-task device, so
num_threads takes effect for the first one only.
"""
from __future__ import annotations

import platform

import numpy as np

from ..artifact import ArtifactError
from .base import Runtime, check_ids

DRIVER = "local-task"


class IreeRuntime(Runtime):
    """An MLIR artifact's host IREE module on this machine's CPU."""

    backend = "iree"

    def __init__(self, artifact_dir, num_threads: int | None = None):
        self._open_manifest(artifact_dir)  # every hash, before anything is mapped
        iree = self.manifest["iree"]
        host = iree["modules"].get("host")
        if host is None:
            built = ", ".join(iree["modules"]) or "nothing"
            raise ArtifactError(f"{self.dir}: manifest.json:iree.modules has no 'host' module (built for {built}); "
                                f"rebuild with compiler.build --target mlir")
        if iree.get("host_machine") not in (None, platform.machine()):
            raise ArtifactError(f"{self.dir}: {host['file']} was compiled for a {iree['host_machine']} host CPU, this "
                                f"machine is {platform.machine()}; rebuild it here with compiler.build --target mlir")
        for name in (host["file"], iree["parameters"]):
            if name not in self.manifest["files"]:
                raise ArtifactError(f"{self.dir}: manifest.json lists no {name}")
        try:  # deferred on purpose: an optional dependency (the [mlir] extra), needed by MLIR artifacts only
            import iree.runtime as rt  # deferred: see the line above
        except ImportError:
            raise ArtifactError(f"{self.dir}: an MLIR artifact runs with iree.runtime: "
                                f"pip install -e '.[mlir]' (iree-base-runtime)") from None
        if num_threads:  # local-task: one worker per group; read when the process's device is created
            rt.flags.parse_flags(f"--task_topology_max_group_count={num_threads}")
        self._rt = rt
        self.instance = rt.VmInstance()
        self.device = rt.get_device(DRIVER)  # one per process: a second device crashes on teardown
        index = rt.ParameterIndex()
        index.load(str(self.dir / iree["parameters"]))
        params = rt.create_io_parameters_module(self.instance, index.create_provider(scope=iree["parameter_scope"]))
        self.module = rt.VmModule.mmap(self.instance, str(self.dir / host["file"]))
        self.context = rt.VmContext(self.instance, modules=[rt.create_hal_module(self.instance, self.device), params,
                                                            self.module])
        self._fn = {e: rt.FunctionInvoker(self.context, self.device, self.module.lookup_function(e))
                    for e in self.manifest["entry_points"]}
        c = self.config
        self._empty_kv = np.zeros((c.num_layers, 2, 1, c.num_kv_heads, 0, c.head_dim), np.float32)

    def _call(self, entry: str, ids: list[int], kv):
        past = int(kv.shape[4])
        check_ids(self.config, ids, past)
        tokens = np.asarray([ids], dtype=np.int64)
        positions = np.arange(past, past + len(ids), dtype=np.int64)[None]
        logits, kv = self._fn[entry](tokens, positions, kv)
        return np.array(logits.to_host()[0]), kv  # a copy: to_host() may map a buffer IREE reuses

    def prefill(self, ids: list[int], kv=None):
        """Run `ids` (after `kv`, if given); -> (last-position logits [V], kv)."""
        kv = self._empty_kv if kv is None else kv
        return self._call("decode" if len(ids) == 1 else "prefill", ids, kv)

    def decode(self, token: int, kv):
        return self._call("decode", [token], kv)
