#!/usr/bin/env bash
# shellcheck disable=SC2086  # word lists ($ARM64_DEBS, $pkgs, $want) are split on purpose
# arm64_device.sh - an emulated arm64 Linux "device" for MobileMoE's RPC tests, tuning and benchmarks.
#
#   host (x86_64) : the project venv (apache-tvm, compiler + RPC client) and a TVM RPC tracker on 127.0.0.1
#   device        : Debian bookworm arm64 CPython 3.11 unpacked into a private sysroot (nothing is
#                   installed into the system), aarch64 apache-tvm wheels (runtime only), running
#                   `python -m mobilemoe.runtimes.rpc_server` (TVM's rpc_server + the expert cache of
#                   budgeted artifacts; run from $REPO, which the device's Python imports it from)
#                   under qemu-user and registered with the tracker.
#
# Usage: targets/arm64_device.sh [options] COMMAND
#   setup        install host tools (apt), build the arm64 sysroot + device site dir     (idempotent)
#                into a temporary dir renamed into place when complete (atomic; one at a time)
#   check        exit 0 when setup is complete, else say what is missing                  (no changes)
#   root         print the state dir (the per-user cache entry for this venv's versions)
#   start        start the tracker (if not running) and the device server (if not running);
#                wait until the server is registered; prints TRACKER=host:port KEY=key
#   stop         kill the server and the tracker started by `start` (by PID, whole tree)
#   kill-server  kill only the device server (simulates a device that drops off)
#   status       print the tracker address and the device's servers; exit 3 when none is registered
#
# Options (env var in brackets):
#   --root DIR          state dir                 [ARM64_ROOT, default a per-user cache entry keyed
#                       on what it holds: $MOBILEMOE_CACHE/arm64-device/KEY, MOBILEMOE_CACHE
#                       defaulting to ~/.cache/mobilemoe; KEY hashes the .debs, Python and wheel versions]
#   --run-dir DIR       pid/log/port files         [ARM64_RUN_DIR, default $ROOT/run]
#   --key KEY           RPC key of the device      [ARM64_RPC_KEY, default arm64-qemu]
#   --tracker-port N    first tracker port tried   [ARM64_TRACKER_PORT, default 9290]
#   --server-port N     first server port tried    [ARM64_SERVER_PORT, default tracker port + 1]
#   --port-end N        end (exclusive) of both port searches [ARM64_PORT_END, default tracker port + 100]
#   --timeout S         seconds `start` waits for registration [ARM64_START_TIMEOUT, default 180]
# Other env: HOST_TVM_PYTHON (default $REPO/.venv/bin/python), QEMU_CPU (default neoverse-n1),
#            ARM64_KEEP_COMPILER=1 (keep the 250 MB libtvm_compiler.so on the device).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
ROOT="${ARM64_ROOT:-}"  # empty: the cache entry of setup_key (resolved after the options)
RUN="${ARM64_RUN_DIR:-}"
KEY="${ARM64_RPC_KEY:-arm64-qemu}"
TRACKER_PORT="${ARM64_TRACKER_PORT:-9290}"
SERVER_PORT="${ARM64_SERVER_PORT:-}"
PORT_END="${ARM64_PORT_END:-}"
START_TIMEOUT="${ARM64_START_TIMEOUT:-180}"
VPY="${HOST_TVM_PYTHON:-$REPO/.venv/bin/python}"
HOST=127.0.0.1
PY_VER=3.11  # bookworm's python3.11; device wheels are downloaded for this version

# host command -> Debian package that provides it
# (artifacts are linked by zig cc from the ziglang wheel in the venv: no cross compiler needed here)
HOST_TOOLS="qemu-aarch64-static:qemu-user-static dpkg-deb:dpkg"
# arm64 .debs that make up the device userland (bookworm names)
ARM64_DEBS="libc6 libgcc-s1 gcc-12-base libstdc++6 libcrypt1 zlib1g libexpat1 libffi8 libssl3
  libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libdb5.3 libnsl2
  libtirpc3 libgssapi-krb5-2 libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0 libcom-err2
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11"
# python packages the device needs, pinned to the host venv's versions (RPC wants matching tvm/tvm-ffi)
DEVICE_WHEELS="apache-tvm apache-tvm-ffi numpy ml_dtypes typing_extensions cloudpickle psutil"
# bump when what `setup` writes changes: a new cache entry is built beside the old ones
SETUP_FORMAT=2

