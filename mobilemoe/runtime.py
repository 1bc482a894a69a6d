"""Run a compiled artifact on this machine: load (after verifying every hash), prefill, decode, generate.

    rt = load_artifact("dist/mobilemoe-tiny-host")
    logits, kv = rt.prefill([0, 17, 42])      # logits np [V] of the last position, kv stays on device
    logits, kv = rt.decode(99, kv)
    ids, stats = rt.generate(prompt_ids, max_new_tokens=32)

The KV cache lives on the device between calls as a LayerKV: a K [1, nkv, D, P] and a V [1, nkv, P, D]
tensor per layer (the "layers" layout of mobilemoe/export.py); each step is one Relax VM call.
Artifacts whose decode takes the in-place cache (manifest entry_points.decode.kv_cache.layout
"inplace", mobilemoe/kv_cache.py) hold it at a capacity C instead (K [1, nkv, D, C], V [1, nkv, C, D],
LayerKV.capacity): allocated once per prefill, zeroed, at twice the length reached (kv_capacity:
a fixed capacity), each decode step writing its slot in those buffers; a step past the capacity
moves the cache to one twice as large. The decode loop makes no per-step copy and no allocation:
its token and position tensors are reused and the logits are a view of the VM's output (this
machine). Artifacts built for another CPU (android-arm64, linux-arm64) are
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
from .kv_cache import capacity_for


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

    def __init__(self, artifact_dir, num_threads: int | None = None, kv_capacity: int | None = None):
        from compiler.artifact import ArtifactError, verify

        self.dir = Path(artifact_dir)
        self.kv_capacity = kv_capacity
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
        layout = (self.manifest["entry_points"]["decode"].get("kv_cache") or {}).get("layout", "grow")
        self.kv_inplace = layout == "inplace"
        # decode's token and position, reused every step (copied into, never reallocated)
        self._step_in = [tvm.runtime.tensor(np.zeros((1, 1), "int64"), self.device) for _ in range(2)]
        self._zero_copy = getattr(self, "session", None) is None  # logits as a view (this machine's memory)

    def entry_args(self, ids: list[int], kv: LayerKV) -> list:
        """The VM arguments of an entry point: tokens, positions, the per-layer caches, the weights."""
        import tvm
        check_ids(self.config, ids, kv.length)
        if len(ids) == 1:
            tokens, positions = self._step_in
            tokens.copyfrom(np.asarray([ids], dtype="int64"))
            positions.copyfrom(np.asarray([[kv.length]], dtype="int64"))
            return [tokens, positions, *kv.values, *self.params["decode"]]
        tokens = tvm.runtime.tensor(np.asarray([ids], dtype="int64"), self.device)
        positions = tvm.runtime.tensor(np.arange(kv.length, kv.length + len(ids), dtype="int64")[None], self.device)
        return [tokens, positions, *kv.values, *self.params["prefill"]]

    def _logits(self, t) -> np.ndarray:
        if self._zero_copy:
            return np.from_dlpack(t)[0]
        return t.numpy()[0]

    def prefill(self, ids: list[int], kv: LayerKV | None = None):
        """Run `ids` (after `kv`, if given); -> (last-position logits [V], kv)."""
        kv = self._empty_kv if kv is None else kv
        if self.kv_inplace:
            return self._step_inplace(ids, kv)
        out = self._invoke("decode" if len(ids) == 1 else "prefill", self.entry_args(ids, kv))
        total = kv.length + len(ids)
        return self._logits(out[0]), LayerKV(out[1:], total, kv_shape(self.config, total), keys_t=True)

    # -- the in-place cache (mobilemoe/kv_cache.py)
    def _capacity(self, length: int) -> int:
        """Slots to allocate for a cache about to hold `length` positions (a multiple of BLOCK)."""
        top = capacity_for(self.config.max_seq_len)
        want = self.kv_capacity or max(2 * length, 256)
        return min(top, max(capacity_for(want), capacity_for(length)))

    def _with_capacity(self, values: list, length: int, capacity: int) -> LayerKV:
        """New zeroed capacity buffers holding the first `length` positions of `values` (length-sized
        tensors, or capacity buffers)."""
        import tvm
        c, out = self.config, []
        for i, t in enumerate(values):
            a = t.numpy() if length else None
            if i % 2 == 0:  # K [1, nkv, D, *]
                buf = np.zeros((1, c.num_kv_heads, c.head_dim, capacity), np.float32)
                if length:
                    buf[..., :length] = a[..., :length]
            else:  # V [1, nkv, *, D]
                buf = np.zeros((1, c.num_kv_heads, capacity, c.head_dim), np.float32)
                if length:
                    buf[:, :, :length] = a[:, :, :length]
            out.append(tvm.runtime.tensor(buf, self.device))
        return LayerKV(out, length, kv_shape(c, length), keys_t=True, capacity=capacity)

    def _step_inplace(self, ids: list[int], kv: LayerKV):
        total = kv.length + len(ids)
        if len(ids) > 1:  # prefill: the functional entry on the valid prefix, then into capacity buffers
            if kv.capacity is not None:
                kv = LayerKV([self._prefix(t, i, kv.length) for i, t in enumerate(kv.values)], kv.length,
                             kv.shape, keys_t=True)
            out = self._invoke("prefill", self.entry_args(ids, kv))
            return self._logits(out[0]), self._with_capacity(out[1:], total, self._capacity(total))
        if kv.capacity is None or total > kv.capacity:  # empty or full: a larger cache, the prefix copied
            kv = self._with_capacity(kv.values, kv.length, self._capacity(total))
        out = self._invoke("decode", self.entry_args(ids, kv))  # writes slot kv.length of kv's buffers
        return self._logits(out[0]), LayerKV(out[1:], total, kv_shape(self.config, total), keys_t=True,
                                             capacity=kv.capacity)

    def _prefix(self, t, i: int, length: int):
        import tvm
        a = t.numpy()
        return tvm.runtime.tensor(np.ascontiguousarray(a[..., :length] if i % 2 == 0 else a[:, :, :length]),
                                  self.device)

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
    capacity: int | None = None  # the in-place cache: the buffers hold C slots, the first P valid

    def numpy(self) -> np.ndarray:
        """The stacked layout [L, 2, 1, nkv, P, D] (a copy; for checks, not the hot path)."""
        if not self.length:
            return np.zeros(self.shape, np.float32)
        arrays = [v.numpy() for v in self.values]
        if self.capacity is not None:
            arrays = [a[..., :self.length] if i % 2 == 0 else a[:, :, :self.length] for i, a in enumerate(arrays)]
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


def load_artifact(artifact_dir, num_threads: int | None = None, kv_capacity: int | None = None):
    """Open an artifact with the runtime its manifest names (kv_capacity: TVM's in-place cache, fixed)."""
    from compiler.artifact import ArtifactError, read_manifest
    backend = read_manifest(artifact_dir).get("backend")
    if backend == "tvm":
        return TVMRuntime(artifact_dir, num_threads, kv_capacity)
    if backend == "onnx":
        return OrtRuntime(artifact_dir, num_threads)
    if backend == "iree":  # MLIR artifact (compiler/mlir_export.py)
        from .iree_runtime import IreeRuntime
        return IreeRuntime(artifact_dir, num_threads)
    raise ArtifactError(f"{artifact_dir}: no runtime for backend {backend!r}")
