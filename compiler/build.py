"""`python -m compiler.build --target android-arm64`: checkpoint -> verified artifact.

    python -m compiler.build --target {android-arm64,linux-arm64,host,onnx}
        [--checkpoint DIR]        default: the bundled default model
        [--out DIR]               default: dist/<model>-<target>/
        [--quant int4|int4-f32|none]  default: int4 (group-32 symmetric weights, mobilemoe.quant; int8
                                  activations where the CPU has a dot instruction)
        [--dump-ir DIR]           IR after every pass (TVM's DumpIR instrument) + pass timings
        [--tuning-db DIR]         apply a MetaSchedule database (compiler.tune)
        [--kv-cache inplace|grow] decode's KV cache: fixed capacity written in place (default on CPU
                                  targets, mobilemoe/kv_cache.py) or the grown copies of each step
                                  (default on GPU targets: the in-place kernels have CPU schedules only)
        [--preset NAME]           instead of a checkpoint: a preset's shapes with random weights
                                  (for speed measurements of paper-scale models)
        [--fallback onnx]         if the TVM build fails, write an ONNX Runtime artifact instead
        [--ort-accuracy-level N]  ONNX only: 0 float32 compute (default), 4 int8 activations (faster)

`--target onnx` builds the ONNX Runtime artifact (compiler/onnx_export.py) instead of a TVM one.
`--target mlir` writes MLIR (linalg + StableHLO, float32) with IREE modules (compiler/mlir_export.py).

Steps: load checkpoint -> torch.export + Relax import (compiler/importer.py) -> graph phases
(passes/) -> lowering phases with the target's schedules -> link with the target's toolchain ->
replay parameter transforms (INT4 packing) -> write the artifact atomically (compiler/artifact.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mobilemoe.checkpoint import CheckpointError, load_checkpoint
from mobilemoe.generate import DEFAULT_MODEL_DIR
from targets import TARGETS, TargetError, get_target

from .artifact import ArtifactError, write_artifact
from .importer import ENTRY_POINTS, ImportError_, import_model
from .reproducible import reproducibility
from .tuning_db import TuningDBError
from .onnx_export import TARGET_NAME as ONNX_TARGET
from .onnx_export import OnnxExportError, build_onnx
from .mlir_export import TARGET_NAME as MLIR_TARGET  # --target mlir: compiler/mlir_export.py (IREE-verified)
from .mlir_export import MlirExportError, build_mlir


class BuildError(RuntimeError):
    pass


def _entry_signature(func) -> dict:
    import tvm

    def desc(ty):
        shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in ty.shape.values]
        return {"shape": shape, "dtype": str(ty.dtype)}
    user = func.params[:int(func.attrs["num_input"])]  # tokens, positions, then each layer's K (transposed), V
    names = ["tokens", "positions", *(f"{'kv'[i % 2]}_{i // 2}" for i in range(len(user) - 2))]
    inputs = [{"name": n, **desc(p.ty)} for n, p in zip(names, user)]
    outputs = [desc(t) for t in func.ret_ty.fields]
    return {"inputs": inputs, "outputs": outputs}


def compile_model(model, target_name: str, quant: str = "int4", dump_ir: Path | None = None,
                  tuning_db: str | None = None, progress=None, random_weights: bool = False,
                  report: dict | None = None, kv_cache: str | None = None):
    """-> (executable, params {name: array}, entry_points manifest dict, pipeline phases).

    The executable is a tvm Executable; params are the packed parameters every entry point takes.
    `report` (a dict) receives what the schedule phase did: "tuning" (records applied from
    tuning_db) and "kernel_calls" (each entry's kernels in call order with their layer part).
    """
    import tvm
    from tvm import relax

    from passes.common import get_transforms, weight_params

    from .params import materialize
    from .pipeline import PipelineOptions, build_pipeline, graph_phases, phase_names

    spec = get_target(target_name)
    spec.check_toolchain()
    if kv_cache is None:  # the in-place cache kernels (compiler/kernels/kv_cache.py) have CPU schedules only
        kv_cache = "inplace" if spec.lowering == "cpu" else "grow"
    elif kv_cache == "inplace" and spec.lowering != "cpu":
        raise TargetError(f"--kv-cache inplace: its kernels (compiler/kernels/kv_cache.py) have CPU schedules only; "
                          f"target '{target_name}' lowers for {spec.lowering}: use --kv-cache grow")
    target = spec.tvm_target()
    report = {} if report is None else report
    opts = PipelineOptions(quant=quant, tuning_db=tuning_db, lowering=spec.lowering, gpu_rules=spec.gpu_rules,
                           target_name=target_name, report=report)
    step = progress or (lambda name: None)

    step("import")
    mod, _, source = import_model(model, with_weights=not random_weights, kv_cache=kv_cache)
    if random_weights:
        from .params import RandomWeights
        source = RandomWeights({p.name: tuple(int(d) for d in p.ty.shape.values)
                                for p in weight_params(mod[ENTRY_POINTS[0]])})
    instruments = []
    if dump_ir is not None:
        instruments = [tvm.ir.instrument.DumpIR(Path(dump_ir), refresh=True), tvm.ir.instrument.PassTimingInstrument()]
    with tvm.transform.PassContext(opt_level=3, instruments=instruments):
        step("graph passes")
        mod = graph_phases(opts)(mod)
        names = {e: [p.name for p in weight_params(mod[e])] for e in ENTRY_POINTS}
        transforms = {e: get_transforms(mod[e]) for e in ENTRY_POINTS}
        entry_points = {e: {**_entry_signature(mod[e]), "params": names[e]} for e in ENTRY_POINTS}
        from mobilemoe.kv_cache import BLOCK  # how the runtime holds the cache (mobilemoe/runtime.py)
        entry_points["decode"]["kv_cache"] = ({"layout": "inplace", "block": BLOCK} if kv_cache == "inplace"
                                              else {"layout": "grow"})
        step("lower + codegen")
        executable = tvm.compile(mod, target=target, relax_pipeline=build_pipeline(target, opts))
        for e in ENTRY_POINTS:  # for compiler.bench --profile: kernel -> layer part (compiler/profile.py)
            entry_points[e]["kernel_calls"] = report.get("kernel_calls", {}).get(e)
        if dump_ir is not None:
            timing = tvm.ir.instrument.PassTimingInstrument.render()
            Path(dump_ir, "pass_timing.txt").write_text(timing)
    step("pack params")
    params = {}
    for e in ENTRY_POINTS:
        todo = [n for n in names[e] if n not in params]
        params.update(materialize(todo, transforms[e], source, progress=progress is not None))
    if quant == "int4" and spec.lowering == "cpu":  # the dot-product kernels' interleaved codes
        from .kernels.select_dot import interleave_params
        interleave_params(params, target)
    return executable, params, entry_points, phase_names(opts), target


def activation_format(quant: str, spec, target) -> str:
    """How the INT4 kernels take activations: int8 through a dot instruction (compiler/kernels/int4_dot.py)
    or float32."""
    from .kernels.int4_dot import dot_isa
    isa = dot_isa(target) if quant == "int4" and spec.lowering == "cpu" else None
    from mobilemoe.quant import GROUP_SIZE
    return f"int8 per group of {GROUP_SIZE}, symmetric ({isa.name} dot products)" if isa else "float32"


def shape_only_model(preset: str):
    """A model of a preset's shapes (a name or a config JSON path) whose weights are never
    initialised (pages untouched): for random-weight builds of paper-scale presets."""
    import torch

    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.model import MobileMoE, rope_table

    cfg = MobileMoEConfig.from_name(preset)  # a preset name or a config JSON path
    with torch.device("meta"):
        model = MobileMoE(cfg)
    model = model.to_empty(device="cpu")
    model.rope_cos, model.rope_sin = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling())
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def build(checkpoint: Path | None, target_name: str, out: Path | None = None, quant: str = "int4",
          dump_ir: Path | None = None, tuning_db: str | None = None, verbose: bool = True,
          preset: str | None = None, fallback: str | None = None, ort_accuracy_level: int | None = None,
          kv_cache: str | None = None) -> Path:
    """Build an artifact from a checkpoint, or (preset given) from a preset's shapes with random weights.

    target "onnx": the ONNX Runtime artifact; any other: TVM (build_tvm). fallback="onnx": when the
    TVM build fails, say why on stderr and write the ONNX artifact where the TVM one would have gone."""
    if fallback not in (None, ONNX_TARGET):
        raise BuildError(f"--fallback: only '{ONNX_TARGET}' is supported, got {fallback!r}")
    if (target_name == ONNX_TARGET or fallback) and not quant.startswith("int4"):
        raise BuildError(f"the ONNX artifact is INT4 only: use --quant int4 with --target/--fallback {ONNX_TARGET}")
    onnx_opts = {} if ort_accuracy_level is None else {"accuracy_level": ort_accuracy_level}
    if target_name == ONNX_TARGET:
        return build_onnx(checkpoint, out, preset=preset, verbose=verbose, **onnx_opts)
    if target_name == MLIR_TARGET:  # float32 MLIR + IREE modules; --quant does not apply
        return build_mlir(checkpoint, out, preset=preset, verbose=verbose)
    if target_name not in TARGETS:  # a usage error: fail before any work, never fall back
        raise TargetError(f"unknown target '{target_name}'; known targets: "
                          f"{', '.join([*TARGETS, ONNX_TARGET, MLIR_TARGET])}")
    if fallback is None:
        return build_tvm(checkpoint, target_name, out, quant, dump_ir, tuning_db, verbose, preset, kv_cache)
    try:
        return build_tvm(checkpoint, target_name, out, quant, dump_ir, tuning_db, verbose, preset, kv_cache)
    except CheckpointError:
        raise  # the ONNX build would read the same checkpoint
    except Exception as e:  # toolchain, import, pass, codegen or link failure: anything TVM-side
        reason = f"{type(e).__name__}: {e}"
        print(f"warning: the TVM build for target '{target_name}' failed ({reason.strip()}); writing the "
              f"{ONNX_TARGET} fallback artifact instead", file=sys.stderr)
        return build_onnx(checkpoint, out, preset=preset, verbose=verbose, default_out_target=target_name,
                          fallback_from={"target": target_name, "reason": reason[:4000]}, **onnx_opts)


def build_tvm(checkpoint: Path | None, target_name: str, out: Path | None = None, quant: str = "int4",
              dump_ir: Path | None = None, tuning_db: str | None = None, verbose: bool = True,
              preset: str | None = None, kv_cache: str | None = None) -> Path:
    """The TVM artifact for `target_name` (see the module docstring for the steps)."""
    import tvm

    import mobilemoe

    from mobilemoe.quant import GROUP_SIZE, INT4_LAYOUT

    spec = get_target(target_name)  # unknown target: fail before any work
    spec.check_toolchain()
    bar = tqdm(total=6, desc=f"build {target_name}", disable=not verbose, unit="step")
    timings = {}
    last = [time.perf_counter(), None]

    def step(name):
        now = time.perf_counter()
        if last[1] is not None:
            timings[last[1]] = round(now - last[0], 2)
            bar.update(1)
        last[:] = [now, name]
        bar.set_postfix_str(name)

    step("load checkpoint")
    model = shape_only_model(preset) if preset else load_checkpoint(checkpoint)
    cfg = model.config
    report = {}
    executable, params, entries, pipeline, target = compile_model(model, target_name, quant, dump_ir, tuning_db,
                                                                  step, random_weights=preset is not None,
                                                                  report=report, kv_cache=kv_cache)
    out = Path(out) if out else Path("dist") / f"{cfg.name}-{target_name}"
    step("write artifact")
    manifest = {
        "backend": "tvm",
        "model": cfg.name,
        "target": {"name": target_name, "tvm": spec.json()},
        "runs_on_host": spec.runs_on_host,
        "versions": {"tvm": tvm.__version__, "mobilemoe": getattr(mobilemoe, "__version__", "0.1.0")},
        "pipeline": pipeline,
        "quantization": ({"format": INT4_LAYOUT, "bits": 4, "group_size": GROUP_SIZE, "symmetric": True,
                          "scale_dtype": "float16", "float_weights": ["router", "norms"],
                          "activations": activation_format(quant, spec, target),
                          "codes_order": ("interleaved (mobilemoe.quant.interleave_int4, rows and lanes from "
                                          "compiler.kernels.int4_dot.interleave_for)"
                                          if activation_format(quant, spec, target) != "float32" else "row-major")}
                         if quant.startswith("int4") else None),
        "entry_points": entries,
        "config": cfg.to_dict(),
        "weights": "random (shape-only build)" if preset else "checkpoint",
        "tuning": report.get("tuning"),  # records applied from --tuning-db (None: untuned)
        "reproducibility": reproducibility(),  # what a rebuild does not reproduce, and why
    }
    path = write_artifact(out, write_lib=lambda p: spec.export(executable, p), params=params,
                          manifest=manifest, checkpoint_dir=Path(checkpoint) if checkpoint else None)
    step(None)
    bar.close()
    if verbose:
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"wrote {path} ({size:.1f} MB); step seconds: {timings}", file=sys.stderr)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m compiler.build", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help=f"one of: {', '.join([*TARGETS, ONNX_TARGET, MLIR_TARGET])}")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--preset", default=None, help="build a preset's shapes (a name or a config JSON) with random weights (speed only)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quant", choices=["int4", "int4-f32", "none"], default="int4",
                   help="int4: INT4 weights, int8 activations in the CPU's dot-product instruction where it has one "
                        "(AVX512-VNNI, arm64 dotprod), else fp32; int4-f32: INT4 weights, fp32 activations; "
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
    a = p.parse_args(argv)
    try:
        build(None if a.preset else a.checkpoint, a.target, a.out, a.quant, a.dump_ir, a.tuning_db, preset=a.preset,
              fallback=a.fallback, ort_accuracy_level=a.ort_accuracy_level, kv_cache=a.kv_cache)
    except (TargetError, CheckpointError, ImportError_, BuildError, OnnxExportError, MlirExportError, ArtifactError,
            TuningDBError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
