"""The backends: siblings that each write an artifact from one loaded model (compiler.build loads
it once, resolves the target once and decides the fallback); none imports another.

    tvm.py    TVM Relax: the pipeline with the target's strategy, codegen, link   (manifest backend "tvm")
    onnx.py   ONNX Runtime: the exported program translated (onnx_program.py)    (manifest backend "onnx")
    mlir.py   torch-mlir linalg / StableHLO + IREE modules                         (manifest backend "iree")

Each is `build_artifact(model, spec, out, options) -> Path` (spec: the targets.TargetSpec for TVM,
None for the others; options: options.BuildOptions). Shared pieces live one level up
(compiler/artifact.py, importer.py, params.py).
"""
from __future__ import annotations

from . import mlir, onnx, tvm

# --target name -> backend module, for the targets that are a backend of their own; every name of
# targets.TARGETS builds with tvm
BACKENDS = {onnx.TARGET_NAME: onnx, mlir.TARGET_NAME: mlir}
