"""Run a compiled artifact on this machine: load (after verifying every hash), prefill, decode, generate.

    rt = load_artifact("dist/mobilemoe-tiny-host")
    logits, kv = rt.prefill([0, 17, 42])      # logits np [V] of the last position, kv stays on device
    logits, kv = rt.decode(99, kv)
    ids, stats = rt.generate(prompt_ids, max_new_tokens=32)

The KV cache lives on the device between calls as a LayerKV: a K [1, nkv, D, P] and a V [1, nkv, P, D]
tensor per layer (the "layers" layout of mobilemoe/export.py); each step is one Relax VM call. Artifacts built for another CPU (android-arm64, linux-arm64) are
refused here: run them on the device through `python -m compiler.bench --rpc-tracker ...`.

ONNX artifacts (manifest backend "onnx", compiler/onnx_export.py) run in an onnxruntime CPU session
(OrtRuntime, same API); their KV cache is a LayerKV of OrtValues.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import MobileMoEConfig
from .generate import GenerationStats, generate_with


def check_ids(config: MobileMoEConfig, ids: list[int], past: int) -> None:
    bad = [i for i in ids if not 0 <= i < config.vocab_size]
    if bad:  # the compiled embedding lookup does not bounds-check (it would read out of bounds)
        raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {config.vocab_size})")
    if past + len(ids) > config.max_seq_len:
        raise ValueError(f"sequence of {past + len(ids)} tokens exceeds max_seq_len {config.max_seq_len}")


class _Generation:
    """What every runtime shares on top of prefill(ids, kv) / decode(token, kv)."""

    def step(self, ids: list[int], kv):
        return self.prefill(ids, kv)

    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_id=None, seed: int | None = None, on_token=None) -> tuple[list[int], GenerationStats]:
        return generate_with(self.step, prompt, max_new_tokens, self.config.max_seq_len, temperature, top_p,
                             eos_id, seed, on_token)

    def tokenizer(self):
        from .tokenizer import load_tokenizer
        return load_tokenizer(self.dir / "tokenizer.json")


class TVMRuntime(_Generation):
    """A TVM artifact on this machine's CPU. Subclasses change where it runs (compiler/remote.py)."""

    backend = "tvm"

    def __init__(self, artifact_dir, num_threads: int | None = None):
        from compiler.artifact import ArtifactError, verify

        self.dir = Path(artifact_dir)
        self.manifest = verify(self.dir)
        if self.manifest.get("backend") != "tvm":
            raise ArtifactError(f"{self.dir}: backend {self.manifest.get('backend')!r}, expected 'tvm'")
        self._check_runnable()
        if num_threads:
            os.environ["TVM_NUM_THREADS"] = str(num_threads)
        self.config = MobileMoEConfig.from_dict(self.manifest["config"], source=f"{self.dir}/manifest.json:config")
        self._open()

    # -- where it runs: overridden for RPC devices
    def _check_runnable(self):
        from compiler.artifact import ArtifactError
        if not self.manifest.get("runs_on_host"):
            raise ArtifactError(f"{self.dir}: built for target '{self.manifest['target']['name']}', which does not "
                                f"run on this machine; benchmark it on the device with compiler.bench --rpc-tracker")

    def _device_and_module(self):
        import tvm
        from compiler.artifact import LIB_NAME
        return tvm.cpu(), tvm.runtime.load_module(str(self.dir / LIB_NAME))

    def _invoke(self, entry: str, args) -> list:
        return list(self._fn[entry](*args))

    # -- common
    def _open(self):
        import tvm
        from safetensors.numpy import load_file
        from tvm import relax

        from compiler.artifact import PARAMS_NAME

        self.device, module = self._device_and_module()
        self.lib = module  # the loaded library: its kernels, for time_evaluator (compiler/profile.py)
        self.vm = relax.VirtualMachine(module, self.device)
        raw = load_file(str(self.dir / PARAMS_NAME))
        tensors = {k: tvm.runtime.tensor(v, self.device) for k, v in raw.items()}
        self.params = {e: [tensors[n] for n in spec["params"]] for e, spec in self.manifest["entry_points"].items()}
        self._fn = {e: self.vm[e] for e in self.params}
        c = self.config
        k = tvm.runtime.tensor(np.zeros((1, c.num_kv_heads, c.head_dim, 0), "float32"), self.device)
        v = tvm.runtime.tensor(np.zeros((1, c.num_kv_heads, 0, c.head_dim), "float32"), self.device)
        self._empty_kv = LayerKV([k, v] * c.num_layers, 0, kv_shape(c, 0), keys_t=True)

    def entry_args(self, ids: list[int], kv: LayerKV) -> list:
        """The VM arguments of an entry point: tokens, positions, the per-layer caches, the weights."""
        import tvm
        check_ids(self.config, ids, kv.length)
        tokens = tvm.runtime.tensor(np.asarray([ids], dtype="int64"), self.device)
        positions = tvm.runtime.tensor(np.arange(kv.length, kv.length + len(ids), dtype="int64")[None], self.device)
        entry = "decode" if len(ids) == 1 else "prefill"
        return [tokens, positions, *kv.values, *self.params[entry]]

    def prefill(self, ids: list[int], kv: LayerKV | None = None):
        """Run `ids` (after `kv`, if given); -> (last-position logits [V], kv)."""
        kv = self._empty_kv if kv is None else kv
        out = self._invoke("decode" if len(ids) == 1 else "prefill", self.entry_args(ids, kv))
        total = kv.length + len(ids)
        return out[0].numpy()[0], LayerKV(out[1:], total, kv_shape(self.config, total), keys_t=True)

    def decode(self, token: int, kv: LayerKV):
        return self.prefill([token], kv)