log() { printf '[arm64-device %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------- setup
missing_tools() {  # prints "command(package)" for each missing host tool
  local t
  for t in $HOST_TOOLS; do command -v "${t%%:*}" >/dev/null || printf '%s(%s) ' "${t%%:*}" "${t##*:}"; done
}

host_versions() {  # "apache-tvm==X apache-tvm-ffi==Y ..." from the host venv
  "$VPY" - $DEVICE_WHEELS <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))
EOF
}

setup_key() {  # what a set-up device holds, hashed: the cache entry's name
  printf '%s\n' "$SETUP_FORMAT" "$PY_VER" $ARM64_DEBS "$(host_versions)" | sha256sum | cut -c1-16
}

check_host_python() {
  [ -x "$VPY" ] || die "host python '$VPY' not found: create the project venv (python3.11 -m venv .venv &&
  .venv/bin/pip install -e '.[test]') or set HOST_TVM_PYTHON"
  local bad
  bad=$("$VPY" -c 'import importlib.util as u
print(" ".join(m for m in ("tvm", "numpy", "tornado", "cloudpickle", "psutil") if u.find_spec(m) is None))')
  [ -z "$bad" ] || die "host python '$VPY' lacks: $bad (pip install -e '.[test]' in the project venv)"
}

check() {  # quiet when complete; otherwise one line per missing piece, exit 1
  local miss=() tools
  tools=$(missing_tools)
  [ -z "$tools" ] || miss+=("host tools: $tools")
  [ -f "$ROOT/sysroot/.complete" ] || miss+=("arm64 sysroot ($ROOT/sysroot)")
  [ -f "$ROOT/site/tvm/lib/libtvm_runtime.so" ] || miss+=("device site dir ($ROOT/site)")
  [ -x "$ROOT/bin/python3-arm64" ] || miss+=("device python wrapper ($ROOT/bin/python3-arm64)")
  if [ ! -f "$ROOT/setup.stamp" ]; then
    miss+=("setup stamp ($ROOT/setup.stamp): setup never finished")
  elif [ -x "$VPY" ] && [ "$(cat "$ROOT/setup.stamp")" != "$(host_versions 2>/dev/null)" ]; then
    miss+=("device wheels do not match the host venv ($(cat "$ROOT/setup.stamp"))")
  fi
  [ ${#miss[@]} -eq 0 ] && return 0
  printf 'arm64 device not set up (run: %s setup):\n' "$0" >&2
  printf '  missing %s\n' "${miss[@]}" >&2
  return 1
}

install_host_tools() {
  local tools pkgs
  tools=$(missing_tools)
  [ -z "$tools" ] && return 0
  pkgs=$(echo "$tools" | grep -o '([^)]*)' | tr -d '()' | sort -u | tr '\n' ' ')
  [ "$(id -u)" = 0 ] || die "missing host tools: $tools - install them with: sudo apt-get install -y $pkgs"
  log "apt: installing $pkgs"
  apt-get update -qq || die "apt-get update failed (network? /etc/apt/sources.list.d)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null ||
    die "apt-get install $pkgs failed"
  tools=$(missing_tools)
  [ -z "$tools" ] || die "still missing after apt-get install: $tools"
}

build_sysroot() {  # arm64 .debs via a PRIVATE apt state: no `dpkg --add-architecture`, nothing installed
  [ -f "$ROOT/sysroot/.complete" ] && return 0
  local A="$ROOT/apt"
  rm -rf "$ROOT/sysroot" "$A" "$ROOT/debs"
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$ROOT/debs" "$ROOT/sysroot"
  : > "$A/status"
  local APTO=(-o "Dir::State::Lists=$A/lists" -o "Dir::State::status=$A/status" -o "Dir::Cache=$A/cache"
              -o APT::Architecture=arm64 -o APT::Architectures=arm64 -o APT::Sandbox::User=root)
  log "apt: fetching the arm64 index and $(echo $ARM64_DEBS | wc -w) arm64 .debs"
  apt-get "${APTO[@]}" -qq update ||
    die "apt-get update of the arm64 index failed (network? /etc/apt/sources.list.d)"
  (cd "$ROOT/debs" && apt-get "${APTO[@]}" -qq download $ARM64_DEBS) || die "downloading arm64 .debs failed"
  local d
  for d in "$ROOT"/debs/*.deb; do dpkg-deb -x "$d" "$ROOT/sysroot"; done
  rm -rf "$ROOT/debs" "$A"
  [ -x "$ROOT/sysroot/usr/bin/python$PY_VER" ] || die "sysroot has no usr/bin/python$PY_VER after unpacking"
  touch "$ROOT/sysroot/.complete"
}

build_site() {  # aarch64 wheels pinned to the host's versions, unpacked into a plain site dir
  local want
  want=$(host_versions)
  [ -f "$ROOT/setup.stamp" ] && [ "$(cat "$ROOT/setup.stamp")" = "$want" ] &&
    [ -f "$ROOT/site/tvm/lib/libtvm_runtime.so" ] && return 0
  log "pip: downloading aarch64 wheels: $want"
  rm -rf "$ROOT/site" "$ROOT/wheels" "$ROOT/setup.stamp" "$ROOT/.pyc-done"
  mkdir -p "$ROOT/site" "$ROOT/wheels"
  "$VPY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PY_VER" --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux2014_aarch64 -d "$ROOT/wheels" $want 2> >(grep -v "is ignored: it is neither" >&2) ||
    die "pip download of aarch64 wheels failed (PyPI reachable? versions: $want)"
  local w
  for w in "$ROOT"/wheels/*.whl; do "$VPY" -m zipfile -e "$w" "$ROOT/site/"; done
  # the device only needs the runtime; without the compiler lib `import tvm` runs runtime-only
  [ "${ARM64_KEEP_COMPILER:-0}" = 1 ] || rm -f "$ROOT/site/tvm/lib/libtvm_compiler.so"
  rm -rf "$ROOT/wheels"
}

precompile() {  # Debian ships no .pyc (postinst makes them); bytecode is the same for every 3.11.x,
  # so the host python compiles them. Under qemu this cuts `import tvm` from ~8 s to ~2 s.
  [ -f "$ROOT/.pyc-done" ] && return 0
  if "$VPY" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$PY_VER'.split('.'))))"; then
    # tracebacks name the final paths, not the temporary dir they are compiled in
    "$VPY" -m compileall -q -j 0 -s "$ROOT" -p "${FINAL_ROOT:-$ROOT}" "$ROOT/sysroot/usr/lib/python$PY_VER" \
      "$ROOT/site" >/dev/null 2>&1 || true
  else
    log "host python is not $PY_VER: skipping .pyc precompilation (device imports will be slower)"
  fi
  touch "$ROOT/.pyc-done"
}

write_wrapper() {  # sys.executable -> the wrapper, so child interpreters (PopenWorker) also run under qemu
  mkdir -p "$ROOT/bin" "$ROOT/pyhook" "$ROOT/tmp"
  cat > "$ROOT/pyhook/sitecustomize.py" <<'EOF'
import os as _os, sys as _sys
if _os.environ.get("ARM64_PY_WRAPPER"):
    _sys.executable = _os.environ["ARM64_PY_WRAPPER"]
EOF
  # paths relative to the wrapper itself: the state dir is built under another name, then renamed
  cat > "$ROOT/bin/python3-arm64" <<EOF
#!/bin/sh
# aarch64 CPython $PY_VER + TVM runtime, emulated by qemu-user (written by targets/arm64_device.sh)
R=\$(cd "\$(dirname "\$0")/.." && pwd)
export QEMU_LD_PREFIX="\$R/sysroot" QEMU_CPU="\${QEMU_CPU:-neoverse-n1}"
export PYTHONPATH="\$R/pyhook:\$R/site" PYTHONNOUSERSITE=1 TMPDIR="\$R/tmp"
export ARM64_PY_WRAPPER="\$R/bin/python3-arm64" TVM_USE_RUNTIME_LIB=1
exec "$(command -v qemu-aarch64-static)" "\$R/sysroot/usr/bin/python$PY_VER" "\$@"
EOF
  chmod +x "$ROOT/bin/python3-arm64"
}

setup() {  # built in $ROOT.partial-PID, renamed to $ROOT once it runs: never a half-built state dir
  local t0=$SECONDS
  check_host_python
  if check 2>/dev/null; then log "already set up ($ROOT)"; return 0; fi
  mkdir -p "$(dirname "$ROOT")"
  if command -v flock >/dev/null; then  # a concurrent setup of the same dir: wait for it, then reuse it
    exec 9>"$ROOT.lock"
    flock 9
    if check 2>/dev/null; then log "set up meanwhile by another process ($ROOT)"; return 0; fi
  fi
  install_host_tools
  local final=$ROOT tmp="$ROOT.partial-$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  trap "rm -rf '$tmp'" EXIT
  [ -f "$final/sysroot/.complete" ] && cp -a "$final/sysroot" "$tmp/"  # a stale dir: keep its .debs
  ROOT=$tmp FINAL_ROOT=$final
  build_sysroot
  build_site
  precompile
  write_wrapper
  local got
  got=$("$ROOT/bin/python3-arm64" -c 'import platform, tvm; print(platform.machine(), tvm.__version__)') ||
    die "the device python cannot import tvm (see above)"
  [ "${got%% *}" = aarch64 ] || die "device python reports machine '${got%% *}', expected aarch64"
  host_versions > "$ROOT/setup.stamp"
  ROOT=$final
  if [ -e "$ROOT" ]; then  # stale or incomplete: moved aside whole, then removed
    mv "$ROOT" "$ROOT.stale-$$"
    rm -rf "$ROOT.stale-$$"
  fi
  mv -T "$tmp" "$ROOT"
  trap - EXIT
  log "setup done in $((SECONDS - t0))s: device python $got; disk $(du -sh "$ROOT" | cut -f1) ($ROOT)"
}

# ---------------------------------------------------------------------------------- processes
alive() {  # alive NAME: the PID in $RUN/NAME.pid runs one of our rpc_tracker / rpc_server processes
  local pid
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qE "(tvm\.exec|mobilemoe\.runtimes)\.rpc_"
}

kill_tree() {  # SIGTERM a PID we started and all its descendants, SIGKILL what is left after 5 s
  local pids=() todo=("$1") p c
  while [ ${#todo[@]} -gt 0 ]; do
    p=${todo[0]}; todo=("${todo[@]:1}"); pids+=("$p")
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do todo+=("$c"); done
  done
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    running "${pids[@]}" || return 0; sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

running() {  # any of these PIDs still running? (zombies wait for a slow reaper: they count as gone)
  local p
  for p; do
    [ -r "/proc/$p/stat" ] && [ "$(sed 's/.*) //; s/ .*//' "/proc/$p/stat" 2>/dev/null)" != Z ] && return 0
  done
  return 1
}

stop_one() {
  if alive "$1"; then kill_tree "$(cat "$RUN/$1.pid")"; log "stopped $1"; fi
  rm -f "$RUN/$1.pid" "$RUN/$1.port"
}

query() {  # query free|registered TRACKER_PORT [WAIT_S [PIDFILE]]: count of '$KEY' servers (0: no tracker)
  local what=$1 tport=$2; shift 2
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$VPY" -m targets.rpc_device "$what" "$HOST" "$tport" "$KEY" "$@"
}

bound_port() {  # bound_port LOG: the port from TVM's "bind to HOST:PORT" log line
  sed -n 's/.*bind to [^ ]*:\([0-9][0-9]*\).*/\1/p' "$1" | tail -1
}

fail_start() {
  log "ERROR: $1"
  local f
  for f in "$RUN"/tracker.log "$RUN"/server.log; do
    [ -f "$f" ] && { echo "----- last lines of $f" >&2; tail -n 30 "$f" >&2; }
  done
  stop_one server; stop_one tracker
  exit 1
}

start_tracker() {
  alive tracker && [ -s "$RUN/tracker.port" ] && return 0
  stop_one tracker
  log "starting rpc_tracker on $HOST, ports [$TRACKER_PORT, $PORT_END)"
  # The tracker is pure python + tornado. tvm_ffi imports torch eagerly (~2.5 s, twice: the tracker
  # runs in a PopenWorker child) and the 250 MB compiler lib is not needed: 9 s -> 1.5 s to bind.
  mkdir -p "$ROOT/trackerhook"
  echo 'import sys; sys.modules.setdefault("torch", None)  # written by arm64_device.sh' \
    > "$ROOT/trackerhook/sitecustomize.py"
  PYTHONPATH="$ROOT/trackerhook" TVM_USE_RUNTIME_LIB=1 nohup "$VPY" -m tvm.exec.rpc_tracker \
    --host "$HOST" --port "$TRACKER_PORT" --port-end "$PORT_END" > "$RUN/tracker.log" 2>&1 < /dev/null &
  echo $! > "$RUN/tracker.pid"
  local port=""
  for _ in $(seq 120); do
    port=$(bound_port "$RUN/tracker.log"); [ -n "$port" ] && break
    alive tracker || fail_start "rpc_tracker exited during start-up"
    sleep 0.25
  done
  [ -n "$port" ] || fail_start "rpc_tracker did not bind a port in [$TRACKER_PORT, $PORT_END) within 30 s"
  echo "$port" > "$RUN/tracker.port"
}

start_server() {
  local tport; tport=$(cat "$RUN/tracker.port")
  # a running, registered server may be busy in a session: leave it alone
  if alive server && [ "$(query registered "$tport")" -ge 1 ] 2>/dev/null; then return 0; fi
  stop_one server
  local sport=${SERVER_PORT:-$((tport + 1))}
  log "starting the arm64 rpc_server (qemu) key=$KEY, ports [$sport, $PORT_END)"
  # from $REPO: `-m` puts it first on the device Python's path (the wrapper sets PYTHONPATH), and the
  # server's worker, started the same way, inherits the working directory
  (cd "$REPO" && exec nohup "$ROOT/bin/python3-arm64" -m mobilemoe.runtimes.rpc_server \
    --tracker "$HOST:$tport" --key "$KEY" --host "$HOST" --port "$sport" --port-end "$PORT_END" \
    --load-library "$ROOT/site/tvm/lib/libtvm_runtime_extra.so" > "$RUN/server.log" 2>&1 < /dev/null) &
  echo $! > "$RUN/server.pid"
  local free
  free=$(query free "$tport" "$START_TIMEOUT" "$RUN/server.pid") ||
    fail_start "cannot query the tracker at $HOST:$tport"
  [ "$free" -ge 1 ] || alive server || fail_start "the arm64 rpc_server exited during start-up"
  [ "$free" -ge 1 ] ||
    fail_start "the arm64 rpc_server did not register with $HOST:$tport as '$KEY' within ${START_TIMEOUT}s"
  bound_port "$RUN/server.log" > "$RUN/server.port"
}

start() {
  local t0=$SECONDS
  check || exit 1
  check_host_python
  mkdir -p "$RUN"
  start_tracker
  start_server
  log "device '$KEY' registered at tracker $HOST:$(cat "$RUN/tracker.port") after $((SECONDS - t0))s"
  echo "TRACKER=$HOST:$(cat "$RUN/tracker.port") KEY=$KEY"
}

status() {
  alive tracker || { echo "tracker: not running ($RUN)"; return 3; }
  local tport; tport=$(cat "$RUN/tracker.port")
  echo "tracker: $HOST:$tport (pid $(cat "$RUN/tracker.pid"))"
  if alive server; then
    echo "server: pid $(cat "$RUN/server.pid"), port $(cat "$RUN/server.port" 2>/dev/null)"
  else
    echo "server: not running"
  fi
  local reg; reg=$(query registered "$tport")
  echo "device '$KEY': $reg registered, $(query free "$tport") free"
  [ "$reg" -ge 1 ] || return 3
}

# ---------------------------------------------------------------------------------------- main
usage() { sed -n '3,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
CMD=""
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=$2; shift 2 ;;
    --run-dir) RUN=$2; shift 2 ;;
    --key) KEY=$2; shift 2 ;;
    --tracker-port) TRACKER_PORT=$2; shift 2 ;;
    --server-port) SERVER_PORT=$2; shift 2 ;;
    --port-end) PORT_END=$2; shift 2 ;;
    --timeout) START_TIMEOUT=$2; shift 2 ;;
    -h|--help) usage ;;
    setup|check|root|start|stop|kill-server|status) [ -z "$CMD" ] || usage; CMD=$1; shift ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
if [ -z "$ROOT" ]; then
  check_host_python
  ROOT="${MOBILEMOE_CACHE:-$HOME/.cache/mobilemoe}/arm64-device/$(setup_key)"
fi
RUN=${RUN:-$ROOT/run}
PORT_END=${PORT_END:-$((TRACKER_PORT + 100))}
case "$CMD" in
  setup) setup ;;
  check) check ;;
  root) echo "$ROOT" ;;
  start) start ;;
  stop) stop_one server; stop_one tracker ;;
  kill-server) stop_one server ;;
  status) status ;;
  *) usage ;;
esac
