"""The emulated arm64 device (qemu) and TVM RPC sessions for tests, tuning and benchmarks.

    with EmulatedArm64Device() as device:              # targets/arm64_device.sh setup + start ... stop
        sess = request_session(device.tracker_host, device.tracker_port, device.key, timeout=60)
        mod = upload_and_load(sess, "model_aarch64.so")  # a .so linked by linux-arm64's zig cc
        with remote_errors(sess, "main"):                # a dropped device -> DeviceError, no hang
            mod["main"](*args)

The tracker protocol is spoken over plain sockets (length-prefixed JSON, tvm/rpc/base.py), so probing
a tracker never imports tvm and never blocks: TVM's own client retries an unreachable tracker for 60 s
and waits forever for a device that is not registered. `tvm` is imported only to open a session.

`python -m targets.rpc_device free|registered HOST PORT KEY [WAIT_S [PIDFILE]]` prints how many servers
are free/registered as KEY (0 when the tracker is unreachable), waiting up to WAIT_S for one;
targets/arm64_device.sh uses it to wait for registration.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# what runs an artifact over a session (stdlib only: probing a tracker stays free of tvm)
from mobilemoe.runtimes.rpc_session import DeviceError, elf_machine, remote_errors, upload_and_load

SCRIPT = Path(__file__).resolve().with_name("arm64_device.sh")
REPO = SCRIPT.parent.parent
DEFAULT_KEY = "arm64-qemu"
LOOPBACK = "127.0.0.1"

# tvm/rpc/base.py: RPC_TRACKER_MAGIC and TrackerCode
_TRACKER_MAGIC = 0x2F271
_SUCCESS, _REQUEST, _SUMMARY = 0, 4, 6


class TrackerTimeout(DeviceError, TimeoutError):
    """A tracker accepted the connection but did not answer in time."""


def state_dir() -> Path:
    """Where targets/arm64_device.sh keeps the sysroot, device site dir, pid and log files: $ARM64_ROOT,
    else a per-user cache entry named by what it holds (the script's `root`: ~/.cache/mobilemoe/
    arm64-device/KEY, $MOBILEMOE_CACHE moving the base), so every clone of this machine shares one set-up."""
    if os.environ.get("ARM64_ROOT"):
        return Path(os.environ["ARM64_ROOT"])
    env = dict(os.environ, HOST_TVM_PYTHON=os.environ.get("HOST_TVM_PYTHON", sys.executable))
    proc = subprocess.run(["bash", str(SCRIPT), "root"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise DeviceError(f"`{SCRIPT.name} root` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return Path(proc.stdout.strip())


# ------------------------------------------------------------------------------ tracker protocol
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the tracker")
        buf += chunk
    return buf


def _tracker_call(host: str, port: int, request: list, timeout: float):
    """Open a tracker connection, send one JSON request, return its JSON answer."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<i", _TRACKER_MAGIC))
            if struct.unpack("<i", _recv_exact(sock, 4))[0] != _TRACKER_MAGIC:
                raise DeviceError(f"{host}:{port} answered, but is not a TVM RPC tracker")
            data = json.dumps(request).encode()
            sock.sendall(struct.pack("<i", len(data)) + data)
            size = struct.unpack("<i", _recv_exact(sock, 4))[0]
            return json.loads(_recv_exact(sock, size))
    except TimeoutError as err:
        raise TrackerTimeout(f"RPC tracker {host}:{port} did not answer within {timeout:.0f}s") from err
    except OSError as err:
        raise DeviceError(
            f"RPC tracker {host}:{port} is not reachable ({err}); start one with "
            f"`{SCRIPT.relative_to(REPO)} start` (it prints TRACKER=host:port)"
        ) from err


def tracker_summary(host: str, port: int, timeout: float = 10.0) -> dict:
    """{'queue_info': {key: {'free', 'pending'}}, 'server_info': [{'key': 'server:KEY', 'addr'}]}"""
    answer = _tracker_call(host, port, [_SUMMARY], timeout)
    if answer[0] != _SUCCESS:
        raise DeviceError(f"RPC tracker {host}:{port} refused a summary request: {answer}")
    return answer[1]


