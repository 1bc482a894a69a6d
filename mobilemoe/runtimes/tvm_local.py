"""Run a TVM artifact on this machine: load (after verifying every hash), prefill, decode, generate.

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
machine). A budgeted artifact's prefill takes the in-place cache too (entry_points.prefill.kv_cache): a prompt
chunk is written into the capacity buffers, nothing copied. Artifacts built for another CPU (android-arm64, linux-arm64) are
refused here: run them on the device (tvm_rpc.RemoteRuntime, `python -m compiler.bench --rpc-tracker ...`).

A budgeted artifact (manifest "experts", `compiler.build --memory-budget-mb`) reads its routed experts
from its expert file into an expert cache (expert_cache.py, `rt.experts`: hit statistics) and keeps to
its budget's plan (compiler/residency.py): its KV cache at the planned capacity from the first prompt,
prompts prefilled in chunks of the planned length (or of what the cache can route at once, if fewer).
Weights are read from params.safetensors straight into their tensors (params_file.py).
"""
from __future__ import annotations

import ctypes
import gc
import os

import numpy as np
import tvm
from tvm import relax

from ..artifact import LIB_NAME, PARAMS_NAME, ArtifactError
from ..kv_cache import capacity_for
from .base import LayerKV, Runtime, check_ids, kv_shape
from .expert_cache import ExpertCache
from .params_file import read_params


def _release_freed_memory():
    """A budget's memory discipline: big allocations are mapped pages that go back to the system when
    freed (glibc's mmap threshold fixed at 64 KB: its default adapts upwards, keeping freed buffers of
    up to 32 MB in the heap), and the function that empties the VM's pooled allocator (which keeps
    every freed buffer for reuse, one per size: a prompt prefilled in chunks against a growing
    context would keep every chunk's activations); the caller also collects Python's cyclic garbage,
    which holds tensors of the step. Measured on the bundled model, a 900-token prompt in 128-token
    chunks: resident memory over the imports 70 MB before, 25 MB after."""
    try:
        ctypes.CDLL(None).mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD (glibc; elsewhere the call is absent)
    except (OSError, AttributeError):
        pass
    return tvm.get_global_func("vm.builtin.memory_manager.clear", allow_missing=True)


