"""`python -m compiler.build --target mlir`: checkpoint -> MLIR artifact, compiled and checked with IREE.

    python -m compiler.build --target mlir [--checkpoint DIR | --preset NAME] [--out DIR]

The prefill and decode entry points (mobilemoe/export.py) go through `torch_mlir.fx.export_and_import`
(with an importer that keeps the weights as arguments, see below) in two forms:

    model.linalg.mlir                 linalg-on-tensors (+ tensor/arith/math), both entry points
    {prefill,decode}.stablehlo.mlir   StableHLO, a module per entry point
    params.safetensors                float32 weights under their checkpoint names (+ rope tables)
    iree-host.vmfb                    the linalg form compiled by IREE for this CPU (llvm-cpu, host)
    iree-android-arm64.vmfb           ... for the android-arm64 target's triple (compiled, not run here)

Weights are never inline constants. In both MLIR forms every weight is a trailing function argument
(the manifest's entry_points[e]["params"] gives their order, as in the TVM artifact), so the .mlir
files hold the graph only. The IREE modules wrap those functions with `util.global`s bound to
`#flow.parameter.named<"model"::NAME>`: the .vmfb files are weight-free too and iree.runtime maps
the weights from params.safetensors at load time (mobilemoe/runtimes/iree.py).

The StableHLO files are torch-mlir's output as is: for the dynamic token and cache lengths they
use shape.shape_of + stablehlo.dynamic_broadcast_in_dim, which IREE 3.13's StableHLO input does not
legalize; IREE compiles the linalg form.

Each MoE layer's mobilemoe::moe op (mobilemoe/moe_op.py) is decomposed into its dense reference
(einsums over all experts, moe_op.reference), and aten.topk is rewritten into k rounds of max + mask
before import (topk_as_iterated_max): torch-mlir lowers topk to a full tm_tensor.sort, which its StableHLO path cannot express for a dynamic token
count, and for which IREE 3.13 returned wrong expert ids in the second MoE layer of the
dynamic-length prefill (logit error ~1e-2; static shapes and decode were exact).
"""
from __future__ import annotations

import platform
import re
import sys
import time
from pathlib import Path

from importlib.metadata import version

import numpy as np
import torch
from safetensors.numpy import save_file
from torch.export.graph_signature import InputKind

import mobilemoe
from mobilemoe.artifact import PARAMS_NAME
from mobilemoe import moe_op
from mobilemoe.export import export_entry
from targets import TARGETS

from ..artifact import write_artifact_files
from ..importer import ENTRY_POINTS, layer_of
from ..params import weight_source
from .options import BuildOptions

NUM_INPUTS = 3  # tokens, positions, kv: the stacked cache layout (mobilemoe/export.py)

TARGET_NAME = "mlir"
BACKEND = "iree"
# form -> (torch-mlir output type, file name; {entry} for a file per entry point)
FORMS = {"linalg": ("linalg-on-tensors", "model.linalg.mlir"), "stablehlo": ("stablehlo", "{entry}.stablehlo.mlir")}
PARAM_SCOPE = "model"
# IREE compile targets: name -> (vmfb file, iree-compile flags beyond --iree-hal-target-backends=llvm-cpu),
# from each target that names its IREE flags (TargetSpec.iree_flags: its triple / CPU)
IREE_TARGETS = {name: (f"iree-{name}.vmfb", spec.iree_flags) for name, spec in TARGETS.items() if spec.iree_flags}
INSTALL_HINT = "pip install -e '.[mlir]' (torch-mlir==20261001, iree-base-compiler, iree-base-runtime)"


class MlirExportError(RuntimeError):
    """The MLIR export or IREE compile failed; the message names the op and layer, or the tool."""


def require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MlirExportError(f"--target {TARGET_NAME} needs the '{module}' module: {INSTALL_HINT}") from None


