"""What a target is: a TVM target JSON dict, a toolchain that links the shared object, defaults."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .strategy import CpuStrategy, Strategy


class TargetError(RuntimeError):
    """Unknown target or missing toolchain; the message says what to install."""


ZIG_PACKAGE = "ziglang==0.17.1"  # setup.py pins the same version


def zig_path() -> str:
    """The `zig` executable of the ziglang wheel installed in this Python (clang + lld, any target)."""
    spec = importlib.util.find_spec("ziglang")
    if spec is None or not spec.submodule_search_locations:
        raise TargetError(f"cross toolchain: the Python package 'ziglang' (clang + lld) is not installed in "
                          f"{sys.executable}; install it with: pip install {ZIG_PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / "zig"
    if not os.access(path, os.X_OK):
        raise TargetError(f"cross toolchain: {path} is missing or not executable; reinstall with: "
                          f"pip install --force-reinstall {ZIG_PACKAGE}")
    return str(path)


@dataclass(frozen=True)
class Toolchain:
    """Links TVM's object files into a shared object for the target with `zig cc` (clang + lld from
    the ziglang wheel on the Python registry: no system compiler, no NDK, no root needed). TVM's LLVM
    generates the code; this only links."""
    zig_target: str  # zig's target triple, e.g. "aarch64-linux-android" or "aarch64-linux-gnu"
    flags: tuple[str, ...] = ()  # link flags
    stub_libs: tuple[str, ...] = ()  # NEEDED entries recorded through empty stub libraries
    zig: Callable[[], str] = zig_path  # where the zig executable is (tests point it elsewhere)

    def check(self) -> list[str]:
        """The compiler driver command (`zig cc -target T`); raises TargetError saying what to install."""
        return [self.zig(), "cc", "-target", self.zig_target]

    def _run(self, cmd: list[str], what: str) -> None:
        env = dict(os.environ)
        # zig's own cache (compiled libc stubs, compiler_rt) outlives a build; keep it per user
        env.setdefault("ZIG_GLOBAL_CACHE_DIR", str(Path.home() / ".cache" / "zig"))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise TargetError(f"{what} failed:\n{' '.join(cmd)}\n{r.stderr.strip()}")

    def _stubs(self, cc: list[str], workdir: Path) -> list[str]:
        """Build empty shared libraries named like the device's (libc.so, ...) so the linked object
        records NEEDED entries for them; the device's real libraries satisfy them at load time."""
        if not self.stub_libs:
            return []
        src = workdir / "stub.c"
        src.write_text("/* empty: only the soname matters */\n")
        outs = []
        for lib in self.stub_libs:
            out = workdir / f"lib{lib}.so"
            self._run([*cc, "-shared", "-nostdlib", f"-Wl,-soname,lib{lib}.so", "-o", str(out), str(src)],
                      f"building the stub lib{lib}.so")
            outs.append(str(out))
        # by path, not -l: zig treats -lc as "provide a libc", which it cannot for Android
        return ["-Wl,--no-as-needed", *outs]

    def link(self, output: str, objects: list[str], options=None) -> None:
        cc = self.check()
        with tempfile.TemporaryDirectory(prefix="mobilemoe-link-") as tmp:
            cmd = [*cc, *self.flags, "-o", output, *objects, *self._stubs(cc, Path(tmp)), *(options or [])]
            self._run(cmd, f"linking {output}")

    def fcompile(self):
        def f(output, objects, options=None):
            self.link(output, list(objects) if isinstance(objects, (list, tuple)) else [objects], options)
        f.output_format = "so"
        return f



def glibc_toolchain(arch: str) -> Toolchain:
    """zig cc linking a shared object for `arch` Linux with glibc 2.17 symbol versions (it loads on any
    glibc since): the linux-arm64 target's and, on Linux, the host's."""
    return Toolchain(zig_target=f"{arch}-linux-gnu.2.17", flags=("-shared", "-fPIC", "-Wl,--build-id=none"))

@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    target_json: dict
    toolchain: Toolchain | None  # None: TVM's default host compiler
    runs_on_host: bool
    rpc_key_hint: str = ""
    tuning_defaults: dict = field(default_factory=dict)
    detect: Callable[[], dict] | None = None  # fills target_json at use time (host CPU model)
    strategy: Strategy = field(default_factory=CpuStrategy)  # how it lowers (targets/strategy.py)
    host_json: dict | None = None  # the host (CPU) side of a GPU target
    iree_flags: tuple[str, ...] | None = None  # iree-compile llvm-cpu flags; None: no IREE module (--target mlir)

    def json(self, num_cores: int | None = None) -> dict:
        d = dict(self.detect() if self.detect else self.target_json)
        if num_cores:
            d["num-cores"] = num_cores
        if self.host_json is not None:
            d["host"] = dict(self.host_json)
        return d

    def tvm_target(self, num_cores: int | None = None):
        import tvm  # deferred on purpose: importing targets (CLIs, the tracker probe) must not load TVM
        d = self.json(num_cores)
        host = d.pop("host", None)
        return tvm.target.Target(d, host=tvm.target.Target(host)) if host else tvm.target.Target(d)

    def check_toolchain(self) -> None:
        if self.toolchain is not None:
            self.toolchain.check()

    def export(self, executable, path) -> None:
        """Write the compiled library to `path` as a shared object for this target."""
        path = os.fspath(path)
        if self.toolchain is None:
            executable.export_library(path)
        else:
            executable.export_library(path, fcompile=self.toolchain.fcompile())
