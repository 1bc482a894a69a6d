"""TVM's RPC server with mobilemoe's expert cache registered: the device side of budgeted artifacts.

    python -m mobilemoe.runtimes.rpc_server --tracker HOST:PORT --key KEY [--host H --port P --port-end E]

The same server and options as `python -m tvm.exec.rpc_server` (tvm/rpc/server.py), started with
expert_cache.serve as its server_init_callback: the server's worker imports expert_cache (which
registers the graph's callback, mobilemoe.expert_slots) and registers the remote side of the cache;
each session is forked from that worker and inherits both. A budgeted artifact's graph calls back
into the process that runs it, so over RPC the cache must live here (tvm_rpc.RemoteRuntime opens it
through the functions serve() registers). It needs tvm and numpy only, as the emulated arm64
device's Python has (targets/arm64_device.sh starts it from the repository root, so `-m` finds
this package; targets/local_rpc.py likewise). A device whose server is not Python (TVM's Android
RPC app, the C++ tvm_rpc) does not have the callback: RemoteRuntime says so when it opens the cache.
"""
from __future__ import annotations

import argparse
import logging

from tvm import rpc

from .expert_cache import serve


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mobilemoe.runtimes.rpc_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--port-end", type=int, default=9199)
    p.add_argument("--tracker", default=None, help="HOST:PORT of the RPC tracker to register with")
    p.add_argument("--key", default="", help="the device key in the tracker")
    p.add_argument("--load-library", default=None, help="further libraries to load (':'-separated)")
    p.add_argument("--custom-addr", default=None, help="the address to report to the tracker")
    p.add_argument("--silent", action="store_true")
    a = p.parse_args(argv)
    tracker = None
    if a.tracker:
        host, _, port = a.tracker.rpartition(":")
        if not host or not port.isdigit() or not a.key:
            p.error(f"--tracker: expected HOST:PORT and a --key, got {a.tracker!r} and key {a.key!r}")
        tracker = (host, int(port))
    logging.basicConfig(level=logging.INFO)
    server = rpc.Server(a.host, a.port, a.port_end, key=a.key, tracker_addr=tracker, load_library=a.load_library,
                        custom_addr=a.custom_addr, silent=a.silent, server_init_callback=serve)
    server.proc.join()


if __name__ == "__main__":
    main()
