"""The artifact directory: what `compiler.build` writes and `mobilemoe.runtime` loads.

    <artifact>/
      lib.so               the compiled Relax VM executable, linked for the target
      params.safetensors   packed parameters under their Relax names (uint32 INT4 codes, fp16
                           scales, float32 router/norm weights)
   or, for the ONNX Runtime backend (compiler/onnx_export.py):
      model.onnx           graph + weights (ORT contrib ops; INT4 repacked from the same codes)
      model.onnx.data      the weights as ONNX external data, for large models
      config.json          the model config (our "mobilemoe" block + the HF fields)
      tokenizer.json       the tokenizer (when the checkpoint has one)
      manifest.json        format, target, versions, pass pipeline, quantization, entry points with
                           their inputs/outputs and parameter order, and the sha256 of every file

Written atomically (temp dir + rename, see mobilemoe.checkpoint.atomic_dir): a failed build leaves
nothing. `verify()` checks every hash before anything is loaded; a tampered file is refused.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from mobilemoe.checkpoint import atomic_dir

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


def write_artifact(out_dir, *, write_lib, params: dict[str, np.ndarray], manifest: dict,
                   checkpoint_dir: Path | None, extra_files: dict[str, Path] | None = None) -> Path:
    """write_lib(path) writes lib.so; manifest gets "files" (sha256) added. Atomic."""
    from safetensors.numpy import save_file

    def write_files(tmp: Path):
        write_lib(tmp / LIB_NAME)
        save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(tmp / PARAMS_NAME))

    return write_artifact_files(out_dir, write_files, manifest, checkpoint_dir, extra_files)


def write_artifact_files(out_dir, write_files, manifest: dict, checkpoint_dir: Path | None,
                         extra_files: dict[str, Path] | None = None) -> Path:
    """write_files(tmp_dir) writes the backend's files; then the checkpoint's config and tokenizer,
    extra_files, and manifest.json with the sha256 of every file. Atomic."""
    def write(tmp: Path):
        write_files(tmp)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "generation_config.json"):  # an imported model's text format (mobilemoe.text_format)
            if checkpoint_dir is not None and (Path(checkpoint_dir) / name).is_file():
                shutil.copyfile(Path(checkpoint_dir) / name, tmp / name)
        if not (tmp / "tokenizer.json").is_file():  # shape-only builds: the bundled tokenizer
            from mobilemoe.tokenizer import default_tokenizer_path
            shutil.copyfile(default_tokenizer_path(), tmp / "tokenizer.json")
        for name, src in (extra_files or {}).items():
            if Path(src).is_dir():
                shutil.copytree(src, tmp / name)
            else:
                shutil.copyfile(src, tmp / name)
        files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        full = {"format": FORMAT, **manifest, "files": files}
        (tmp / MANIFEST_NAME).write_text(json.dumps(full, indent=2) + "\n")

    return atomic_dir(Path(out_dir), write)


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


def verify(artifact_dir) -> dict:
    """Check every file's sha256 against the manifest; returns the manifest."""
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
    return manifest
