"""MobileMoE: train small on-device Mixture-of-Experts LMs and compile them with Apache TVM."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.13.0",  # CPU build on local disk; a looser pin pulls a multi-GB CUDA build
    "apache-tvm[popen-pool,rpc]==0.27.0.post1",  # never the [torch] extra (CUDA torch)
    "apache-tvm-ffi==0.1.14.post1",  # 0.1.15.post2 segfaults in tvm.ir.save_json (MetaSchedule)
    "xgboost-cpu",  # MetaSchedule cost model ([meta-schedule] extra pulls the larger xgboost)
    "numpy",
    "safetensors>=0.4",
    "tokenizers>=0.19",
    "jinja2>=3.1",  # imported models' chat templates, rendered in its sandbox (mobilemoe/text_format.py)
    "tqdm",
    "tornado",
    "cloudpickle",
    "psutil",
    "matplotlib",
    "scipy",  # train.scaling fit (L-BFGS-B); threadpoolctl, when present, keeps its BLAS on one thread
    "torchao==0.18.0",  # INT4 QAT (mobilemoe/quant.py matches its fake-quant bit-exactly)
    "onnx>=1.18",  # ONNX Runtime fallback: graph translated from the exported program (compiler/backends/onnx_program.py)
    "ziglang==0.17.1",  # zig cc = clang + lld in a wheel: links android-arm64 / linux-arm64 .so (no system toolchain)
    "onnxruntime==1.32.0",  # CPU contrib ops QMoE (router_weights input), MatMulNBits, GQA verified on 1.32
]

EXTRAS = {
    "test": [
        "pytest",
        "pytest-timeout",
        "pytest-xdist>=3.6",  # make test: 2 workers, --dist loadfile (tests/conftest.py shares the builds)
        "import-linter",  # tests/test_layering.py: the package layering (.importlinter)
        "pyelftools",  # compiler.reproducible.differing_symbols: where two builds' lib.so differ
        "transformers>=4.46",  # parity: GraniteMoeShared / Llama open our checkpoints
        # OpenCL kernels of android-adreno/-mali compiled and run on POCL (tests/compiler/pocl_runner.py)
        "pyopencl>=2024.1",
        "pocl-binary-distribution>=3.0",
    ],
    # mobilemoe.lm_eval_adapter; lm-eval itself needs no torch (its [hf] extra would pull one)
    "eval": ["lm-eval>=0.4.13,<0.5"],
    # --target mlir (compiler/backends/mlir.py) and its IREE runtime; no torch dependency of their own
    # (torch-mlir 20261001 works with torch 2.13). Wheels: ~80 + ~84 + ~15 MB, ~690 MB installed.
    "mlir": ["torch-mlir==20261001", "iree-base-compiler==3.13.0", "iree-base-runtime==3.13.0"],
}

setup(
    name="mobilemoe",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["mobilemoe*", "tir_kernels*", "compiler*", "passes*", "targets*", "train*"]),
    package_data={"mobilemoe": ["assets/*", "assets/**/*"], "targets": ["*.json", "*.sh"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mobilemoe-lm-eval = mobilemoe.lm_eval_adapter:main"]},
)
