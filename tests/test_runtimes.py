"""mobilemoe/runtimes: one registry by the manifest's backend, every runtime a Runtime that verifies
the artifact before opening it, and nothing of the compiler imported."""
import json
import subprocess
import sys

import pytest

from mobilemoe.artifact import FORMAT, ArtifactError
from mobilemoe.runtimes import RUNTIMES, load_artifact, runtime_class
from mobilemoe.runtimes.base import Runtime


def test_every_registered_runtime_is_a_runtime_of_its_backend():
    for (backend, where), _ in RUNTIMES.items():
        cls = runtime_class(backend, where)
        assert issubclass(cls, Runtime) and cls.backend == backend and cls.where == where


def test_unknown_backend_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "backend": "tflite", "files": {}}))
    with pytest.raises(ArtifactError, match=r"no runtime for backend 'tflite' \(local\); known: tvm \(local\)"):
        load_artifact(tmp_path)


def test_importing_the_runtimes_loads_no_engine_and_no_compiler():
    code = ("import sys, mobilemoe.runtimes, mobilemoe.runtimes.rpc_session; "
            "print(sorted(m for m in ('tvm', 'onnxruntime', 'iree', 'compiler') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
