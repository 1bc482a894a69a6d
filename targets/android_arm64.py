"""android-arm64: Android phones' CPU (AArch64, NEON + dotprod), linked with Debian's clang + lld.

There is no NDK here: the shared object is linked with `clang --target=aarch64-linux-android24
-shared -nostdlib -fuse-ld=lld`; NEEDED entries for bionic's libc/libm/libdl and TVM's runtime
libraries are recorded through empty stub libraries, and the phone's real ones satisfy them.
"""
from .base import TargetSpec, Toolchain

API_LEVEL = 24

TOOLCHAIN = Toolchain(
    cc="clang",
    packages=("clang", "lld"),
    flags=(f"--target=aarch64-linux-android{API_LEVEL}", "-shared", "-fPIC", "-nostdlib", "-fuse-ld=lld",
           "-Wl,--no-undefined-version", "-Wl,-z,max-page-size=16384"),
    stub_libs=("c", "m", "dl", "tvm_ffi", "tvm_runtime"),
    stub_cflags=(f"--target=aarch64-linux-android{API_LEVEL}", "-fuse-ld=lld"),
)

SPEC = TargetSpec(
    name="android-arm64",
    description="Android AArch64 CPU (NEON, dotprod), clang + lld, API level 24",
    target_json={"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon", "+dotprod"],
                 "num-cores": 4},
    toolchain=TOOLCHAIN,
    runs_on_host=False,
    rpc_key_hint="android",
    tuning_defaults={"trials_per_task": 64, "runner": "rpc"},
)
