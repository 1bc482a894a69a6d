"""The expert cache of a budgeted TVM artifact: routed experts read on demand from its expert file.

A budgeted artifact (manifest "experts", written by `compiler.build --memory-budget-mb`) keeps its
routed experts out of params.safetensors, in experts.bin: one page-aligned record per (layer,
expert), its tensors back to back (record_bytes, tensors[i] {pool, dtype, shape, offset, nbytes}).
Its compiled decode/prefill take one pool per expert tensor, [S, ...] for S slots shared by all
MoE layers, and, once per layer, call the packed function CALLBACK:

    slots = mobilemoe.expert_slots(ids [N, k], layer, pool_0, .., pool_3)    # -> [N, k], ids' dtype

which makes the layer's chosen experts resident (one os.preadv of a record, straight into the
pools' memory, per miss) and returns the slot of each id; the INT4 kernels then read the pools at
those slots. Slots 0..P-1 hold the pinned experts (manifest "pinned", from routing statistics);
the others are an LRU cache (compiler/residency.py says why LRU). A call needs every distinct
expert it names to fit at once: `max_tokens` is the prompt chunk for which that holds (the runtime
prefills longer prompts in chunks of it; None: any length).

The cache lives in the process that runs the module: this one (tvm_local.TVMRuntime), or a TVM RPC
server (tvm_rpc.RemoteRuntime), which must have imported this module and run serve() at start-up
(`python -m mobilemoe.runtimes.rpc_server`, the server of targets/arm64_device.sh and
targets/local_rpc.py). serve() registers the remote side of the cache, keyed by an int the client holds:

    key = mobilemoe.expert_cache.open(file name in the session's work dir, manifest experts block as JSON)
    mobilemoe.expert_cache.pool(key, i) -> the server's pool tensor i   (the VM's arguments)
    mobilemoe.expert_cache.stats(key) -> JSON; .reset_stats(key); .close(key)
    mobilemoe.expert_cache.set_input(vm module, entry, key, n_copy, *args)   # not the VM's set_input

A tensor passed into a server function is a view valid only during that call, so the server
allocates the pools and hands them out, never the reverse. The VM's own set_input over RPC copies
every tensor argument (it arrives as a DLTensor): the kernels would read copies of the pools while
the cache fills the originals. set_input here gives the VM the pools themselves, the weights as
tensors over the same memory (the client's remote tensors own it and keep it as long as the
runtime), and copies of the first n_copy arguments (tokens, positions, KV cache), which the VM may
return as outputs (the in-place cache) and so must own; a step copies no weight.
"""
from __future__ import annotations

import ctypes
import itertools
import json
import os
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tvm

from ..artifact import ArtifactError

CALLBACK = "mobilemoe.expert_slots"  # the name passes/use_expert_slots.py compiles into the graph
REMOTE = "mobilemoe.expert_cache."  # prefix of the functions serve() registers in an RPC server
_CACHES: "weakref.WeakValueDictionary[int, ExpertCache]" = weakref.WeakValueDictionary()  # pool 0 address ->


