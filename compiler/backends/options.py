"""What compiler.build hands every backend besides the loaded model and the resolved target."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BuildOptions:
    quant: str = "int4"  # int4 | int4-f32 | none (compiler/pipeline.py QUANT_MODES; ONNX: int4 only)
    random_weights: bool = False  # a preset's shapes with random weights (shape-only build)
    # TVM: our parameter name -> float tensor, read on access (mobilemoe.checkpoint.LazyCheckpoint); the
    # model is then shape-only. None: the model's own parameters
    weights: object | None = field(default=None, compare=False)
    checkpoint_dir: Path | None = None  # its config.json / tokenizer go into the artifact
    verbose: bool = True
    # TVM
    dump_ir: Path | None = None
    tuning_db: str | None = None
    kv_cache: str | None = None  # inplace | grow; None: the target strategy's default
    # routed experts in an expert file read through a cache (compiler.residency.ResidencyPlan); None: resident
    residency: object | None = None
    # ONNX Runtime
    accuracy_level: int = 0  # MatMulNBits / QMoE compute: 0 float32, 4 int8 activations
    external_data: bool | None = None  # weights in model.onnx.data; None: when over 1 GiB
    fallback_from: dict | None = None  # {"target", "reason"}: this artifact replaces a failed build
    # MLIR / IREE
    iree_targets: tuple[str, ...] | None = None  # targets to compile IREE modules for; None: all that have them
