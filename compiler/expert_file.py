"""The expert file of a budgeted artifact (experts.bin): every routed expert's INT4 bytes, one
page-aligned record per (layer, expert), read on demand by the runtime (mobilemoe/runtimes/expert_cache.py).

    record r = layer * E + expert at byte r * record_bytes; record_bytes a multiple of PAGE
    inside a record, the expert's tensors back to back in pool order (passes/use_expert_slots.py:
    gate/up codes, gate/up scales, down codes, down scales), each exactly as one [E, ...] row of
    the packed parameter the resident artifact would hold (codes interleaved for dot kernels alike)

so one pread (or one mmap'd page range) of record_bytes brings in one expert, and the bytes copied
into a cache slot are those the fully resident kernels would read. The manifest's "experts" block
(`expert_layout`) says where each tensor lies.
"""
from __future__ import annotations

import os

import numpy as np

from .params import ParamError
from .residency import PAGE

EXPERTS_NAME = "experts.bin"


def expert_layout(layers: list[list[str]], pools: list[dict], num_experts: int) -> dict:
    """The manifest block: file, record size, per-pool tensor offsets, each layer's parameter names."""
    tensors, at = [], 0
    for p in pools:
        shape = list(p["shape"][1:])
        nbytes = int(np.prod(shape)) * np.dtype(p["dtype"]).itemsize
        tensors.append({"pool": p["name"], "dtype": p["dtype"], "shape": shape, "offset": at, "nbytes": nbytes})
        at += nbytes
    return {"file": EXPERTS_NAME, "num_layers": len(layers), "num_experts": num_experts,
            "record_bytes": -(-at // PAGE) * PAGE, "tensors": tensors, "layers": layers}


def write_expert_file(path, layout: dict, packed) -> None:
    """Write every layer's expert tensors (packed: name -> [E, ...] arrays, produced one at a time,
    compiler.params.PackedParams) into their records at `path`."""
    where = {name: (l, i) for l, names in enumerate(layout["layers"]) for i, name in enumerate(names)}
    E, rec, tensors = layout["num_experts"], layout["record_bytes"], layout["tensors"]
    pending = set(where)
    with open(path, "wb") as f:
        f.truncate(layout["num_layers"] * E * rec)
        for name, array in packed:
            if name not in pending:
                raise ParamError(f"{EXPERTS_NAME}: tensor '{name}' is not an expert tensor of the layout, or came twice")
            pending.discard(name)
            layer, i = where[name]
            t = tensors[i]
            if str(array.dtype) != t["dtype"] or list(array.shape) != [E, *t["shape"]]:
                raise ParamError(f"{EXPERTS_NAME}: tensor '{name}' is {array.dtype} {list(array.shape)}, the layout "
                                 f"expects {t['dtype']} {[E, *t['shape']]}")
            array = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
            for e in range(E):
                os.pwrite(f.fileno(), array[e].tobytes(), (layer * E + e) * rec + t["offset"])
        if pending:
            raise ParamError(f"{EXPERTS_NAME}: expert tensors never produced: {sorted(pending)[:4]}")