def max_tokens(block: dict) -> int | None:
    """Tokens one call may route (every distinct expert of a layer in the LRU slots); None: any."""
    lru = block["slots"] - len(block.get("pinned", []))
    return None if lru >= block["num_experts"] else max(1, lru // block["top_k"])


class ExpertCache:
    """The pools (TVM tensors, one per expert tensor) of one loaded artifact and the slot table."""

    def __init__(self, artifact_dir, block: dict, device, file_name: str | None = None):
        self.block = block
        self.L, self.E, self.S = block["num_layers"], block["num_experts"], block["slots"]
        self.record = block["record_bytes"]
        path = Path(artifact_dir) / (file_name or block["file"])
        if path.stat().st_size != self.L * self.E * self.record:
            raise ArtifactError(f"{path}: {path.stat().st_size} bytes, the manifest's experts block describes "
                                f"{self.L * self.E} records of {self.record}")
        self.fd = os.open(path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        self.pools = {t["pool"]: tvm.runtime.empty((self.S, *t["shape"]), t["dtype"], device) for t in block["tensors"]}
        self._bytes = [np.from_dlpack(p).reshape(self.S, -1).view(np.uint8) for p in self.pools.values()]
        self.table = np.full((self.L, self.E), -1, np.int64)  # slot of (layer, expert), -1: not resident
        self.owner: list[tuple[int, int] | None] = [None] * self.S
        pinned = [tuple(p) for p in block.get("pinned", [])]
        for slot, (layer, e) in enumerate(pinned):
            self._load(layer, e, slot)
        self.lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(len(pinned), self.S))
        self.max_tokens = max_tokens(block)
        self.reset_stats()
        self._device = device
        self._out: dict[tuple, tuple] = {}  # (layer, ids shape, dtype) -> (tensor, its numpy view), reused
        _CACHES[next(iter(self.pools.values())).data_ptr()] = self

    def reset_stats(self) -> None:
        self.hits = self.misses = self.bytes_read = 0

    def stats(self) -> dict:
        n = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / n if n else None,
                "bytes_read": self.bytes_read, "slots": self.S, "pinned": self.S - len(self.lru)}

    def _load(self, layer: int, e: int, slot: int) -> None:
        bufs = [memoryview(b[slot]) for b in self._bytes]
        want = sum(len(b) for b in bufs)
        got = os.preadv(self.fd, bufs, (layer * self.E + e) * self.record)
        if got != want:
            raise ArtifactError(f"{self.block['file']}: short read of expert {e} of layer {layer} ({got} of {want} bytes)")
        old = self.owner[slot]
        if old is not None:
            self.table[old] = -1
        self.owner[slot], self.table[layer, e] = (layer, e), slot
        self.bytes_read += want

    def slots_for(self, ids: np.ndarray, layer: int) -> np.ndarray:
        """Make layer `layer`'s experts `ids` resident; -> their slots (same shape and dtype)."""
        self.make_resident(ids, layer)
        return self.table[layer][ids].astype(ids.dtype, copy=False)

    def slots_tensor(self, ids: np.ndarray, layer: int):
        """slots_for as a TVM tensor: for a decode step, one kept per layer and written in place (the
        step's kernels of that layer have run before its next call), else a new one."""
        self.make_resident(ids, layer)
        if ids.shape[0] != 1:
            return tvm.runtime.tensor(self.table[layer][ids].astype(ids.dtype, copy=False), self._device)
        key = (layer, ids.shape, ids.dtype.str)
        if key not in self._out:
            t = tvm.runtime.empty(ids.shape, str(ids.dtype), self._device)
            self._out[key] = (t, np.from_dlpack(t))
        t, view = self._out[key]
        np.take(self.table[layer], ids, out=view)
        return t

    def make_resident(self, ids: np.ndarray, layer: int) -> None:
        """Load layer `layer`'s experts among `ids` that are not resident (LRU eviction); count hits."""
        table, used = self.table[layer], set()
        for e in sorted(set(ids.ravel().tolist())):
            slot = int(table[e])
            if slot >= 0:
                self.hits += 1
            else:
                self.misses += 1
                slot = next((s for s in self.lru if s not in used), None)
                if slot is None:
                    raise RuntimeError(f"expert cache: layer {layer} needs {len(set(ids.ravel().tolist()))} experts at once, "
                                       f"more than its {len(self.lru)} cache slots (run fewer tokens per call)")
                self._load(layer, e, slot)
            used.add(slot)
            if slot in self.lru:
                self.lru.move_to_end(slot)


def _expert_slots(ids, layer, *pools):
    """CALLBACK: the cache that owns `pools` resolves layer `layer`'s ids to slots."""
    cache = _CACHES.get(pools[0].data_ptr())
    if cache is None:
        raise RuntimeError(f"{CALLBACK}: no loaded artifact owns these expert pools")
    return cache.slots_tensor(np.from_dlpack(ids), int(layer))


tvm.register_global_func(CALLBACK, _expert_slots, override=True)


# ------------------------------------------------------------------- the server side of RPC
_SERVED: dict[int, ExpertCache] = {}  # key -> cache, alive until close(key) or the session's end
_KEYS = itertools.count(1)


def _open(file_name: str, block_json: str) -> int:
    workpath = tvm.get_global_func("tvm.rpc.server.workpath", allow_missing=True)
    path = Path(workpath(file_name) if workpath else file_name)  # the session's work dir, where uploads land
    cache = ExpertCache(path.parent, json.loads(block_json), tvm.cpu(0), file_name=path.name)
    key = next(_KEYS)
    _SERVED[key] = cache
    return key


def _served(key: int) -> ExpertCache:
    if key not in _SERVED:
        raise RuntimeError(f"{REMOTE}*: no open expert cache {key} in this server")
    return _SERVED[key]


def _same_memory(t):
    """A tensor over the memory of `t`, a server function's argument (a view valid during the call only)."""
    shape, dtype = tuple(t.shape), np.dtype(str(t.dtype))
    n = int(np.prod(shape)) * dtype.itemsize
    if n == 0:
        return tvm.runtime.empty(shape, str(t.dtype), tvm.cpu(0))
    array = np.frombuffer((ctypes.c_char * n).from_address(t.data_ptr()), dtype).reshape(shape)
    return tvm.runtime.from_dlpack(array)


def _set_input(vm, entry: str, key: int, n_copy: int, *args) -> None:
    pools = {p.data_ptr(): p for p in _served(key).pools.values()}
    out = []
    for i, a in enumerate(args):
        if not isinstance(a, tvm.runtime.Tensor):
            out.append(a)
        elif i < n_copy:  # tokens, positions, KV cache: the VM may return them (the in-place cache)
            out.append(tvm.runtime.empty(a.shape, a.dtype, tvm.cpu(0)).copyfrom(a))
        else:  # weights: the client holds them as long as the runtime
            out.append(pools[a.data_ptr()] if a.data_ptr() in pools else _same_memory(a))
    vm["set_input"](entry, *out)


def serve() -> None:
    """Register the remote side of the expert cache (an RPC server's start-up callback)."""
    funcs = {"open": _open, "pool": lambda key, i: list(_served(key).pools.values())[i],
             "stats": lambda key: json.dumps(_served(key).stats()),
             "reset_stats": lambda key: _served(key).reset_stats(),
             "close": lambda key: _SERVED.pop(key, None) and None, "set_input": _set_input}
    for name, f in funcs.items():
        tvm.register_global_func(REMOTE + name, f, override=True)
