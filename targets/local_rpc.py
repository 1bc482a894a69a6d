"""A TVM RPC tracker and an rpc_server of this machine, both on 127.0.0.1: a loopback "device".

    with LocalRpcDevice(key="x86-local") as dev:             # tracker + server, registered
        tune(model, "host", 8, db, rpc=dev.rpc)               # candidates timed in the server
        dev.kill_server()                                     # the device drops off (SIGKILL)
        dev.start()                                           # ... and comes back

Same interface as targets.rpc_device.EmulatedArm64Device (tracker_host, tracker_port, key,
start, kill_server, stop, request_session), without qemu: the server is this machine's Python
running `python -m mobilemoe.runtimes.rpc_server` (TVM's rpc_server with the expert cache of budgeted
artifacts registered; started from the repository root), so host-target libraries load in it. Tests use it for the
RPC paths of compiler.tuning and compiler.bench that do not depend on the device's architecture.
Every process is started here in its own process group and ended by that group's id.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .rpc_device import LOOPBACK, REPO, DeviceError, TrackedDevice, pick_port_range, registered_servers

DEFAULT_KEY = "x86-local"


class LocalRpcDevice(TrackedDevice):
    """Context manager: a private tracker + one rpc_server of this machine; stopped on exit."""

    def __init__(self, key: str = DEFAULT_KEY, start_timeout: float = 60.0, port_span: int = 40):
        self.key, self.start_timeout, self.port_span = key, start_timeout, port_span
        self.tracker_host = LOOPBACK
        self.tracker_port: int | None = None
        self.run_dir: Path | None = None
        self._base: int | None = None
        self._procs: dict[str, subprocess.Popen] = {}

    @property
    def rpc(self) -> tuple[str, int, str]:
        """(tracker host, tracker port, key): the `rpc` argument of compiler.tuning / compiler.bench."""
        return self.tracker_host, self.tracker_port, self.key

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.run_dir / f"{name}.log", "w")  # noqa: SIM115 - the child keeps it open
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True)
        log.close()
        self._procs[name] = proc
        return proc

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _end(self, name: str) -> None:
        """SIGKILL the process group of a process started here (the server's session workers too)."""
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        path = self.run_dir / f"{name}.log" if self.run_dir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def _fail(self, what: str) -> DeviceError:
        tails = "\n".join(f"----- {n}.log\n{self.log(n)[-2000:]}" for n in ("tracker", "server"))
        return DeviceError(f"local RPC device '{self.key}': {what}\n{tails}")

    def _start_tracker(self) -> None:
        self._spawn("tracker", ["tvm.exec.rpc_tracker", "--host", LOOPBACK, "--port", str(self._base),
                                "--port-end", str(self._base + self.port_span // 2)])
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            found = re.findall(r"bind to [^ ]*:(\d+)", self.log("tracker"))
            if found:
                self.tracker_port = int(found[-1])
                return
            if not self._alive("tracker"):
                raise self._fail("rpc_tracker exited during start-up")
            time.sleep(0.2)
        raise self._fail(f"rpc_tracker did not bind a port within {self.start_timeout:.0f}s")

    def start(self) -> None:
        """Start the tracker (once) and the server (if not running); returns once it is registered."""
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="mobilemoe-local-rpc-"))
            self._base = pick_port_range(self.port_span)
        if not self._alive("tracker"):
            self._start_tracker()
        if self._alive("server"):
            return
        self._spawn("server", ["mobilemoe.runtimes.rpc_server", "--tracker", f"{LOOPBACK}:{self.tracker_port}",
                               "--key", self.key, "--host", LOOPBACK,
                               "--port", str(self._base + self.port_span // 2),
                               "--port-end", str(self._base + self.port_span)])
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if registered_servers(LOOPBACK, self.tracker_port, self.key) > 0:
                return
            if not self._alive("server"):
                raise self._fail("rpc_server exited during start-up")
            time.sleep(0.2)
        raise self._fail(f"rpc_server did not register as '{self.key}' within {self.start_timeout:.0f}s")

    def kill_server(self) -> None:
        """SIGKILL the server (keep the tracker): a device that drops off mid-session."""
        self._end("server")

    def stop(self) -> None:
        self._end("server")
        self._end("tracker")
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

