"""Replay the passes' parameter transforms on the checkpoint tensors (see passes/common.py).

    transforms: [{"out": name, "op": "concat" | "transpose" | "int4_codes" | "int4_scales", "inputs": [...], ...}]
                (int4_codes may carry "interleave": [rows, lanes], the dot kernels' word order)
    params = materialize(names, transforms, source)   # {name: np.ndarray} for exactly `names`

INT4 ops use mobilemoe.quant (quantize_int4 + pack_int4): the one implementation shared with QAT
and the ONNX fallback. A quantized weight is quantized once even when both codes and scales of it
are requested; source tensors are read when needed and not kept.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from mobilemoe.quant import interleave_int4, pack_int4, quantize_int4


class ParamError(RuntimeError):
    pass


class RandomWeights(dict):
    """A lazy source of random float32 weights by name (norm weights are ones), for shape-only
    builds: each tensor is generated when asked for and not kept, so a multi-GB model never sits in
    memory in float. Deterministic: the seed mixes `seed` and the name."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0, std: float = 0.02):
        super().__init__()
        self.shapes, self.seed, self.std = shapes, seed, std

    def __contains__(self, name) -> bool:
        return name in self.shapes

    def __getitem__(self, name) -> np.ndarray:
        shape = self.shapes[name]
        if "norm" in name:
            return np.ones(shape, "float32")
        rng = np.random.default_rng([self.seed, *name.encode()])
        return (rng.standard_normal(shape, dtype=np.float32) * self.std).astype("float32")


def materialize(names: list[str], transforms: list[dict], source, progress: bool = False) -> dict[str, np.ndarray]:
    """{name: array} for exactly `names`, from `source` (a dict or RandomWeights) and `transforms`."""
    rules = {t["out"]: t for t in transforms}
    quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(name: str) -> np.ndarray:
        if name in rules:
            return apply(rules[name])
        if name in source:
            return source[name]
        raise ParamError(f"parameter '{name}' is neither a checkpoint tensor nor produced by a transform")

    def int4(name: str):
        if name not in quantized:  # quantize once, for both the codes and the scales
            codes, scales = quantize_int4(torch.from_numpy(np.ascontiguousarray(get(name))), name=name)
            quantized[name] = (pack_int4(codes).numpy(), scales.numpy())
        return quantized[name]

    def apply(rule: dict) -> np.ndarray:
        op, inputs = rule["op"], rule["inputs"]
        if op == "concat":
            return np.concatenate([get(i) for i in inputs], axis=rule["axis"])
        if op == "transpose":
            return get(inputs[0]).T
        if op == "int4_codes":  # interleaved: the word order of the dot-product kernels (passes/select_dot_kernels.py)
            codes = int4(inputs[0])[0]
            return interleave_int4(codes, *rule["interleave"]) if "interleave" in rule else codes
        if op == "int4_scales":
            return int4(inputs[0])[1]
        raise ParamError(f"unknown parameter transform op '{op}' for '{rule['out']}'")

    return {n: np.ascontiguousarray(get(n)) for n in tqdm(names, desc="pack params", unit="tensor",
                                                          disable=not progress, leave=False)}


def tvm_param_name(name: str) -> str:
    """Our state_dict name -> the TVM importer's parameter name ("layers.0.moe.w1" ->
    "p_model_layers_0_moe_w1"): shape-only builds draw the same random weights as TVM's."""
    return "p_model_" + name.replace(".", "_")


def weight_source(model, random_weights: bool):
    """name -> float32 tensor: the model's parameters, or (shape-only builds) compiler.params.RandomWeights
    under the TVM names, generated one tensor at a time."""
    if not random_weights:
        params = dict(model.named_parameters(remove_duplicate=False))
        return lambda name: params[name].detach().float()
    shapes = {tvm_param_name(n): tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    source = RandomWeights(shapes)
    # a tied table reaches TVM once, under the LM head's name
    alias = {"embed.weight": "lm_head.weight"} if model.config.tie_embeddings else {}
    return lambda name: torch.from_numpy(source[tvm_param_name(alias.get(name, name))])
