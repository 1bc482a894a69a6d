"""Run a TVM artifact on a remote device through TVM RPC (a phone, or the emulated arm64 device).

    session = targets.rpc_device.request_session(host, port, key)
    rt = load_artifact("dist/mobilemoe-tiny-linux-arm64", session=session)   # -> RemoteRuntime
    logits, kv = rt.prefill(ids); logits, kv = rt.decode(tok, kv)

Same API as TVMRuntime. The library is uploaded (the device links nothing) and the VM is driven
with set_input / invoke_stateful / get_outputs, since a tuple return value cannot cross RPC. The
KV cache and parameters stay in the device's memory between calls.
"""
from __future__ import annotations

from ..artifact import LIB_NAME, ArtifactError
from .rpc_session import elf_machine, remote_errors, upload_and_load
from .tvm_local import TVMRuntime


class RemoteRuntime(TVMRuntime):
    where = "rpc"

    @classmethod
    def load(cls, artifact_dir, num_threads: int | None = None, kv_capacity: int | None = None, session=None):
        return cls(session, artifact_dir)

    def __init__(self, session, artifact_dir):
        self.session = session
        super().__init__(artifact_dir)

    def _check_runnable(self):
        if "experts" in self.manifest:  # its graph calls back into this process's expert cache
            raise ArtifactError(f"{self.dir}: built with --memory-budget-mb; its expert cache runs in the local "
                                f"runtime only, not over RPC: run it with TVMRuntime on the device")

    def _device_and_module(self):
        machine = elf_machine(self.manifest["target"]["tvm"].get("host") or self.manifest["target"]["tvm"])
        module = upload_and_load(self.session, self.dir / LIB_NAME, machine)
        return self.session.cpu(0), module

    def prefill(self, ids: list[int], kv=None):
        # the whole step, not only the VM call: copying a cache into its preallocated capacity (the
        # in-place cache) crosses RPC too, and a server lost then must read as DeviceError as well
        with remote_errors(self.session, f"a step of the artifact {self.dir.name}"):
            return super().prefill(ids, kv)

    def _invoke(self, entry: str, args):
        with remote_errors(self.session, f"{entry} on the artifact {self.dir.name}"):
            self.vm.set_input(entry, *args)
            self.vm.invoke_stateful(entry)
            out = self.vm.get_outputs(entry)
        return [out[i] for i in range(len(out))]
