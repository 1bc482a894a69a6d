"""android-arm64: Android phones' CPU (AArch64, NEON + dotprod), linked with zig's clang + lld;
android-arm64-i8mm: the same for phones with i8mm (Armv8.6-A cores: Cortex-X3 / A715 / A510r1 on, e.g.
Snapdragon 8 Gen 2 and later, Dimensity 9200 and later), whose prefill GEMMs run on smmla.

No NDK is needed: TVM's LLVM emits the code for aarch64-linux-android (API level 24) and the shared
object is linked with `zig cc -target aarch64-linux-android -shared -nostdlib` (the ziglang wheel);
NEEDED entries for bionic's libc/libm/libdl and TVM's runtime libraries are recorded through empty
stub libraries, and the phone's real ones satisfy them.
"""
from .base import TargetSpec, Toolchain

API_LEVEL = 24

TOOLCHAIN = Toolchain(
    zig_target="aarch64-linux-android",
    flags=("-shared", "-fPIC", "-nostdlib", "-Wl,--no-undefined-version", "-Wl,-z,max-page-size=16384",
           "-Wl,--build-id=none"),
    stub_libs=("c", "m", "dl", "tvm_ffi", "tvm_runtime"),
)

SPEC = TargetSpec(
    name="android-arm64",
    description=f"Android AArch64 CPU (NEON, dotprod), API level {API_LEVEL}, linked by zig cc (clang + lld)",
    target_json={"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon", "+dotprod"],
                 "num-cores": 4},
    toolchain=TOOLCHAIN,
    runs_on_host=False,
    rpc_key_hint="android",
    tuning_defaults={"trials_per_task": 64, "runner": "rpc"},
    iree_flags=(f"--iree-llvmcpu-target-triple=aarch64-linux-android{API_LEVEL}",),
)

SPEC_I8MM = TargetSpec(
    name="android-arm64-i8mm",
    description="Android AArch64 CPU with i8mm (Armv8.6-A: Snapdragon 8 Gen 2+), smmla prefill GEMMs, "
                f"API level {API_LEVEL}, linked by zig cc (clang + lld)",
    target_json={"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon", "+dotprod", "+i8mm"],
                 "num-cores": 4},
    toolchain=TOOLCHAIN,
    runs_on_host=False,
    rpc_key_hint="android",
    tuning_defaults={"trials_per_task": 64, "runner": "rpc"},
)
