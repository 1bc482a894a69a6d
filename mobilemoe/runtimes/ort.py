"""Run an ONNX artifact (manifest backend "onnx", compiler/backends/onnx.py) in an onnxruntime CPU session.

    rt = load_artifact("dist/mobilemoe-tiny-onnx")     # -> OrtRuntime
    logits, kv = rt.prefill([0, 17, 42])               # kv: a LayerKV of OrtValues
    logits, kv = rt.decode(99, kv)

Same API as TVMRuntime; the cache is the exported program's layered one (keys transposed, as the
TVM artifact's grow layout). The contrib ops the manifest lists (MatMulNBits, QMoE, ...) are checked
against this onnxruntime build's CPU kernels before the session is made.
"""
from __future__ import annotations

import re

import numpy as np

from ..artifact import ONNX_NAME, ArtifactError
from .base import LayerKV, Runtime, check_ids, kv_shape


_ORT_INSTALL = "pip install 'onnxruntime>=1.32'"  # QMoE with router_weights on CPU


def _cpu_kernels(ort) -> set[tuple[str, str]]:
    """(domain, op) of every CPU kernel this onnxruntime build registers."""
    kernels = ort.capi._pybind_state.get_all_opkernel_def()
    return {(k.domain, k.op_name) for k in kernels if k.provider == "CPUExecutionProvider"}


class OrtRuntime(Runtime):
    """An ONNX artifact in an onnxruntime CPU session (INT4 contrib ops: MatMulNBits, QMoE, ...)."""

    backend = "onnx"

    def __init__(self, artifact_dir, num_threads: int | None = None):
        self._open_manifest(artifact_dir)  # every hash, before anything is parsed
        try:  # deferred on purpose: importing the runtimes must not load onnxruntime (nor need it installed)
            import onnxruntime as ort  # deferred: see the line above
        except ImportError:
            raise ArtifactError(f"{self.dir}: an ONNX artifact needs onnxruntime: {_ORT_INSTALL}") from None
        c = self.config
        layers = [(i, kind) for i in range(c.num_layers) for kind in ("key", "value")]
        self._past = [f"past_key_values.{i}.{kind}" for i, kind in layers]
        inputs = [i["name"] for i in self.manifest["onnx"]["inputs"]]
        if inputs != ["input_ids", "positions", *self._past]:  # e.g. an artifact of the GQA graph (seqlens_k)
            raise ArtifactError(f"{self.dir / 'manifest.json'}: onnx inputs {inputs[:3]}... are not this runtime's "
                                f"(input_ids, positions, past_key_values.*): rebuild the artifact")
        have = _cpu_kernels(ort)
        missing = [f"{c['op']} ({c['domain'] or 'ai.onnx'})" for c in self.manifest["onnx"]["contrib_ops"]
                   if (c["domain"], c["op"]) not in have]
        if missing:
            raise ArtifactError(f"{self.dir / ONNX_NAME}: onnxruntime {ort.__version__} has no CPU kernel for contrib "
                                f"op {', '.join(missing)}; install one that has them: {_ORT_INSTALL}")
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        try:
            self.session = ort.InferenceSession(str(self.dir / ONNX_NAME), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types; name the op when it is a missing kernel
            op = re.search(r"implementation for (\w+)\(", str(e))
            what = f"no CPU kernel for op '{op.group(1)}'" if op else "cannot load it"
            raise ArtifactError(f"{self.dir / ONNX_NAME}: onnxruntime {ort.__version__}: {what}: {e}") from None
        self._ort = ort
        self._outputs = ["logits", *(f"present.{i}.{kind}" for i, kind in layers)]
        # the exported program's layered cache: keys [1, nkv, D, P] (transposed), values [1, nkv, P, D]
        empty_k = self._value(np.zeros((1, c.num_kv_heads, c.head_dim, 0), np.float32))
        empty_v = self._value(np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32))
        self._empty_kv = LayerKV([empty_k, empty_v] * c.num_layers, 0, kv_shape(c, 0), keys_t=True)

    def _value(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(array)

    def prefill(self, ids: list[int], kv: LayerKV | None = None):
        """Run `ids` (after `kv`, if given); -> (last-position logits [V], kv)."""
        kv = self._empty_kv if kv is None else kv
        check_ids(self.config, ids, kv.length)
        total = kv.length + len(ids)
        feed = {"input_ids": self._value(np.asarray([ids], dtype=np.int64)),
                "positions": self._value(np.arange(kv.length, total, dtype=np.int64)[None]),
                **dict(zip(self._past, kv.values))}
        out = self.session.run_with_ort_values(self._outputs, feed)
        return out[0].numpy()[0], LayerKV(out[1:], total, kv_shape(self.config, total), keys_t=True)
