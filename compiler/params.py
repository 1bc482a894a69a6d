"""Replay the passes' parameter transforms on the checkpoint tensors (see passes/common.py).

    transforms: [{"out": name, "op": "concat" | "int4_codes" | "int4_scales", "inputs": [...], ...}]
    params = materialize(names, transforms, source)   # {name: np.ndarray} for exactly `names`

INT4 ops use mobilemoe.quant (quantize_int4 + pack_int4): the one implementation shared with QAT
and the ONNX fallback. A quantized weight is quantized once even when both codes and scales of it
are requested.
"""
from __future__ import annotations

import numpy as np
import torch

from mobilemoe.quant import pack_int4, quantize_int4


class ParamError(RuntimeError):
    pass


def materialize(names: list[str], transforms: list[dict], source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rules = {t["out"]: t for t in transforms}
    cache: dict[str, np.ndarray] = {}
    quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(name: str) -> np.ndarray:
        if name in cache:
            return cache[name]
        if name in rules:
            value = apply(rules[name])
        elif name in source:
            value = source[name]
        else:
            raise ParamError(f"parameter '{name}' is neither a checkpoint tensor nor produced by a transform")
        cache[name] = value
        return value

    def int4(name: str):
        if name not in quantized:
            codes, scales = quantize_int4(torch.from_numpy(np.ascontiguousarray(get(name))), name=name)
            quantized[name] = (pack_int4(codes).numpy(), scales.numpy())
        return quantized[name]

    def apply(rule: dict) -> np.ndarray:
        op, inputs = rule["op"], rule["inputs"]
        if op == "concat":
            return np.concatenate([get(i) for i in inputs], axis=rule["axis"])
        if op == "int4_codes":
            return int4(inputs[0])[0]
        if op == "int4_scales":
            return int4(inputs[0])[1]
        raise ParamError(f"unknown parameter transform op '{op}' for '{rule['out']}'")

    return {n: np.ascontiguousarray(get(n)) for n in names}