def free_servers(host: str, port: int, key: str) -> int:
    """Servers registered as `key` and not in a session."""
    return tracker_summary(host, port)["queue_info"].get(key, {}).get("free", 0)


def registered_servers(host: str, port: int, key: str) -> int:
    """Servers registered as `key`, free or busy."""
    info = tracker_summary(host, port)["server_info"]
    return sum(1 for server in info if server.get("key") == f"server:{key}")


def parse_tracker(value: str | None) -> tuple[str, int] | None:
    """--rpc-tracker HOST:PORT (argparse type) -> (host, port); None when not given."""
    if not value:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--rpc-tracker: expected HOST:PORT, got {value!r}")
    return host, int(port)


def request_session(tracker_host: str, tracker_port: int, key: str, timeout: float = 60.0,
                    session_timeout: float = 0):
    """A tvm.rpc.RPCSession on a free device registered as `key`, or DeviceError within ~timeout s.

    session_timeout (s, 0 = none) lets the server end a session that runs too long.
    """
    where = f"tracker {tracker_host}:{tracker_port}"
    deadline = time.monotonic() + timeout
    while True:  # wait for a free server: the tracker itself would queue the request forever
        summary = tracker_summary(tracker_host, tracker_port)
        if summary["queue_info"].get(key, {}).get("free", 0) > 0:
            break
        if time.monotonic() >= deadline:
            registered = sorted({s["key"].split(":", 1)[-1] for s in summary["server_info"]
                                 if s.get("key", "").startswith("server:")})
            if key in registered:
                raise DeviceError(f"device '{key}' at {where} stayed busy for {timeout:.0f}s")
            raise DeviceError(
                f"no RPC server with key '{key}' is registered at {where} (registered keys: "
                f"{', '.join(registered) or 'none'}); is the device running? "
                f"(`{SCRIPT.relative_to(REPO)} status`)")
        time.sleep(0.5)
    try:  # the server can be taken between the summary and the request: bounded wait
        answer = _tracker_call(tracker_host, tracker_port, [_REQUEST, key, "", 1],
                               max(deadline - time.monotonic(), 5.0))
    except TrackerTimeout as err:
        raise DeviceError(f"{where} did not hand out device '{key}' within {timeout:.0f}s") from err
    if answer[0] != _SUCCESS:
        raise DeviceError(f"{where} refused the request for device '{key}': {answer}")
    url, port, matchkey = answer[1]

    from tvm import rpc  # pylint: disable=import-outside-toplevel

    try:
        session = rpc.connect(url, port, matchkey, session_timeout=session_timeout)
    except Exception as err:  # noqa: BLE001 - tvm raises TVMError / RuntimeError variants
        raise DeviceError(f"{where} handed out device '{key}' at {url}:{port}, but connecting "
                          f"failed: {err}") from err
    session.device_name = f"device '{key}' at {url}:{port} ({where})"  # for remote_errors()
    return session


