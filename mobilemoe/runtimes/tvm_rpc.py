"""Run a TVM artifact on a remote device through TVM RPC (a phone, or the emulated arm64 device).

    session = targets.rpc_device.request_session(host, port, key)
    rt = load_artifact("dist/mobilemoe-tiny-linux-arm64", session=session)   # -> RemoteRuntime
    logits, kv = rt.prefill(ids); logits, kv = rt.decode(tok, kv)

Same API as TVMRuntime. The library is uploaded (the device links nothing) and the VM is driven
with set_input / invoke_stateful / get_outputs, since a tuple return value cannot cross RPC. The
KV cache and parameters stay in the device's memory between calls.

A budgeted artifact (--memory-budget-mb) calls back into its expert cache from inside the graph, so
the cache lives in the RPC server: its expert file is uploaded into the session's work dir and the
server opens the cache there (expert_cache.serve, registered by `python -m mobilemoe.runtimes.rpc_server`);
`rt.experts` is a RemoteExpertCache, the client's handle (pools, stats) on it.
"""
from __future__ import annotations

import itertools
import json
import weakref

from ..artifact import LIB_NAME, PARAMS_NAME, ArtifactError
from .expert_cache import REMOTE, max_tokens
from .params_file import read_params
from .rpc_session import elf_machine, remote_errors, upload_and_load
from .tvm_local import TVMRuntime


_UPLOADS = itertools.count()  # files uploaded by this process: unique names in a session's work dir


class RemoteExpertCache:
    """The client's handle on an expert cache in an RPC server: its pools (remote tensors) and stats."""

    def __init__(self, session, artifact_dir, block: dict):
        name = f"{next(_UPLOADS)}-{block['file']}"  # one session may open several artifacts
        try:
            functions = {f: session.get_function(REMOTE + f)
                         for f in ("open", "pool", "stats", "reset_stats", "close", "set_input")}
        except AttributeError as err:
            where = getattr(session, "device_name", "the RPC device")
            raise ArtifactError(f"{artifact_dir}: built with --memory-budget-mb, but the RPC server of {where} has no "
                                f"expert cache ({REMOTE}open): start it with `python -m mobilemoe.runtimes.rpc_server` "
                                f"(targets/arm64_device.sh does)") from err
        session.upload(str(artifact_dir / block["file"]), name)
        self._f = functions
        self.key = functions["open"](name, json.dumps(block))
        self.pools = {t["pool"]: functions["pool"](self.key, i) for i, t in enumerate(block["tensors"])}
        self.max_tokens = max_tokens(block)
        weakref.finalize(self, _close, functions["close"], self.key)

    def stats(self) -> dict:
        return json.loads(self._f["stats"](self.key))

    def reset_stats(self) -> None:
        self._f["reset_stats"](self.key)

    def set_input(self, vm, entry: str, args, n_weights: int) -> None:
        """The VM's set_input, done in the server so that the VM reads the cache's pools (expert_cache.py);
        the last n_weights arguments are weights, held by the client as long as the runtime."""
        self._f["set_input"](vm.module, entry, self.key, len(args) - n_weights, *args)


def _close(close, key: int) -> None:
    try:
        close(key)
    except Exception:  # noqa: BLE001 - the session (and the server's cache with it) is already gone
        pass


class RemoteRuntime(TVMRuntime):
    where = "rpc"

    @classmethod
    def load(cls, artifact_dir, num_threads: int | None = None, kv_capacity: int | None = None, session=None):
        return cls(session, artifact_dir)

    def __init__(self, session, artifact_dir):
        self.session = session
        super().__init__(artifact_dir)

    def _check_runnable(self):
        pass  # any target: the device says whether it can load the library

    def _open_experts(self, block: dict):
        with remote_errors(self.session, f"opening the expert cache of {self.dir.name}"):
            return RemoteExpertCache(self.session, self.dir, block)

    def _device_and_module(self):
        machine = elf_machine(self.manifest["target"]["tvm"].get("host") or self.manifest["target"]["tvm"])
        module = upload_and_load(self.session, self.dir / LIB_NAME, machine, f"{next(_UPLOADS)}-{LIB_NAME}")
        return self.session.cpu(0), module

    def _load_params(self) -> dict:
        return read_params(self.dir / PARAMS_NAME, self.device, remote=True)

    def _freed_memory_release(self):
        """The server's VM pool (its glibc threshold stays as the server set it)."""
        try:
            return self.session.get_function("vm.builtin.memory_manager.clear")
        except (AttributeError, RuntimeError):  # a server's runtime without it: nothing to clear there
            return None

    def prefill(self, ids: list[int], kv=None):
        # the whole step, not only the VM call: copying a cache into its preallocated capacity (the
        # in-place cache) crosses RPC too, and a server lost then must read as DeviceError as well
        with remote_errors(self.session, f"a step of the artifact {self.dir.name}"):
            return super().prefill(ids, kv)

    def _invoke(self, entry: str, args):
        with remote_errors(self.session, f"{entry} on the artifact {self.dir.name}"):
            if self.experts is not None:
                self.experts.set_input(self.vm, entry, args, len(self.params[entry]))
            else:
                self.vm.set_input(entry, *args)
            self.vm.invoke_stateful(entry)
            out = self.vm.get_outputs(entry)
        return [out[i] for i in range(len(out))]
