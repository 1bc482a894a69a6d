"""Writing an artifact (the format and its reading side: mobilemoe/artifact.py).

Written atomically (temp dir + rename, see mobilemoe.checkpoint.atomic_dir): a failed build leaves
nothing; manifest.json gets the sha256 of every file, which every runtime verifies before loading.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from mobilemoe.artifact import FORMAT, LIB_NAME, MANIFEST_NAME, PARAMS_NAME, sha256
from mobilemoe.checkpoint import atomic_dir
from mobilemoe.tokenizer import default_tokenizer_path


def write_artifact(out_dir, *, write_lib, params, manifest: dict,
                   checkpoint_dir: Path | None, extra_files: dict[str, Path] | None = None,
                   writers: dict | None = None) -> Path:
    """write_lib(path) writes lib.so; params: {name: np.ndarray}, or anything with write(path) that
    writes the safetensors file itself (compiler.params.PackedParams: streamed one tensor at a time);
    writers: {file name: write(path)} for further files (the expert file). manifest gets "files"
    (sha256) added. Atomic."""
    def write_files(tmp: Path):
        write_lib(tmp / LIB_NAME)
        for name, write in (writers or {}).items():
            write(tmp / name)
        if hasattr(params, "write"):
            params.write(tmp / PARAMS_NAME)
        else:
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