def topk_as_iterated_max(x, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """aten.topk -> k rounds of (max, index) with the winner masked out: torch.topk's values and ids
    without a sort. Ties go to the lowest index (PyTorch leaves their order unspecified)."""
    sign = 1.0 if largest else -1.0
    x = x * sign
    dim = dim % x.dim()
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    index = torch.arange(x.shape[dim], device=x.device).view(shape)
    values, ids = [], []
    for _ in range(k):
        v, i = torch.max(x, dim, keepdim=True)
        values.append(v * sign)
        ids.append(i)
        x = torch.where(index == i, torch.full_like(x, float("-inf")), x)
    return torch.cat(values, dim), torch.cat(ids, dim)


def _decompositions():
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table  # the optional [mlir] extra: deferred
    table = dict(get_decomposition_table())
    table[torch.ops.aten.topk.default] = topk_as_iterated_max
    table[torch.ops.mobilemoe.moe.default] = moe_op.reference  # the MoE op as the dense form torch-mlir lowers
    return table


def _lift_state(ep) -> tuple[torch.fx.Graph, list[str]]:
    """Parameters and buffers -> function arguments after the user inputs (a tied weight once);
    lifted constants stay inline. -> (graph, state names in argument order, "model." stripped)."""

    graph = ep.graph
    nodes = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    first = next(iter(nodes.values()))
    names, seen = [], {}
    for spec in ep.graph_signature.input_specs:
        node = nodes[spec.arg.name]
        if spec.kind == InputKind.USER_INPUT:
            first.prepend(node)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            twin = seen.get((value.data_ptr(), tuple(value.shape)))
            if twin is not None:  # tied embeddings: one argument
                node.replace_all_uses_with(twin)
                graph.erase_node(node)
            else:
                seen[(value.data_ptr(), tuple(value.shape))] = node
                names.append(re.sub(r"^model\.", "", spec.target))
        else:
            node.replace_all_uses_with(ep.constants[spec.target])
            graph.erase_node(node)
    return graph, names


def _unsupported(text: str, programs: dict, form: str) -> MlirExportError:
    """torch-mlir's diagnostics -> the op and the layer (nn_module_stack) it came from."""
    m = re.search(r'name = "torch\.([\w.]+)"', text) or re.search(r"operation 'torch\.([\w.]+)'", text)
    if m is None:
        return MlirExportError(f"torch-mlir could not lower the model to {form}: {text[:2000]}")
    op = m.group(1)
    for entry, ep in programs.items():
        for node in ep.graph.nodes:
            target = str(node.target)
            if node.op == "call_function" and (target == op or target.startswith(op + ".")):
                return MlirExportError(f"{entry}: op '{target}' (from layer '{layer_of(node)}') cannot be lowered "
                                       f"by torch-mlir to {form}; rewrite that layer with supported ops")
    return MlirExportError(f"op '{op}' cannot be lowered by torch-mlir to {form}: {text[:2000]}")


def _argument_importer(ctx):
    from torch_mlir.extras.fx_importer import FxImporter  # the optional [mlir] extra: deferred

    class ArgumentImporter(FxImporter):
        """export_and_import's importer for programs _lift_state rewrote: imports the graph as it is
        (weights are arguments) instead of freezing parameters and buffers into literals."""

        def import_frozen_program(self, prog, *, func_name="main", func_visibility=None,
                                  import_symbolic_shape_expressions=False):
            return self.import_stateless_graph(prog.graph, func_name=func_name, func_visibility=func_visibility,
                                               import_symbolic_shape_expressions=import_symbolic_shape_expressions)
    return ArgumentImporter(context=ctx)


def export_mlir(model) -> tuple[dict[str, str], list[str], dict]:
    """-> ({"linalg" | "stablehlo.<entry>": MLIR text}, state names in argument order, {entry: signature}).

    linalg: one module with both functions (what IREE compiles); StableHLO: a module per function
    (torch-mlir's StableHLO pipeline refines the shapes of a module's single function). No files written."""
    require("torch_mlir")
    from torch_mlir import ir  # the optional [mlir] extra: deferred (require() named it above)
    from torch_mlir.dialects import torch as torch_d  # deferred: torch_mlir, as above
    from torch_mlir.fx import export_and_import  # deferred: torch_mlir, as above

    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    diagnostics = []  # MLIR reports the failing op through the context, not in the exception

    def collect(d):
        diagnostics.append(f"{d.location}: {d.message}")
        return True
    ctx.attach_diagnostic_handler(collect)

    programs, names, signatures = {}, None, {}
    for entry in ENTRY_POINTS:
        ep = export_entry(model.eval(), entry, cache="stacked").run_decompositions(_decompositions())
        programs[entry] = ep
        graph, entry_names = _lift_state(ep)
        if names is not None and entry_names != names:
            raise MlirExportError(f"{entry}: weight arguments differ from {ENTRY_POINTS[0]}'s")
        names = entry_names
        user = [n for n in graph.nodes if n.op == "placeholder"][:NUM_INPUTS]
        outs = next(n for n in graph.nodes if n.op == "output").args[0]
        signatures[entry] = {"inputs": [_desc(n.meta["val"], n.name) for n in user],
                             "outputs": [_desc(n.meta["val"]) for n in outs]}

    def lower(entry: str, output_type: str, importer) -> str:
        diagnostics.clear()
        try:  # already decomposed (decomposition_table={}): topk is rewritten, einsum kept
            return str(export_and_import(programs[entry], output_type=output_type, fx_importer=importer,
                                         decomposition_table={}, func_name=entry))
        except Exception as e:  # TorchMlirCompilerError: a pass pipeline failed on some op
            raise _unsupported("\n".join(diagnostics) or str(e), programs, output_type) from None

    both = _argument_importer(ctx)
    lower(ENTRY_POINTS[0], "raw", both)  # imported only; the next call lowers the module with both functions
    texts = {"linalg": lower(ENTRY_POINTS[1], FORMS["linalg"][0], both)}
    texts.update({f"stablehlo.{e}": lower(e, FORMS["stablehlo"][0], _argument_importer(ctx)) for e in ENTRY_POINTS})
    return texts, names, signatures


def _desc(val, name: str | None = None) -> dict:
    shape = [int(d) if str(d).isdigit() else str(d) for d in val.shape]
    return {**({"name": name} if name else {}), "shape": shape, "dtype": str(val.dtype).replace("torch.", "")}


def iree_input(linalg: str, names: list[str]) -> str:
    """The linalg module with each entry point `f` renamed `f_impl` (private) and a public `f` that
    loads the weights from `util.global`s bound to IREE parameters and calls it."""
    top = re.search(r"^module\b[^\n]*\{\n", linalg, re.M)
    if top is None:
        raise MlirExportError("linalg module: no top-level 'module {' to wrap")
    head, body = linalg[:top.end()], linalg[top.end():]
    wrappers = []
    for entry in ENTRY_POINTS:
        m = re.search(rf"func\.func @{entry}\((.*?)\) -> \((.*?)\) \{{", body)
        if m is None:
            raise MlirExportError(f"linalg module: no function @{entry}")
        types = re.findall(r"%arg\d+: (tensor<[^>]*>)", m.group(1))
        results = m.group(2)
        body = body.replace(m.group(0), m.group(0).replace(f"func.func @{entry}(", f"func.func private @{entry}_impl("))
        weights = types[NUM_INPUTS:]
        if len(weights) != len(names):
            raise MlirExportError(f"@{entry}: {len(weights)} weight arguments, the manifest lists {len(names)}")
        user = ", ".join(f"%in{i}: {t}" for i, t in enumerate(types[:NUM_INPUTS]))
        lines = [f'  util.global private @{entry}_w{i} = #flow.parameter.named<"{PARAM_SCOPE}"::"{n}"> : {t}'
                 for i, (n, t) in enumerate(zip(names, weights))]
        lines.append(f"  func.func @{entry}({user}) -> ({results}) {{")
        lines += [f"    %w{i} = util.global.load @{entry}_w{i} : {t}" for i, t in enumerate(weights)]
        args = [f"%in{i}" for i in range(NUM_INPUTS)] + [f"%w{i}" for i in range(len(weights))]
        n_out = len(re.findall(r"tensor<", results))
        call = f"func.call @{entry}_impl({', '.join(args)}) : ({', '.join(types)}) -> ({results})"
        lines.append(f"    %r:{n_out} = {call}")
        lines.append(f"    return {', '.join(f'%r#{i}' for i in range(n_out))} : {results}")
        lines.append("  }")
        wrappers += lines
    return head + "\n".join(wrappers) + "\n" + body


def compile_iree(source: str, target: str) -> bytes:
    """IREE-compile the wrapped linalg module for one of IREE_TARGETS (llvm-cpu)."""
    compiler = require("iree.compiler")
    _, flags = IREE_TARGETS[target]
    try:
        return compiler.compile_str(source, target_backends=["llvm-cpu"], extra_args=list(flags))
    except compiler.CompilerToolError as e:
        raise MlirExportError(f"iree-compile for '{target}' ({' '.join(flags)}) failed: {str(e)[:3000]}") from None


def state_arrays(model, names: list[str], random_weights: bool) -> dict[str, np.ndarray]:
    """name -> float32 array: the checkpoint's values or (shape-only builds) the random weights the
    TVM and ONNX artifacts draw for the same preset; buffers (rope tables) from the model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    source = weight_source(model, random_weights)
    buffers = dict(model.named_buffers())
    return {n: np.ascontiguousarray((source(n) if n in params else buffers[n]).detach().float().numpy())
            for n in names}


def build_artifact(model, spec, out: Path, options: BuildOptions) -> Path:
    """Export, IREE-compile and write the MLIR artifact of `model` at `out` (see the module docstring);
    atomic. spec: None (the IREE modules' targets are options.iree_targets, default all of IREE_TARGETS)."""
    t0 = time.perf_counter()
    require("torch_mlir")
    require("iree.compiler")
    timings = {}
    cfg = model.config
    texts, names, signatures = export_mlir(model)
    timings["export"] = round(time.perf_counter() - t0, 2)
    source = iree_input(texts["linalg"], names)
    vmfbs = {}
    for target in options.iree_targets or tuple(IREE_TARGETS):
        t = time.perf_counter()
        vmfbs[target] = compile_iree(source, target)
        timings[f"iree {target}"] = round(time.perf_counter() - t, 2)
    arrays = state_arrays(model, names, options.random_weights)

    def write_files(tmp: Path):
        (tmp / FORMS["linalg"][1]).write_text(texts["linalg"])
        for e in ENTRY_POINTS:
            (tmp / FORMS["stablehlo"][1].format(entry=e)).write_text(texts[f"stablehlo.{e}"])
        save_file(arrays, str(tmp / PARAMS_NAME))
        for target, data in vmfbs.items():
            (tmp / IREE_TARGETS[target][0]).write_bytes(data)

    manifest = {
        "backend": BACKEND,
        "model": cfg.name,
        "target": {"name": TARGET_NAME},
        "runs_on_host": "host" in vmfbs,
        "versions": {"torch-mlir": version("torch-mlir"), "iree-base-compiler": version("iree-base-compiler"),
                     "torch": torch.__version__, "mobilemoe": getattr(mobilemoe, "__version__", "0.1.0")},
        "quantization": None,
        "mlir": {"linalg": {"files": [FORMS["linalg"][1]], "output_type": FORMS["linalg"][0],
                            "functions": list(ENTRY_POINTS)},
                 "stablehlo": {"files": [FORMS["stablehlo"][1].format(entry=e) for e in ENTRY_POINTS],
                               "output_type": FORMS["stablehlo"][0], "functions": list(ENTRY_POINTS)},
                 "weights": f"trailing function arguments after the {NUM_INPUTS} inputs, in entry_points[e].params "
                            f"order, values in {PARAMS_NAME}"},
        "iree": {"parameter_scope": PARAM_SCOPE, "parameters": PARAMS_NAME, "driver": "local-task",
                 "modules": {t: {"file": IREE_TARGETS[t][0], "flags": ["--iree-hal-target-backends=llvm-cpu",
                                                                       *IREE_TARGETS[t][1]]} for t in vmfbs},
                 "host_machine": platform.machine()},  # iree-host.vmfb uses this build machine's CPU features
        "entry_points": {e: {**signatures[e], "params": names} for e in ENTRY_POINTS},
        "config": cfg.to_dict(),
        "weights": "random (shape-only build)" if options.random_weights else "checkpoint",
    }
    path = write_artifact_files(out, write_files, manifest, options.checkpoint_dir)
    if options.verbose:
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"wrote {path} (mlir + iree, {size:.1f} MB) in {time.perf_counter() - t0:.1f}s; "
              f"step seconds: {timings}", file=sys.stderr)
    return path
