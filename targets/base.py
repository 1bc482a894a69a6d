"""What a target is: a TVM target JSON dict, a toolchain that links the shared object, defaults."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class TargetError(RuntimeError):
    """Unknown target or missing toolchain; the message says what to install."""


@dataclass(frozen=True)
class Toolchain:
    """A C compiler driver that links TVM's object files into a shared object for the target."""
    cc: str  # executable name, e.g. "clang" or "aarch64-linux-gnu-gcc"
    packages: tuple[str, ...]  # Debian packages that provide it
    flags: tuple[str, ...] = ()  # link flags
    stub_libs: tuple[str, ...] = ()  # NEEDED entries recorded through empty stub libraries
    stub_cflags: tuple[str, ...] = ()

    def check(self) -> str:
        path = shutil.which(self.cc)
        if path is None:
            raise TargetError(f"cross toolchain '{self.cc}' not found on PATH; install it with: "
                              f"apt-get install {' '.join(self.packages)}")
        if self.stub_libs and "-fuse-ld=lld" in self.flags and shutil.which("ld.lld") is None:
            raise TargetError("linker 'ld.lld' not found on PATH; install it with: apt-get install lld")
        return path

    def _stubs(self, workdir: Path) -> list[str]:
        """Build empty shared libraries named like the device's (libc.so, ...) so the linked object
        records NEEDED entries for them; the device's real libraries satisfy them at load time."""
        if not self.stub_libs:
            return []
        src = workdir / "stub.c"
        src.write_text("/* empty: only the soname matters */\n")
        for lib in self.stub_libs:
            out = workdir / f"lib{lib}.so"
            subprocess.run([self.cc, *self.stub_cflags, "-shared", "-nostdlib", f"-Wl,-soname,lib{lib}.so",
                            "-o", str(out), str(src)], check=True, capture_output=True, text=True)
        return [f"-L{workdir}", *(f"-l{lib}" for lib in self.stub_libs)]

    def link(self, output: str, objects: list[str], options=None) -> None:
        cc = self.check()
        with tempfile.TemporaryDirectory(prefix="mobilemoe-link-") as tmp:
            cmd = [cc, *self.flags, "-o", output, *objects, *self._stubs(Path(tmp)), *(options or [])]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise TargetError(f"linking {output} failed:\n{' '.join(cmd)}\n{r.stderr}")

    def fcompile(self):
        def f(output, objects, options=None):
            self.link(output, list(objects) if isinstance(objects, (list, tuple)) else [objects], options)
        f.output_format = "so"
        return f


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
    lowering: str = "cpu"  # compiler/pipeline.py variant: "cpu" (llvm) or "gpu" (opencl, ...)
    host_json: dict | None = None  # the host (CPU) side of a GPU target
    gpu_rules: tuple[str, ...] = ()  # dlight GPU rules, in order (tvm.s_tir.dlight.gpu names)

    def json(self, num_cores: int | None = None) -> dict:
        d = dict(self.detect() if self.detect else self.target_json)
        if num_cores:
            d["num-cores"] = num_cores
        if self.host_json is not None:
            d["host"] = dict(self.host_json)
        return d

    def tvm_target(self, num_cores: int | None = None):
        import tvm
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