# --------------------------------------------------------------------------------- the device
def pick_port_range(span: int) -> int:
    """A base port below Linux's ephemeral range whose first port is free now; the tracker and
    server search [base, base+span) themselves, so a port taken in between costs nothing."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - span)
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, base))
                return base
            except OSError:
                continue
    raise DeviceError("found no free port in 20000-32000 on 127.0.0.1")


class TrackedDevice:
    """What the RPC devices share: a session from their tracker, and `with device:` that starts it
    (stopping whatever did start when starting fails) and stops it. Subclasses set tracker_host,
    tracker_port, key and define start() / stop()."""

    def request_session(self, timeout: float = 60.0, session_timeout: float = 0):
        return request_session(self.tracker_host, self.tracker_port, self.key, timeout, session_timeout)

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class EmulatedArm64Device(TrackedDevice):
    """Context manager: set up (optional), start a private tracker + arm64 RPC server, stop on exit.

    Each instance gets its own run dir (pid/log files) and ports, so concurrent test runs sharing
    one state dir do not clash.
    """

    def __init__(self, key: str = DEFAULT_KEY, root: str | os.PathLike | None = None,
                 setup: bool = True, start_timeout: float = 180.0, port_span: int = 40, cpu: str | None = None):
        self.key, self.setup_first = key, setup
        self.cpu = cpu  # qemu's CPU model (QEMU_CPU); None: the script's default, neoverse-n1 (no i8mm)
        self.root = Path(root) if root else state_dir()
        self.start_timeout, self.port_span = start_timeout, port_span
        self.tracker_host = LOOPBACK
        self.tracker_port: int | None = None
        self.run_dir: Path | None = None
        self._base_port: int | None = None

    # -- script wrappers
    def _script(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
        env = dict(os.environ, ARM64_ROOT=str(self.root))
        if self.cpu:
            env["QEMU_CPU"] = self.cpu
        env.setdefault("HOST_TVM_PYTHON", sys.executable)  # device wheels match this tvm
        if self.run_dir is not None:
            env["ARM64_RUN_DIR"] = str(self.run_dir)
        return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def setup_problem(self) -> str | None:
        """None when `arm64_device.sh setup` is complete, else what is missing."""
        proc = self._script("check", timeout=60)
        return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()

    def setup(self) -> None:
        proc = self._script("setup", timeout=1800)
        if proc.returncode != 0:
            raise DeviceError(f"`{SCRIPT.name} setup` failed (exit {proc.returncode}):\n"
                              f"{proc.stderr[-4000:]}")

    def start(self) -> None:
        """Start the tracker and the device server, or only what is not running (e.g. after
        kill_server()); returns once the server is registered."""
        if self.run_dir is None:
            (self.root / "run").mkdir(parents=True, exist_ok=True)
            self.run_dir = Path(tempfile.mkdtemp(prefix=f"py{os.getpid()}-", dir=self.root / "run"))
            self._base_port = pick_port_range(self.port_span)
        proc = self._script("start", "--key", self.key, "--tracker-port", str(self._base_port),
                            "--port-end", str(self._base_port + self.port_span),
                            "--timeout", str(int(self.start_timeout)),
                            timeout=self.start_timeout + 60)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TRACKER=")]
        if proc.returncode != 0 or not line:
            raise DeviceError(f"`{SCRIPT.name} start` failed (exit {proc.returncode}), run dir "
                              f"{self.run_dir}:\n{proc.stderr[-4000:]}")
        host_port = line[-1].split()[0].split("=", 1)[1]
        self.tracker_host, port = host_port.rsplit(":", 1)
        self.tracker_port = int(port)

    def kill_server(self) -> None:
        """Kill the device's RPC server (whole process tree), keep the tracker: a device drops off."""
        self._script("kill-server", timeout=60)

    def stop(self) -> None:
        if self.run_dir is None:
            return
        self._script("stop", timeout=60)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir = None

    def server_log(self) -> str:
        path = self.run_dir / "server.log" if self.run_dir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def __enter__(self) -> EmulatedArm64Device:
        if self.setup_first:
            self.setup()
        return super().__enter__()


def _main(argv: list[str]) -> int:
    count = {"free": free_servers, "registered": registered_servers}
    if len(argv) < 4 or argv[0] not in count:
        print("usage: rpc_device.py free|registered HOST PORT KEY [WAIT_S [PIDFILE]]", file=sys.stderr)
        return 2
    host, port, key = argv[1], int(argv[2]), argv[3]
    wait = float(argv[4]) if len(argv) > 4 else 0.0
    pidfile = argv[5] if len(argv) > 5 else None
    deadline = time.monotonic() + wait
    while True:
        try:
            found = count[argv[0]](host, port, key)
        except (DeviceError, ValueError, KeyError):
            found = 0
        if found > 0 or time.monotonic() >= deadline:
            break
        if pidfile:  # give up early when the server process died
            try:
                os.kill(int(Path(pidfile).read_text()), 0)
            except (OSError, ValueError):
                break
        time.sleep(0.5)
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