class TVMRuntime(Runtime):
    """A TVM artifact on this machine's CPU. Subclasses change where it runs (tvm_rpc.RemoteRuntime)."""

    backend = "tvm"

    @classmethod
    def load(cls, artifact_dir, num_threads: int | None = None, kv_capacity: int | None = None, session=None):
        return cls(artifact_dir, num_threads, kv_capacity)

    def __init__(self, artifact_dir, num_threads: int | None = None, kv_capacity: int | None = None):
        self.kv_capacity = kv_capacity
        self._open_manifest(artifact_dir)
        self._check_runnable()
        if num_threads:
            os.environ["TVM_NUM_THREADS"] = str(num_threads)
        self._open()

    # -- where it runs: overridden for RPC devices
    def _check_runnable(self):
        if not self.manifest.get("runs_on_host"):
            raise ArtifactError(f"{self.dir}: built for target '{self.manifest['target']['name']}', which does not "
                                f"run on this machine; benchmark it on the device with compiler.bench --rpc-tracker")

    def _device_and_module(self):
        return tvm.cpu(), tvm.runtime.load_module(str(self.dir / LIB_NAME))

    def _invoke(self, entry: str, args) -> list:
        return list(self._fn[entry](*args))

    def _open_experts(self, block: dict):
        """The expert cache of a budgeted artifact, in the process that runs its module."""
        return ExpertCache(self.dir, block, self.device)

    # -- common
    def _open(self):
        self.device, module = self._device_and_module()
        self.lib = module  # the loaded library: its kernels, for time_evaluator (compiler/profile.py)
        self.vm = relax.VirtualMachine(module, self.device)
        tensors = self._load_params()
        self.experts = self._open_experts(self.manifest["experts"]) if "experts" in self.manifest else None
        self.prefill_chunk, self._clear_pool, self.planned_capacity = None, None, None
        if self.experts is not None:
            tensors.update(self.experts.pools)
            budget = self.manifest["experts"]
            chunks = [x for x in (self.experts.max_tokens, budget.get("prefill_chunk")) if x]
            self.keep_to_budget(budget.get("kv_capacity"), min(chunks, default=None))
        self.params = {e: [tensors[n] for n in spec["params"]] for e, spec in self.manifest["entry_points"].items()}
        self._fn = {e: self.vm[e] for e in self.params}
        c = self.config
        k = tvm.runtime.tensor(np.zeros((1, c.num_kv_heads, c.head_dim, 0), "float32"), self.device)
        v = tvm.runtime.tensor(np.zeros((1, c.num_kv_heads, 0, c.head_dim), "float32"), self.device)
        self._empty_kv = LayerKV([k, v] * c.num_layers, 0, kv_shape(c, 0), keys_t=True)
        layout = {e: (spec.get("kv_cache") or {}).get("layout", "grow") for e, spec in self.manifest["entry_points"].items()}
        self.kv_inplace = layout["decode"] == "inplace"
        self.prefill_inplace = layout.get("prefill") == "inplace"  # a budget's (compiler/residency.py)
        # decode's token and position, reused every step (copied into, never reallocated)
        self._step_in = [tvm.runtime.tensor(np.zeros((1, 1), "int64"), self.device) for _ in range(2)]
        self._zero_copy = getattr(self, "session", None) is None  # logits as a view (this machine's memory)

    def _load_params(self) -> dict:
        """name -> device tensor of every parameter in params.safetensors, each read from the file
        into its own memory (params_file.py: loading holds the weights once)."""
        return read_params(self.dir / PARAMS_NAME, self.device)

    def keep_to_budget(self, kv_capacity: int | None, prefill_chunk: int | None) -> None:
        """Run as a memory budget plans (compiler/residency.py; a budgeted artifact does this itself):
        the KV cache at `kv_capacity` from the first prompt and never past it, prompts prefilled in
        chunks of `prefill_chunk` tokens, each chunk's freed memory given back (_release_freed_memory)."""
        self.kv_capacity = self.planned_capacity = self.kv_capacity or kv_capacity or None
        self.prefill_chunk = prefill_chunk
        release = self._freed_memory_release()
        # the young generations only: a step's cycles are young, and a full collection takes ~0.4 s here
        self._clear_pool = lambda: (gc.collect(1), release and release())

    def _freed_memory_release(self):
        """What empties the pooled allocator of the VM that runs the steps (here: this process's)."""
        return _release_freed_memory()

    def entry_args(self, ids: list[int], kv: LayerKV) -> list:
        """The VM arguments of an entry point: tokens, positions, the per-layer caches, the weights."""
        check_ids(self.config, ids, kv.length)
        if self.kv_inplace if len(ids) == 1 else self.prefill_inplace:  # e.g. compiler.bench --profile's empty cache
            kv = self._fitted(kv, len(ids))
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
        chunk = self.prefill_chunk
        if chunk is not None and len(ids) > chunk:  # the budget's chunk, or what the expert cache routes at once
            for i in range(0, len(ids), chunk):
                logits, kv = self.prefill(ids[i:i + chunk], kv)
            return logits, kv
        if self.kv_inplace:
            return self._step_inplace(ids, kv)
        out = self._invoke("decode" if len(ids) == 1 else "prefill", self.entry_args(ids, kv))
        total = kv.length + len(ids)
        return self._logits(out[0]), LayerKV(out[1:], total, kv_shape(self.config, total), keys_t=True)

    # -- the in-place cache (mobilemoe/kv_cache.py)
    def _capacity(self, length: int) -> int:
        """Slots to allocate for a cache about to hold `length` positions (a multiple of BLOCK)."""
        if self.planned_capacity and length > self.planned_capacity:
            raise ArtifactError(f"{self.dir}: {length} tokens of context, past the {self.planned_capacity} its memory "
                                f"budget plans for (rebuild with a larger compiler.build --budget-context)")
        top = capacity_for(self.config.max_seq_len)
        want = self.kv_capacity or max(2 * length, 256)
        return min(top, max(capacity_for(want), capacity_for(length)))

    def _step_inplace(self, ids: list[int], kv: LayerKV):
        total = kv.length + len(ids)
        if len(ids) > 1 and not self.prefill_inplace:  # the functional prefill on the valid prefix, then into capacity buffers
            reuse = None
            if kv.capacity is not None:
                reuse = kv if kv.capacity >= self._capacity(total) else None  # written in place below
                kv = LayerKV([self._prefix(t, i, kv.length) for i, t in enumerate(kv.values)], kv.length,
                             kv.shape, keys_t=True)
            out = self._invoke("prefill", self.entry_args(ids, kv))
            del kv  # the prefix copies, before the outputs go into the capacity buffers
            logits = self._logits(out[0]) if self._clear_pool is None else np.array(self._logits(out[0]))
            kv = self._with_capacity(out[1:], total, self._capacity(total), reuse)
            del out
            if self._clear_pool is not None:  # a budget: the VM's pooled buffers of this prompt chunk go back
                self._clear_pool()
            return logits, kv
        kv = self._fitted(kv, len(ids))
        # writes slots kv.length.. of kv's buffers (decode, or a budget's in-place prefill)
        out = self._invoke("decode" if len(ids) == 1 else "prefill", self.entry_args(ids, kv))
        logits = self._logits(out[0])
        kv = LayerKV(out[1:], total, kv_shape(self.config, total), keys_t=True, capacity=kv.capacity)
        if len(ids) > 1 and self._clear_pool is not None:  # the VM's pooled buffers of this prompt chunk go back
            logits = np.array(logits)
            del out
            self._clear_pool()
        return logits, kv

    def _fitted(self, kv: LayerKV, n: int) -> LayerKV:
        """`kv` if its capacity holds `n` more positions; empty or full: a larger cache, the prefix copied."""
        if kv.capacity is not None and kv.length + n <= kv.capacity:
            return kv
        return self._with_capacity(kv.values, kv.length, self._capacity(kv.length + n))

    def _host_view(self, t) -> np.ndarray:
        """`t` as a numpy array: a view on this machine, a copy from a remote device."""
        return np.from_dlpack(t) if self._zero_copy else t.numpy()

    def _prefix(self, t, i: int, length: int):
        a = self._host_view(t)
        part = a[..., :length] if i % 2 == 0 else a[:, :, :length]
        if not self._zero_copy:
            return tvm.runtime.tensor(np.ascontiguousarray(part), self.device)
        out = tvm.runtime.empty(part.shape, "float32", self.device)
        np.from_dlpack(out)[...] = part  # one copy, straight into the new tensor
        return out

    def _with_capacity(self, values: list, length: int, capacity: int, reuse: LayerKV | None = None) -> LayerKV:
        """Capacity buffers holding the first `length` positions of `values` (length-sized tensors, or
        capacity buffers): `reuse`'s, written in place, or new zeroed ones."""
        c, out = self.config, []
        for i, t in enumerate(values):
            a = self._host_view(t) if length else None
            shape = (1, c.num_kv_heads, c.head_dim, capacity) if i % 2 == 0 else (1, c.num_kv_heads, capacity, c.head_dim)
            if reuse is not None and self._zero_copy:
                tensor = reuse.values[i]
                buf = np.from_dlpack(tensor)
            elif self._zero_copy:
                tensor = tvm.runtime.empty(shape, "float32", self.device)
                buf = np.from_dlpack(tensor)
                buf[...] = 0
            else:
                tensor, buf = None, np.zeros(shape, np.float32)
            if length:
                if i % 2 == 0:  # K [1, nkv, D, *]
                    buf[..., :length] = a[..., :length]
                else:  # V [1, nkv, *, D]
                    buf[:, :, :length] = a[:, :, :length]
            out.append(tensor if tensor is not None else tvm.runtime.tensor(buf, self.device))
        return LayerKV(out, length, kv_shape(c, length), keys_t=True, capacity=capacity)
