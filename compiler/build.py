"""`python -m compiler.build --target android-arm64`: checkpoint -> verified artifact.

    python -m compiler.build --target {android-arm64,linux-arm64,host,android-adreno,android-mali,onnx,mlir}
        [--checkpoint DIR]        default: the bundled default model
        [--out DIR]               default: dist/<model>-<target>/
        [--quant int4|int4-f32|none]  default: int4 (group-32 symmetric weights, mobilemoe.quant; int8
                                  activations where the CPU has a dot instruction)
        [--dump-ir DIR]           IR after every pass (TVM's DumpIR instrument) + pass timings
        [--tuning-db DIR]         apply a MetaSchedule database (compiler.tuning)
        [--kv-cache inplace|grow] decode's KV cache: fixed capacity written in place (default on CPU
                                  targets, mobilemoe/kv_cache.py) or the grown copies of each step
                                  (default on GPU targets: the in-place kernels have CPU schedules only)
        [--preset NAME]           instead of a checkpoint: a preset's shapes with random weights
                                  (for speed measurements of paper-scale models)
        [--memory-budget-mb N [--budget-context T]]    the run in at most N MB: non-expert weights resident, routed experts in a
                                  page-aligned expert file read on demand into a cache (compiler/residency.py;
                                  CPU TVM targets, INT4; refused when it cannot hold one layer's top-k experts)
        [--routing-stats FILE]    with a budget: compiler.routing's routing.json, to pin the most used experts
        [--fallback onnx]         if the TVM build fails, write an ONNX Runtime artifact instead
        [--ort-accuracy-level N]  ONNX only: 0 float32 compute (default), 4 int8 activations (faster)

`build(checkpoint, target, ...)` opens the checkpoint once, resolves the target once and hands both
to one backend (compiler/backends/). A TVM target gets a model of the checkpoint's shapes (traced,
never filled) and its weights read one tensor at a time as they are packed (LazyCheckpoint,
compiler/params.py): a build never holds the model's weights in float; the other backends get the
loaded model. A target of targets/ builds with TVM, `--target onnx` the ONNX Runtime artifact,
`--target mlir` MLIR (linalg + StableHLO, float32) with IREE modules. With
`--fallback onnx`, a failed TVM build writes the ONNX artifact where the TVM one would have gone.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from mobilemoe.artifact import ArtifactError
from mobilemoe.checkpoint import CheckpointError, LazyCheckpoint, load_checkpoint, shape_only_model
from mobilemoe.generate import DEFAULT_MODEL_DIR
from targets import TARGETS, TargetError, get_target

from .backends import BACKENDS
from .backends import tvm as tvm_backend
from .backends.mlir import MlirExportError
from .backends.onnx import DEFAULT_ACCURACY_LEVEL, OnnxExportError
from .backends.onnx import TARGET_NAME as ONNX_TARGET
from .backends.options import BuildOptions
from .importer import ImportError_
from .residency import BudgetError, plan_residency
from .routing import RoutingError, load_stats
from .tuning.database import TuningDBError

TARGET_NAMES = (*TARGETS, *BACKENDS)


class BuildError(RuntimeError):
    """A build request that cannot be served (an option that does not apply to the target)."""


def resolve(target_name: str):
    """--target -> (backend module, targets.TargetSpec or None); an unknown name fails before any work."""
    if target_name in BACKENDS:
        return BACKENDS[target_name], None
    if target_name not in TARGETS:
        raise TargetError(f"unknown target '{target_name}'; known targets: {', '.join(TARGET_NAMES)}")
    return tvm_backend, get_target(target_name)


def build(checkpoint: Path | None, target_name: str, out: Path | None = None, quant: str = "int4",
          dump_ir: Path | None = None, tuning_db: str | None = None, verbose: bool = True,
          preset: str | None = None, fallback: str | None = None, ort_accuracy_level: int | None = None,
          kv_cache: str | None = None, iree_targets: tuple[str, ...] | None = None,
          external_data: bool | None = None, memory_budget_mb: float | None = None,
          budget_context: int | None = None,
          routing_stats: Path | None = None) -> Path:
    """Build an artifact from a checkpoint, or (preset given) from a preset's shapes with random weights.

    fallback="onnx": when the TVM build fails, say why on stderr and write the ONNX artifact where the
    TVM one would have gone."""
    if fallback not in (None, ONNX_TARGET):
        raise BuildError(f"--fallback: only '{ONNX_TARGET}' is supported, got {fallback!r}")
    if (target_name == ONNX_TARGET or fallback) and not quant.startswith("int4"):
        raise BuildError(f"the ONNX artifact is INT4 only: use --quant int4 with --target/--fallback {ONNX_TARGET}")
    backend, spec = resolve(target_name)  # a usage error: fail before any work, never fall back
    if tuning_db and spec is None:
        raise BuildError(f"--tuning-db: target '{target_name}' is not built by TVM; tuning applies to TVM targets")
    if memory_budget_mb is not None:
        _check_budget_target(target_name, spec, fallback, quant, kv_cache)
    elif routing_stats is not None:
        raise BuildError("--routing-stats chooses the resident experts of a --memory-budget-mb build; give a budget")
    elif budget_context is not None:
        raise BuildError("--budget-context is the context a --memory-budget-mb build plans for; give a budget")
    weights = None
    if preset:
        model = shape_only_model(preset)
    elif spec is not None:  # TVM: the graph from the model's shapes, each weight read when it is packed
        weights = LazyCheckpoint(checkpoint)
        model = shape_only_model(weights.config)
    else:
        model = load_checkpoint(checkpoint)  # the one load
    residency = None
    if memory_budget_mb is not None:  # refused here, before anything is built, when it cannot run
        stats = load_stats(routing_stats) if routing_stats is not None else None
        residency = plan_residency(model.config, memory_budget_mb, stats, budget_context)
    out = Path(out) if out else Path("dist") / f"{model.config.name}-{target_name}"
    options = BuildOptions(quant=quant, random_weights=preset is not None, weights=weights,
                           checkpoint_dir=Path(checkpoint) if checkpoint and not preset else None, verbose=verbose,
                           dump_ir=dump_ir, tuning_db=tuning_db, kv_cache=kv_cache,
                           accuracy_level=DEFAULT_ACCURACY_LEVEL if ort_accuracy_level is None else ort_accuracy_level,
                           external_data=external_data, iree_targets=iree_targets, residency=residency)
    if fallback is None or spec is None:
        return backend.build_artifact(model, spec, out, options)
    try:
        return backend.build_artifact(model, spec, out, options)
    except Exception as e:  # toolchain, import, pass, codegen or link failure: anything TVM-side
        reason = f"{type(e).__name__}: {e}"
        print(f"warning: the TVM build for target '{target_name}' failed ({reason.strip()}); writing the "
              f"{ONNX_TARGET} fallback artifact instead", file=sys.stderr)
        fallback_from = {"target": target_name, "reason": reason[:4000]}
        if weights is not None:  # the ONNX graph holds its weights: load them
            model = load_checkpoint(checkpoint)
        return BACKENDS[ONNX_TARGET].build_artifact(model, None, out, replace(options, weights=None,
                                                                            fallback_from=fallback_from))


def _check_budget_target(target_name: str, spec, fallback: str | None, quant: str, kv_cache: str | None) -> None:
    """--memory-budget-mb applies to INT4 builds of CPU TVM targets (the expert cache is host memory) with
    the in-place KV cache (the budget holds the cache once: compiler/residency.py)."""
    if spec is None or fallback is not None:
        which = target_name if spec is None else f"--fallback {fallback}"
        raise BuildError(f"--memory-budget-mb: {which} keeps every expert in its graph's weights; expert residency "
                         f"needs a TVM target (the expert file is read through the TVM runtime)")
    if not quant.startswith("int4"):
        raise BuildError(f"--memory-budget-mb: the expert file holds INT4 experts; use --quant int4 or int4-f32, "
                         f"not {quant!r}")
    if spec.strategy.name != "cpu":
        raise BuildError(f"--memory-budget-mb: target '{target_name}' lowers for {spec.strategy.name}; the expert "
                         f"cache fills host memory and runs on CPU targets only")
    if kv_cache == "grow":
        raise BuildError("--memory-budget-mb plans for the in-place KV cache (allocated once, written in place); "
                         "--kv-cache grow copies the cache every step: drop it")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m compiler.build", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help=f"one of: {', '.join(TARGET_NAMES)}")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--preset", default=None, help="build a preset's shapes (a name or a config JSON) with random weights (speed only)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quant", choices=["int4", "int4-f32", "none"], default="int4",
                   help="int4: INT4 weights, int8 activations in the CPU's dot-product instruction where it has one "
                        "(AVX512-VNNI, AVX2, arm64 dotprod), else fp32; int4-f32: INT4 weights, fp32 activations; "
                        "none: float32")
    p.add_argument("--dump-ir", type=Path, default=None)
    p.add_argument("--kv-cache", choices=["inplace", "grow"], default=None,
                   help="decode's KV cache: fixed capacity written in place (default on CPU targets) or grown copies "
                        "each step (default on GPU targets)")
    p.add_argument("--tuning-db", type=str, default=None)
    p.add_argument("--fallback", choices=[ONNX_TARGET], default=None,
                   help="if the TVM build fails, write an ONNX Runtime artifact instead (saying why)")
    p.add_argument("--ort-accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=None,
                   help="ONNX artifact: MatMulNBits/QMoE compute, 0 = float32 (default), 4 = int8 activations")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="the model's memory at run time in at most N MB (weights, KV cache, activations, code): "
                        "routed experts in an expert file, read on demand into a cache")
    p.add_argument("--budget-context", type=int, default=None,
                   help="with --memory-budget-mb: the context (tokens) it plans the KV cache for (default: the "
                        "model's max_seq_len; the runtime refuses to go past it)")
    p.add_argument("--routing-stats", type=Path, default=None,
                   help="with --memory-budget-mb: compiler.routing's routing.json, to pin the most used experts")
    a = p.parse_args(argv)
    try:
        build(None if a.preset else a.checkpoint, a.target, a.out, a.quant, a.dump_ir, a.tuning_db, preset=a.preset,
              fallback=a.fallback, ort_accuracy_level=a.ort_accuracy_level, kv_cache=a.kv_cache,
              memory_budget_mb=a.memory_budget_mb, routing_stats=a.routing_stats,
              budget_context=a.budget_context)
    except (TargetError, CheckpointError, ImportError_, BuildError, OnnxExportError, MlirExportError, ArtifactError,
            TuningDBError, BudgetError, RoutingError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
