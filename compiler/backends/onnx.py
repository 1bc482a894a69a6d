"""`python -m compiler.build --target onnx`: checkpoint -> ONNX Runtime artifact (the TVM fallback).

    python -m compiler.build --target onnx [--checkpoint DIR | --preset NAME] [--out DIR]
        [--ort-accuracy-level 0|4]
    python -m compiler.build --target android-arm64 --fallback onnx   # ONNX artifact if TVM fails

Where TVM cannot serve a target (no tuned kernels, no TVM runtime on the device, a failed build),
ONNX Runtime runs on every phone and desktop. The graph is the model's exported program (the one
the TVM importer imports, mobilemoe/export.py) translated node by node (onnx_program.py): every
linear with an INT4 weight becomes ORT's contrib op MatMulNBits, the embedding GatherBlockQuantized,
each mobilemoe::moe QMoE with the op's routing (onnx_graph.py), with the INT4 weights repacked from
the very codes and scales the TVM artifact holds; every other op its standard ONNX op, so nothing
here restates the decoder. The artifact has the same format as a TVM one (mobilemoe/artifact.py) with manifest backend
"onnx" and model.onnx (+ model.onnx.data when the weights exceed EXTERNAL_DATA_BYTES);
`mobilemoe.runtimes.load_artifact` opens it with an onnxruntime session.

accuracy_level (MatMulNBits and QMoE) picks ORT's compute type for the INT4 matmuls. 0 (the
default) computes in float32: logits match PyTorch running the INT4 weights and the TVM artifact to
~1e-6. 4 quantizes activations to int8 per block: decode ~3x faster on mobilemoe-s shapes (2-core
x86), but ~1% relative error per matmul, and on the bundled trained model (whose activations have
outliers) top-1 agreement with the TVM artifact drops to ~98.7%, under the 99% this fallback
promises; so it is opt-in (--ort-accuracy-level 4).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import onnx
from onnx import helper

import mobilemoe
from mobilemoe.artifact import ONNX_NAME
from mobilemoe.export import export_entry
from mobilemoe.quant import GROUP_SIZE, INT4_LAYOUT, ORT_INT4_LAYOUT

from ..artifact import write_artifact_files
from ..params import weight_source
from .onnx_graph import CONTRIB_OPS
from .onnx_program import translate
from .options import BuildOptions

DATA_NAME = ONNX_NAME + ".data"
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GiB: larger weights go to model.onnx.data
DEFAULT_ACCURACY_LEVEL = 0  # float32 compute; 4 = int8 activations (faster, see above)
TARGET_NAME = "onnx"


class OnnxExportError(RuntimeError):
    """The ONNX graph could not be built (the message names the weight or config field)."""


def check_config(cfg) -> None:
    """QMoE's block size is the INT4 group: the expert widths must be multiples of it."""
    if not cfg.is_moe:
        return
    widths = {"hidden_size": cfg.hidden_size, "expert_hidden": cfg.expert_hidden}
    for field, k in widths.items():
        if k % GROUP_SIZE:
            raise OnnxExportError(f"config {cfg.name}: {field} = {k} must be a multiple of the INT4 group "
                                  f"size {GROUP_SIZE} (QMoE block_size)")


def interface(cfg) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in the exported program's order (onnx_program.py)."""
    kv = [(i, kind) for i in range(cfg.num_layers) for kind in ("key", "value")]
    return (["input_ids", "positions", *(f"past_key_values.{i}.{kind}" for i, kind in kv)],
            ["logits", *(f"present.{i}.{kind}" for i, kind in kv)])


def export_onnx(model, path: Path, random_weights: bool = False, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                external_data: bool | None = None) -> dict:
    """Write `path` (model.onnx, + model.onnx.data beside it when large); returns the manifest's "onnx" block."""
    cfg = model.config
    check_config(cfg)
    ep = export_entry(model, "prefill", cache="layers")  # the program TVM imports for prefill
    buffers = {name: b for name, b in model.named_buffers()}
    proto = translate(ep, weight_source(model, random_weights), buffers, accuracy_level, *interface(cfg),
                      doc=f"MobileMoE {cfg.name}: INT4 ({GROUP_SIZE}-group) decoder with an explicit KV cache, "
                          "translated from its exported program")
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=DATA_NAME, size_threshold=1024)
    used = {(n.domain, n.op_type) for n in proto.graph.node}
    return {
        "file": ONNX_NAME,
        "external_data": DATA_NAME if external_data else None,
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "contrib_ops": [{"domain": d, "op": op} for d, op in CONTRIB_OPS if (d, op) in used],
        "accuracy_level": accuracy_level,
        "execution_provider": "CPUExecutionProvider",
        "inputs": [_value_info(v) for v in proto.graph.input],
        "outputs": [_value_info(v) for v in proto.graph.output],
        "embedding": "GatherBlockQuantized on the program's INT4 table (a tied one: the LM head's bytes)",
        "weight_bytes": weight_bytes,
    }


def _value_info(v) -> dict:
    dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return {"name": v.name, "shape": dims, "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}


def build_artifact(model, spec, out: Path, options: BuildOptions) -> Path:
    """The ONNX artifact of `model` at `out` (spec: None, ONNX Runtime has no target of ours).

    options.fallback_from: {"target": ..., "reason": ...} when this replaces a failed build
    (recorded in the manifest)."""
    t0 = time.perf_counter()
    cfg = model.config
    fallback_from = options.fallback_from

    def write_files(tmp: Path):  # runs before the manifest is serialised: the graph's facts go in it
        manifest["onnx"] = export_onnx(model, tmp / ONNX_NAME, options.random_weights, options.accuracy_level,
                                       options.external_data)

    try:  # deferred on purpose: onnxruntime is only recorded here (its version), the build needs none
        import onnxruntime  # deferred: see the line above
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    manifest = {
        "backend": "onnx",
        "model": cfg.name,
        "target": {"name": TARGET_NAME, "requested": fallback_from["target"] if fallback_from else TARGET_NAME},
        "runs_on_host": True,
        "versions": {"onnx": onnx.__version__, "onnxruntime_at_build": ort_version,
                     "mobilemoe": getattr(mobilemoe, "__version__", "0.1.0")},
        "quantization": {"format": INT4_LAYOUT, "ort_layout": ORT_INT4_LAYOUT, "bits": 4, "group_size": GROUP_SIZE,
                         "symmetric": True, "scale_dtype": "float16 (stored widened to float32)",
                         "float_weights": ["router", "norms"]},
        "config": cfg.to_dict(),
        "weights": "random (shape-only build)" if options.random_weights else "checkpoint",
    }
    if fallback_from:
        manifest["fallback_from"] = fallback_from
    path = write_artifact_files(out, write_files, manifest, options.checkpoint_dir)
    if options.verbose:
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"wrote {path} (onnx, {size:.1f} MB) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return path