def kv_shape(config: MobileMoEConfig, length: int) -> tuple:
    return (config.num_layers, 2, 1, config.num_kv_heads, length, config.head_dim)


@dataclass
class LayerKV:
    """A runtime's KV cache: the K and V of each layer, [1, nkv, P, D] each (K [1, nkv, D, P] when
    keys_t), in the order k_0, v_0, k_1, v_1, ... (TVM tensors, or OrtValues present.{i}.key / .value)."""
    values: list
    length: int  # P
    shape: tuple  # (L, 2, 1, nkv, P, D): the stacked layout's shape (mobilemoe/model.py)
    keys_t: bool = False

    def numpy(self) -> np.ndarray:
        """The stacked layout [L, 2, 1, nkv, P, D] (a copy; for checks, not the hot path)."""
        if not self.length:
            return np.zeros(self.shape, np.float32)
        arrays = [v.numpy() for v in self.values]
        if self.keys_t:
            arrays[0::2] = [k.swapaxes(-1, -2) for k in arrays[0::2]]
        return np.stack(arrays).reshape(self.shape)


_ORT_INSTALL = "pip install 'onnxruntime>=1.32'"  # QMoE with router_weights, GQA with do_rotary on CPU


def _cpu_kernels(ort) -> set[tuple[str, str]]:
    """(domain, op) of every CPU kernel this onnxruntime build registers."""
    kernels = ort.capi._pybind_state.get_all_opkernel_def()
    return {(k.domain, k.op_name) for k in kernels if k.provider == "CPUExecutionProvider"}


class OrtRuntime(_Generation):
    """An ONNX artifact in an onnxruntime CPU session (INT4 contrib ops: MatMulNBits, QMoE, ...)."""

    backend = "onnx"

    def __init__(self, artifact_dir, num_threads: int | None = None):
        from compiler.artifact import ONNX_NAME, ArtifactError, verify

        self.dir = Path(artifact_dir)
        self.manifest = verify(self.dir)  # every hash, before anything is parsed
        if self.manifest.get("backend") != "onnx":
            raise ArtifactError(f"{self.dir}: backend {self.manifest.get('backend')!r}, expected 'onnx'")
        self.config = MobileMoEConfig.from_dict(self.manifest["config"], source=f"{self.dir}/manifest.json:config")
        try:
            import onnxruntime as ort
        except ImportError:
            raise ArtifactError(f"{self.dir}: an ONNX artifact needs onnxruntime: {_ORT_INSTALL}") from None
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
        c = self.config
        layers = [(i, kind) for i in range(c.num_layers) for kind in ("key", "value")]
        self._past = [f"past_key_values.{i}.{kind}" for i, kind in layers]
        self._outputs = ["logits", *(f"present.{i}.{kind}" for i, kind in layers)]
        empty = self._value(np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32))
        self._empty_kv = LayerKV([empty] * len(self._past), 0, kv_shape(c, 0))

    def _value(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(array)

    def prefill(self, ids: list[int], kv: LayerKV | None = None):
        """Run `ids` (after `kv`, if given); -> (last-position logits [V], kv)."""
        kv = self._empty_kv if kv is None else kv
        check_ids(self.config, ids, kv.length)
        total = kv.length + len(ids)
        feed = {"input_ids": self._value(np.asarray([ids], dtype=np.int64)),
                "seqlens_k": self._value(np.asarray([total - 1], dtype=np.int32)),  # GQA: total - 1 per batch row
                "total_sequence_length": self._value(np.asarray(total, dtype=np.int32)),
                **dict(zip(self._past, kv.values))}
        out = self.session.run_with_ort_values(self._outputs, feed)
        return out[0].numpy()[0], LayerKV(out[1:], total, kv_shape(self.config, total))

    def decode(self, token: int, kv: LayerKV):
        return self.prefill([token], kv)


def load_artifact(artifact_dir, num_threads: int | None = None):
    """Open an artifact with the runtime its manifest names."""
    from compiler.artifact import ArtifactError, read_manifest
    backend = read_manifest(artifact_dir).get("backend")
    if backend == "tvm":
        return TVMRuntime(artifact_dir, num_threads)
    if backend == "onnx":
        return OrtRuntime(artifact_dir, num_threads)
    if backend == "iree":  # MLIR artifact (compiler/mlir_export.py)
        from .iree_runtime import IreeRuntime
        return IreeRuntime(artifact_dir, num_threads)
    raise ArtifactError(f"{artifact_dir}: no runtime for backend {backend!r}")
