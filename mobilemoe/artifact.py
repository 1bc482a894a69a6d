"""The artifact format: what `compiler.build` writes and every runtime (mobilemoe/runtimes/) reads.

    <artifact>/
      lib.so               the compiled Relax VM executable, linked for the target
      params.safetensors   packed parameters under their Relax names (uint32 INT4 codes, fp16
                           scales, float32 router/norm weights)
   or, for the ONNX Runtime backend (compiler/backends/onnx.py):
      model.onnx           graph + weights (ORT contrib ops; INT4 repacked from the same codes)
      model.onnx.data      the weights as ONNX external data, for large models
   or, for the MLIR backend (compiler/backends/mlir.py): IREE modules (*.vmfb) + params.safetensors
      config.json          the model config (our "mobilemoe" block + the HF fields)
      tokenizer.json       the tokenizer (when the checkpoint has one)
      manifest.json        format, backend, target, versions, pass pipeline, quantization, entry points
                           with their inputs/outputs and parameter order, and the sha256 of every file

This module is the reading side, shared by all runtimes; compiler/artifact.py writes it (atomically:
a failed build leaves nothing). `verify()` checks every hash before anything is loaded; a tampered
file is refused.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "mobilemoe-artifact/2"  # 2: TVM entry points take the KV cache per layer, keys transposed
LIB_NAME = "lib.so"
PARAMS_NAME = "params.safetensors"
MANIFEST_NAME = "manifest.json"
ONNX_NAME = "model.onnx"
REQUIRED_FILES = {"tvm": (LIB_NAME, PARAMS_NAME), "onnx": (ONNX_NAME,)}


class ArtifactError(RuntimeError):
    """An artifact is missing a file, has a file whose hash differs from the manifest, or is malformed."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(artifact_dir) -> dict:
    d = Path(artifact_dir)
    path = d / MANIFEST_NAME
    if not d.is_dir():
        raise ArtifactError(f"{d}: artifact directory not found")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; not an artifact written by compiler.build")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}: written by another "
                            f"version of compiler.build; build it again with this one")
    return manifest


def verify(artifact_dir, backend: str | None = None) -> dict:
    """Check every file's sha256 against the manifest (and, given `backend`, that the manifest names
    it); returns the manifest."""
    d = Path(artifact_dir)
    manifest = read_manifest(d)
    files = manifest.get("files") or {}
    for name, digest in files.items():
        p = d / name
        if not p.is_file():
            raise ArtifactError(f"{p}: listed in {MANIFEST_NAME} but missing")
        actual = sha256(p)
        if actual != digest:
            raise ArtifactError(f"{p}: sha256 {actual[:16]}... does not match the manifest's {digest[:16]}...; "
                                f"the file was modified after the build, refusing to load")
    for required in REQUIRED_FILES.get(manifest.get("backend"), ()):
        if required not in files:
            raise ArtifactError(f"{d}: {MANIFEST_NAME} lists no {required}")
    if backend is not None and manifest.get("backend") != backend:
        raise ArtifactError(f"{d}: backend {manifest.get('backend')!r}, expected {backend!r}")
    return manifest
