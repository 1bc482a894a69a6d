"""Running over a TVM RPC session: upload a library to the device, and name a lost session.

    mod = upload_and_load(sess, "model_aarch64.so", elf_machine(target_json))  # a .so linked for the device
    with remote_errors(sess, "main"):                # a dropped device -> DeviceError, no hang
        mod["main"](*args)

Standard library only (targets/rpc_device.py re-exports these for its device and tracker helpers,
which must not import tvm); tvm_rpc.RemoteRuntime runs an artifact with them.
"""
from __future__ import annotations

import contextlib
import platform
import struct
from pathlib import Path

_EM_AARCH64, _EM_X86_64 = 183, 62  # ELF e_machine
_MACHINE_NAMES = {_EM_AARCH64: "AArch64", _EM_X86_64: "x86-64"}


class DeviceError(RuntimeError):
    """The emulated device, an RPC tracker or an RPC server is missing, unreachable or gone."""


# what TVM's RPC client says when the server side went away (killed, crashed, session timed out)
LOST_SESSION = ("kShutdown", "SockChannel", "Broken pipe", "Connection reset", "RPCSessionTimeout",
                "HandleUntilReturnEvent")  # the last: a copy to or from the device whose reply never came


@contextlib.contextmanager
def remote_errors(session, what: str = "remote call"):
    """Re-raise the RPC layer's terse errors for a lost server as DeviceError naming the device.

        with remote_errors(sess, "time_evaluator(main)"):
            f(*args)
    Other errors (a wrong argument shape, a failing kernel) pass through unchanged.
    """
    try:
        yield
    except DeviceError:
        raise
    except Exception as err:  # noqa: BLE001 - tvm.error.InternalError and friends
        msg = str(err).strip()
        if not any(marker in msg for marker in LOST_SESSION):
            raise
        name = getattr(session, "device_name", "the RPC device")
        raise DeviceError(f"{what} on {name} failed: the RPC session is lost (server killed, "
                          f"crashed or session timed out): {msg.splitlines()[-1]}") from err


def elf_machine(target_json: dict) -> int:
    """The ELF e_machine of libraries built for a target (its mtriple; none: this machine's CPU)."""
    arch = str(target_json.get("mtriple") or platform.machine()).split("-")[0]
    return _EM_AARCH64 if arch in ("aarch64", "arm64") else _EM_X86_64


def upload_and_load(session, lib_path, machine: int = _EM_AARCH64, remote_name: str | None = None):
    """Upload a shared library linked for the device and load it there; returns the remote Module.

    The device has no compiler, so `lib_path` must be a .so exported with the cross toolchain
    (export_library(path, fcompile=get_target("linux-arm64").toolchain.fcompile())).
    `machine` is the device's ELF e_machine (default AArch64; elf_machine(target json)).
    `remote_name` (default: the file's name) must differ between the libraries of one session:
    uploading over a library the server has loaded rewrites mapped code (it crashes at the next load).
    """
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise FileNotFoundError(f"{lib_path}: no such library to upload")
    with open(lib_path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise ValueError(f"{lib_path}: not an ELF shared object (the device cannot link a .tar; "
                         "export with fcompile=get_target('linux-arm64').toolchain.fcompile())")
    found = struct.unpack("<H", head[18:20])[0]
    if found != machine:
        want = _MACHINE_NAMES.get(machine, str(machine))
        raise ValueError(f"{lib_path}: ELF machine {_MACHINE_NAMES.get(found, found)}, expected {want} "
                         f"({machine}); build for the device's target (its mtriple and cross compiler)")
    with remote_errors(session, f"uploading/loading {lib_path.name}"):
        name = remote_name or lib_path.name
        session.upload(str(lib_path), name)  # into the session's own temp dir on the device
        return session.load_module(name)
