"""`python -m compiler.build --target onnx`: checkpoint -> ONNX Runtime artifact (the TVM fallback).

    python -m compiler.build --target onnx [--checkpoint DIR | --preset NAME] [--out DIR]
        [--ort-accuracy-level 0|4]
    python -m compiler.build --target android-arm64 --fallback onnx   # ONNX artifact if TVM fails

Where TVM cannot serve a target (no tuned kernels, no TVM runtime on the device, a failed build),
ONNX Runtime runs on every phone and desktop. The graph (compiler/onnx_graph.py) uses ORT's CPU
contrib ops: MatMulNBits, QMoE, GroupQueryAttention, GatherBlockQuantized, (Skip)Simplified-
LayerNormalization, with the INT4 weights repacked from the very codes and scales the TVM artifact
holds. The artifact has the same format as a TVM one (compiler/artifact.py) with manifest backend
"onnx" and model.onnx (+ model.onnx.data when the weights exceed EXTERNAL_DATA_BYTES);
`mobilemoe.runtime.load_artifact` opens it with an onnxruntime session.

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

import torch

from .artifact import ONNX_NAME, write_artifact_files

DATA_NAME = ONNX_NAME + ".data"
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GiB: larger weights go to model.onnx.data
DEFAULT_ACCURACY_LEVEL = 0  # float32 compute; 4 = int8 activations (faster, see above)
TARGET_NAME = "onnx"


class OnnxExportError(RuntimeError):
    """The ONNX graph could not be built (the message names the weight or config field)."""


def tvm_param_name(name: str) -> str:
    """Our state_dict name -> the TVM importer's parameter name ("layers.0.moe.w1" ->
    "p_model_layers_0_moe_w1"): shape-only builds draw the same random weights as TVM's."""
    return "p_model_" + name.replace(".", "_")


def weight_source(model, random_weights: bool):
    """name -> float32 tensor: the model's parameters, or (shape-only builds) compiler.params.RandomWeights
    under the TVM names, generated one tensor at a time."""
    if not random_weights:
        params = dict(model.named_parameters(remove_duplicate=False))
        return lambda name: params[name].detach().float()
    from .params import RandomWeights
    shapes = {tvm_param_name(n): tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    source = RandomWeights(shapes)
    # a tied table reaches TVM once, under the LM head's name
    alias = {"embed.weight": "lm_head.weight"} if model.config.tie_embeddings else {}
    return lambda name: torch.from_numpy(source[tvm_param_name(alias.get(name, name))])


# MobileMoEConfig architecture options (mobilemoe/arch) that compiler/onnx_graph.py's decoder does not
# build yet: an imported model using one of them gets the TVM artifact only
ONNX_UNSUPPORTED_OPTIONS = ("rope_type", "qkv_bias", "o_bias", "qk_norm", "router", "norm_topk_prob", "shared_expert_gate",
                            "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")


def check_config(cfg) -> None:
    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.quant import GROUP_SIZE
    default = MobileMoEConfig()
    used = [f"{k}={getattr(cfg, k)!r}" for k in ONNX_UNSUPPORTED_OPTIONS if getattr(cfg, k) != getattr(default, k)]
    if used:
        raise OnnxExportError(f"config {cfg.name} (arch '{cfg.arch}'): the ONNX decoder does not implement "
                              f"{', '.join(used)}; build a TVM target instead")
    widths = {"hidden_size": cfg.hidden_size, "num_heads * head_dim": cfg.num_heads * cfg.head_dim}
    if cfg.is_moe:
        widths["expert_hidden"] = cfg.expert_hidden
        if cfg.shared_expert_hidden:
            widths["shared_expert_hidden"] = cfg.shared_expert_hidden
    else:
        widths["ffn_hidden"] = cfg.ffn_hidden
    for field, k in widths.items():
        if k % GROUP_SIZE:
            raise OnnxExportError(f"config {cfg.name}: {field} = {k} must be a multiple of the INT4 group "
                                  f"size {GROUP_SIZE} (MatMulNBits / QMoE block_size)")


def export_onnx(model, path: Path, random_weights: bool = False, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                external_data: bool | None = None) -> dict:
    """Write `path` (model.onnx, + model.onnx.data beside it when large); returns the manifest's "onnx" block."""
    import onnx

    from .onnx_graph import CONTRIB_OPS, build_decoder

    cfg = model.config
    check_config(cfg)
    proto = build_decoder(cfg, weight_source(model, random_weights), accuracy_level)
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
        "embedding": "GatherBlockQuantized on the INT4 table" + (" (the LM head's)" if cfg.tie_embeddings else ""),
        "weight_bytes": weight_bytes,
    }


def _value_info(v) -> dict:
    from onnx import helper
    dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return {"name": v.name, "shape": dims, "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}


def build_onnx(checkpoint: Path | None, out: Path | None = None, *, preset: str | None = None, verbose: bool = True,
               accuracy_level: int = DEFAULT_ACCURACY_LEVEL, fallback_from: dict | None = None,
               default_out_target: str = TARGET_NAME, external_data: bool | None = None) -> Path:
    """Build an ONNX artifact from a checkpoint, or (preset given) from a preset's shapes with random weights.

    fallback_from: {"target": ..., "reason": ...} when this replaces a failed TVM build (recorded in
    the manifest); the artifact then goes where that target's would have (default_out_target)."""
    import onnx

    import mobilemoe
    from mobilemoe.checkpoint import load_checkpoint
    from mobilemoe.quant import GROUP_SIZE, INT4_LAYOUT, ORT_INT4_LAYOUT

    from .build import shape_only_model

    t0 = time.perf_counter()
    model = shape_only_model(preset) if preset else load_checkpoint(checkpoint)
    cfg = model.config
    out = Path(out) if out else Path("dist") / f"{cfg.name}-{default_out_target}"

    def write_files(tmp: Path):  # runs before the manifest is serialised: the graph's facts go in it
        manifest["onnx"] = export_onnx(model, tmp / ONNX_NAME, preset is not None, accuracy_level, external_data)

    try:
        import onnxruntime
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
        "weights": "random (shape-only build)" if preset else "checkpoint",
    }
    if fallback_from:
        manifest["fallback_from"] = fallback_from
    path = write_artifact_files(out, write_files, manifest, Path(checkpoint) if checkpoint and not preset else None)
    if verbose:
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"wrote {path} (onnx, {size:.1f} MB) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return path
