"""The TVM backend: a loaded model -> Relax import -> the pipeline for the target -> linked lib.so
+ packed params -> the artifact (manifest backend "tvm").

Steps: torch.export + Relax import (compiler/importer.py) -> graph phases (passes/) -> lowering
phases with the target strategy's passes and schedules (compiler/pipeline.py) -> link with the
target's toolchain -> write the artifact atomically (compiler/artifact.py), replaying the recorded
parameter transforms (INT4 packing, the dot kernels' word order; compiler/params.py) one tensor at
a time into params.safetensors: the weights are never all in memory, in float or packed.
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import tvm
from tqdm import tqdm

import mobilemoe
from mobilemoe.kv_cache import BLOCK
from mobilemoe.quant import GROUP_SIZE, INT4_LAYOUT
from passes.common import get_transforms, param_parts, weight_params
from passes.use_expert_slots import UseExpertSlots
from targets import TargetError

from ..artifact import write_artifact
from ..expert_file import EXPERTS_NAME, expert_layout, write_expert_file
from ..importer import ENTRY_POINTS, import_model
from ..params import PackedParams, RandomWeights, model_weights
from ..pipeline import build_pipeline, graph_phases, options_for, phase_names
from ..reproducible import reproducibility
from ..tuning.database import TunedKernels
from .options import BuildOptions

BACKEND = "tvm"


def _entry_signature(func) -> dict:
    def desc(ty):
        shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in ty.shape.values]
        return {"shape": shape, "dtype": str(ty.dtype)}
    user = func.params[:int(func.attrs["num_input"])]  # tokens, positions, then each layer's K (transposed), V
    names = ["tokens", "positions", *(f"{'kv'[i % 2]}_{i // 2}" for i in range(len(user) - 2))]
    inputs = [{"name": n, **desc(p.ty)} for n, p in zip(names, user)]
    outputs = [desc(t) for t in func.ret_ty.fields]
    return {"inputs": inputs, "outputs": outputs}


def kv_cache_layout(spec, kv_cache: str | None) -> str:
    """decode's KV cache for a target: the one asked for, else its strategy's default."""
    strategy = spec.strategy
    if kv_cache is None:
        return strategy.kv_cache_default
    if kv_cache == "inplace" and not strategy.inplace_kv:
        raise TargetError(f"--kv-cache inplace: its kernels (tir_kernels/kv_cache.py) have CPU schedules only; "
                          f"target '{spec.name}' lowers for {strategy.name}: use --kv-cache grow")
    return kv_cache


def compile_model(model, spec, quant: str = "int4", dump_ir: Path | None = None, tuning_db: str | None = None,
                  progress=None, random_weights: bool = False, report: dict | None = None,
                  kv_cache: str | None = None, weights=None, residency=None):
    """-> (executable, params (compiler.params.PackedParams), entry_points manifest dict, pipeline phases,
    pipeline options).

    `spec` is a targets.TargetSpec. The executable is a tvm Executable; params are the packed
    parameters every entry point takes, produced when written (PackedParams.write streams them one
    tensor at a time; .arrays() materializes them). Their float source: random (random_weights),
    `weights` (a mapping of our parameter names -> float tensors read on access, e.g.
    mobilemoe.checkpoint.LazyCheckpoint) or else the model's own parameters. The model is only traced:
    the graph is imported without weights. `report` (a dict) receives what the schedule phase did:
    "tuning" (records applied from tuning_db) and "kernel_calls" (each entry's kernels in call
    order with their layer part). `residency` (a compiler.residency.ResidencyPlan): routed experts read
    through a cache of residency.slots slots (passes/use_expert_slots.py), not parameters; report then
    gets "experts": {"layers", "pools", "params" (the experts' PackedParams, [E, ...] per tensor)}.
    """
    spec.check_toolchain()
    kv_cache = kv_cache_layout(spec, kv_cache)
    target = spec.tvm_target()
    report = {} if report is None else report
    tuning = partial(TunedKernels, tuning_db, spec.name) if tuning_db else None
    opts = options_for(spec, target, quant, tuning=tuning, report=report)
    step = progress or (lambda name: None)

    step("import")
    # prefill writes the in-place cache too: its prompt attends through prefix_attention (causal, online
    # softmax, no [S, S] scores: prefill 512 tokens of moe-1b-32k 1.2x the two einsums), and a budget
    # holds the cache once (compiler/residency.py)
    inplace_prefill = kv_cache == "inplace"
    mod, imported, _ = import_model(model, with_weights=False, kv_cache=kv_cache,  # shapes only: no weight copy
                                    inplace_prefill=inplace_prefill)
    if random_weights:
        source = RandomWeights({p.name: tuple(int(d) for d in p.ty.shape.values)
                                for p in weight_params(mod[ENTRY_POINTS[0]])})
    else:
        source = model_weights(model, imported, weights)
    instruments = []
    if dump_ir is not None:
        instruments = [tvm.ir.instrument.DumpIR(Path(dump_ir), refresh=True), tvm.ir.instrument.PassTimingInstrument()]
    with tvm.transform.PassContext(opt_level=3, instruments=instruments):
        step("graph passes")
        mod = graph_phases(opts)(mod)
        transforms = {e: get_transforms(mod[e]) for e in ENTRY_POINTS}
        if residency is not None:
            mod = _use_expert_slots(mod, residency, report, source, transforms, progress is not None)
        names = {e: [p.name for p in weight_params(mod[e])] for e in ENTRY_POINTS}
        entry_points = {e: {**_entry_signature(mod[e]), "params": names[e]} for e in ENTRY_POINTS}
        for e in ENTRY_POINTS:  # each param's layer part (model modules, MoE operand roles): bench/common.py
            parts = param_parts(mod[e])
            entry_points[e]["param_parts"] = {n: parts[n] for n in names[e] if n in parts}
        # how the runtime holds the cache (mobilemoe/runtimes/tvm_local.py)
        entry_points["decode"]["kv_cache"] = ({"layout": "inplace", "block": BLOCK} if kv_cache == "inplace"
                                              else {"layout": "grow"})
        if inplace_prefill:
            entry_points["prefill"]["kv_cache"] = {"layout": "inplace", "block": BLOCK}
        step("lower + codegen")
        executable = tvm.compile(mod, target=target, relax_pipeline=build_pipeline(target, opts))
        for e in ENTRY_POINTS:  # for compiler.bench --profile: kernel -> layer part (compiler/profile.py)
            entry_points[e]["kernel_calls"] = report.get("kernel_calls", {}).get(e)
        if dump_ir is not None:
            timing = tvm.ir.instrument.PassTimingInstrument.render()
            Path(dump_ir, "pass_timing.txt").write_text(timing)
    # the recorded transforms (the dot kernels' interleaved codes included), replayed when written
    params = PackedParams(source, progress=progress is not None)
    pools = {p["name"] for p in report.get("experts", {}).get("pools", [])}  # the runtime's, not stored
    for e in ENTRY_POINTS:
        params.add(_types(mod[e], skip=pools), transforms[e])  # as the compiled program takes them
    return executable, params, entry_points, phase_names(opts), opts


def _types(func, skip=()) -> dict:
    return {p.name: (str(p.ty.dtype), [int(d) for d in p.ty.shape.values]) for p in weight_params(func)
            if p.name not in skip}


def _use_expert_slots(mod, residency, report: dict, source, transforms: dict, progress: bool):
    """mod with its routed experts read through slots; report["experts"] says which tensors went where."""
    before = {e: _types(mod[e]) for e in ENTRY_POINTS}
    experts = {}
    mod = UseExpertSlots(residency.slots, experts)(mod)
    if "layers" not in experts:
        raise TargetError("--memory-budget-mb: the graph has no INT4 routed expert kernels to read through slots")
    names = [n for layer in experts["layers"] for n in layer]
    packed = PackedParams(source, progress=progress)
    for e in ENTRY_POINTS:
        packed.add({n: t for n, t in before[e].items() if n in names}, transforms[e])
    report["experts"] = {**experts, "params": packed}
    return mod


def quantization(opts) -> dict | None:
    """The manifest's "quantization": the INT4 format, and how the kernels take activations: int8
    through the strategy's dot instruction (tir_kernels/int4_dot.py, codes interleaved) or float32."""
    if not opts.quant.startswith("int4"):
        return None
    isa = opts.dot_isa
    return {"format": INT4_LAYOUT, "bits": 4, "group_size": GROUP_SIZE, "symmetric": True,
            "scale_dtype": "float16", "float_weights": ["router", "norms"],
            "activations": f"int8 per group of {GROUP_SIZE}, symmetric ({isa.name} dot products)" if isa else "float32",
            "codes_order": ("interleaved (mobilemoe.quant.interleave_int4, rows and lanes from "
                            "tir_kernels.int4_dot.interleave_for)" if isa else "row-major"),
            "scales_order": ("interleaved (rows, 1) (tir_kernels.int4_dot.scales_interleave_for)"
                             if isa is not None and isa.row_lanes else "row-major")}


def build_artifact(model, spec, out: Path, options: BuildOptions) -> Path:
    """The TVM artifact of `model` for the target `spec` (a targets.TargetSpec) at `out`."""
    bar = tqdm(total=4, desc=f"build {spec.name}", disable=not options.verbose, unit="step")
    timings = {}
    last = [time.perf_counter(), None]

    def step(name):
        now = time.perf_counter()
        if last[1] is not None:
            timings[last[1]] = round(now - last[0], 2)
            bar.update(1)
        last[:] = [now, name]
        bar.set_postfix_str(name)

    cfg = model.config
    report = {}
    executable, params, entries, pipeline, opts = compile_model(
        model, spec, options.quant, options.dump_ir, options.tuning_db, step, random_weights=options.random_weights,
        report=report, kv_cache=options.kv_cache, weights=options.weights, residency=options.residency)
    step("pack + write artifact")
    manifest = {
        "backend": BACKEND,
        "model": cfg.name,
        "target": {"name": spec.name, "tvm": spec.json(), "strategy": spec.strategy.name},
        "runs_on_host": spec.runs_on_host,
        "versions": {"tvm": tvm.__version__, "mobilemoe": getattr(mobilemoe, "__version__", "0.1.0")},
        "pipeline": pipeline,
        "quantization": quantization(opts),
        "entry_points": entries,
        "config": cfg.to_dict(),
        "weights": "random (shape-only build)" if options.random_weights else "checkpoint",
        "tuning": report.get("tuning"),  # records applied from --tuning-db (None: untuned)
        "reproducibility": reproducibility(),  # what a rebuild does not reproduce, and why
    }
    writers = {}
    if "experts" in report:
        experts = report["experts"]
        manifest["experts"] = {**expert_layout(experts["layers"], experts["pools"], cfg.num_experts),
                               **options.residency.manifest()}
        writers[EXPERTS_NAME] = lambda p: write_expert_file(p, manifest["experts"], experts["params"])
    path = write_artifact(out, write_lib=lambda p: spec.export(executable, p), params=params,
                          manifest=manifest, checkpoint_dir=options.checkpoint_dir, writers=writers)
    step(None)
    bar.close()
    if options.verbose:
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"wrote {path} ({size:.1f} MB); step seconds: {timings}", file=sys.stderr)
    return path
