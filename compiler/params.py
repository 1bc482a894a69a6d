"""Replay the passes' parameter transforms on the checkpoint tensors (see passes/common.py), one
tensor at a time, straight into the artifact's params.safetensors.

    transforms: [{"out": name, "op": "concat" | "transpose" | "int4_codes" | "int4_scales", "inputs": [...], ...}]
                (int4_codes may carry "interleave": [rows, lanes], the dot kernels' word order)
    for name, array in iter_params(names, transforms, source): ...   # streamed, each produced once
    params = materialize(names, transforms, source)                  # {name: np.ndarray} for exactly `names`
    write_safetensors(path, specs, iter_params(...))                  # the file save_file would write

Memory: a build never holds the model's weights in float. A source tensor is read (a checkpoint's,
lazily, or drawn by RandomWeights) when a parameter needs it and dropped once that parameter is
written; a quantized weight is quantized once, in blocks of rows, and its codes and scales are
written together. Peak: about one float source tensor (the largest: the embedding table) plus its
packed form, whatever the model's size.

INT4 ops use mobilemoe.quant (quantize_int4 + pack_int4): the one implementation shared with QAT
and the ONNX fallback. Quantization is per row (groups of 32 along K), so quantizing a weight in
blocks of rows gives the very codes and scales of quantizing it whole.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from safetensors.numpy import save as safetensors_bytes
from tqdm import tqdm

from mobilemoe.quant import GROUP_SIZE, interleave_int4, pack_int4, quantize_int4

INT4_OPS = ("int4_codes", "int4_scales")
QUANT_BLOCK = 1 << 24  # float elements quantized at once (64 MB; smaller blocks ran slower)


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
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(self.std)  # in place: the float32 product `w * std` always was, without a copy
        return w


def quantize_weight(w, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float W [..., N, K] (numpy or torch) -> (packed codes uint32 [..., N, K // 8], scales float16
    [..., N, K // 32]): quantize_int4 + pack_int4 over blocks of rows, so the temporaries stay small."""
    w = torch.from_numpy(np.ascontiguousarray(w)) if isinstance(w, np.ndarray) else w.detach().contiguous()
    if w.dim() < 2 or w.shape[-1] % GROUP_SIZE or not w.is_floating_point():
        codes, scales = quantize_int4(w, name=name)  # raises its own error naming the weight
        return pack_int4(codes).numpy(), scales.numpy()
    *lead, n, k = w.shape
    rows = w.reshape(-1, k)
    codes = np.empty((rows.shape[0], k // 8), np.uint32)
    scales = np.empty((rows.shape[0], k // GROUP_SIZE), np.float16)
    step = max(1, QUANT_BLOCK // k)
    for i in range(0, rows.shape[0], step):
        c, s = quantize_int4(rows[i:i + step], name=name)
        codes[i:i + step] = pack_int4(c).numpy()
        scales[i:i + step] = s.numpy()
    return codes.reshape(*lead, n, k // 8), scales.reshape(*lead, n, k // GROUP_SIZE)


def iter_params(names: list[str], transforms: list[dict], source) -> Iterator[tuple[str, np.ndarray]]:
    """(name, C-contiguous array) for each of `names` exactly once, from `source` (a mapping name ->
    float tensor: a dict, RandomWeights, a lazy checkpoint reader) and `transforms`. Nothing is kept
    between tensors: the codes and scales of one weight come out together (quantized once), in the
    order of `names` otherwise."""
    rules = {t["out"]: t for t in transforms}
    int4_outputs: dict[str, list[str]] = {}  # quantized weight -> its requested codes / scales
    for n in dict.fromkeys(names):
        if n in rules and rules[n]["op"] in INT4_OPS:
            int4_outputs.setdefault(rules[n]["inputs"][0], []).append(n)

    def get(name: str):
        if name in rules:
            return apply(rules[name])
        if name in source:
            return source[name]
        raise ParamError(f"parameter '{name}' is neither a checkpoint tensor nor produced by a transform")

    def int4_output(rule: dict, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        if rule["op"] == "int4_scales":  # interleaved (rows, 1) for row-lane kernels (int4_dot.scales_interleave_for)
            return interleave_int4(scales, *rule["interleave"]) if "interleave" in rule else scales
        # interleaved: the word order of the dot-product kernels (passes/select_dot_kernels.py)
        return interleave_int4(codes, *rule["interleave"]) if "interleave" in rule else codes

    def apply(rule: dict):
        op, inputs = rule["op"], rule["inputs"]
        if op == "concat":
            return np.concatenate([np.asarray(get(i)) for i in inputs], axis=rule["axis"])
        if op == "transpose":
            return np.asarray(get(inputs[0])).T
        if op in INT4_OPS:  # an int4 output another transform reads (none today): quantized again
            return int4_output(rule, *quantize_weight(get(inputs[0]), inputs[0]))
        raise ParamError(f"unknown parameter transform op '{op}' for '{rule['out']}'")

    done = set()
    for n in names:
        if n in done:
            continue
        rule = rules.get(n)
        if rule is not None and rule["op"] in INT4_OPS:
            w = rule["inputs"][0]
            packed = quantize_weight(get(w), w)
            for m in int4_outputs[w]:
                done.add(m)
                yield m, np.ascontiguousarray(int4_output(rules[m], *packed))
            del packed
        else:
            done.add(n)
            yield n, np.ascontiguousarray(np.asarray(get(n)))


def materialize(names: list[str], transforms: list[dict], source, progress: bool = False) -> dict[str, np.ndarray]:
    """{name: array} for exactly `names` (in that order), from `source` and `transforms` (small models, tests:
    a build streams iter_params into write_safetensors instead)."""
    out = dict(tqdm(iter_params(names, transforms, source), total=len(set(names)), desc="pack params",
                    unit="tensor", disable=not progress, leave=False))
    return {n: out[n] for n in names}


# ---------------------------------------------------------------------------- streamed safetensors
def safetensors_layout(specs: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """specs {name: (numpy dtype name, shape)} -> (the header safetensors' own writer gives these tensors,
    padding included; {name: data offset from the end of the header}).

    The tensor order and the header's format are safetensors' (dtype, then name): read off its writer
    run on one-element stand-ins of the same names and dtypes, and the stand-ins' header is rebuilt here
    and compared, so that a format this code does not reproduce fails instead of writing another file."""
    probe = safetensors_bytes({n: np.zeros((1,) * len(shape), dtype) for n, (dtype, shape) in specs.items()})
    (n,) = struct.unpack("<Q", probe[:8])
    probe_header = probe[8:8 + n]
    order = json.loads(probe_header)
    order.pop("__metadata__", None)

    def header(shapes: dict) -> tuple[bytes, dict[str, int]]:
        entries, offsets, at = {}, {}, 0
        for name, entry in order.items():
            size = int(np.prod(shapes[name], dtype=np.int64)) * np.dtype(specs[name][0]).itemsize
            entries[name] = {"dtype": entry["dtype"], "shape": list(shapes[name]), "data_offsets": [at, at + size]}
            offsets[name], at = at, at + size
        text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
        return text + b" " * (-len(text) % 8), offsets

    if header({k: (1,) * len(s) for k, (_, s) in specs.items()})[0] != probe_header:
        raise ParamError("the installed safetensors writes a header this streaming writer does not reproduce")
    return header({k: tuple(s) for k, (_, s) in specs.items()})


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_safetensors(path, specs: dict[str, tuple[str, tuple[int, ...]]],
                      tensors: Iterable[tuple[str, np.ndarray]], progress: bool = False) -> None:
    """Write `tensors` ((name, array) pairs, in any order) to `path` as safetensors, one at a time: the
    bytes are those of safetensors.numpy.save_file on the same tensors. `specs` {name: (dtype, shape)}
    declares every tensor beforehand (the header comes first); each must then arrive exactly once, as
    declared."""
    header, offsets = safetensors_layout(specs)
    start = 8 + len(header)
    pending = set(specs)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name, array in tqdm(tensors, total=len(specs), desc="write params", unit="tensor",
                                disable=not progress, leave=False):
            if name not in pending:
                raise ParamError(f"parameter '{name}': " + ("written twice" if name in specs else "not declared"))
            dtype, shape = specs[name]
            if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
                raise ParamError(f"parameter '{name}': produced {array.dtype} {list(array.shape)}, the compiled "
                                 f"program takes {np.dtype(dtype)} {list(shape)}")
            pending.discard(name)
            array = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)  # safetensors: LE
            if array.size:
                _pwrite_all(f.fileno(), memoryview(array.reshape(-1).view(np.uint8)), start + offsets[name])
            del array
        if pending:
            raise ParamError(f"parameters never produced: {sorted(pending)[:5]}")


class PackedParams:
    """An artifact's parameters, produced when consumed: the float source and, per entry point, the
    parameters it adds (name -> (dtype, shape), as the compiled program takes them) with the transforms
    that make them. write(path) streams them into a safetensors file one tensor at a time."""

    def __init__(self, source, progress: bool = False):
        self.source, self.progress = source, progress
        self.specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.parts: list[tuple[list[str], list[dict]]] = []

    def add(self, specs: dict[str, tuple[str, tuple[int, ...]]], transforms: list[dict]) -> None:
        """An entry point's parameters; those an earlier entry point added are shared (same type required)."""
        todo = []
        for name, (dtype, shape) in specs.items():
            spec = (str(dtype), tuple(int(d) for d in shape))
            if name in self.specs:
                if self.specs[name] != spec:
                    raise ParamError(f"parameter '{name}': {spec} here, {self.specs[name]} in another entry point")
                continue
            self.specs[name] = spec
            todo.append(name)
        self.parts.append((todo, transforms))

    def names(self) -> list[str]:
        return list(self.specs)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for names, transforms in self.parts:
            yield from iter_params(names, transforms, self.source)

    def write(self, path) -> None:
        write_safetensors(path, self.specs, iter(self), progress=self.progress)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every parameter in memory (small models, tests)."""
        out = dict(iter(self))
        return {n: out[n] for n in self.specs}


class ModelWeights:
    """TVM parameter name -> float32 numpy array of a model's parameter, looked up when asked for and not
    kept: from `weights` (our parameter names -> tensors read on access, e.g. a lazy checkpoint reader)
    when given, else the model's own parameters (no copy for float32 ones)."""

    def __init__(self, model, weights=None):
        self.model, self.weights = model, weights
        # tvm_param_name(ours) -> ours; a tied table reaches TVM once, under the LM head's name
        self.names = {tvm_param_name(n): n for n, _ in model.named_parameters(remove_duplicate=False)}

    def __contains__(self, name) -> bool:
        return name in self.names

    def __getitem__(self, name) -> np.ndarray:
        ours = self.names[name]
        t = self.weights[ours] if self.weights is not None else self.model.get_parameter(ours)
        t = t.detach().to(torch.float32).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
        return t


def model_weights(model, imported: list[str], weights=None) -> ModelWeights:
    """The float source of a checkpoint build's parameters (ModelWeights), checked to name every parameter
    the imported graph takes (`imported`: TVM names)."""
    source = ModelWeights(model, weights)
    unknown = [n for n in imported if n not in source]
    if unknown:
        raise ParamError(f"imported parameters {unknown[:5]} are not named after any model parameter "
                         f"(compiler.params.tvm_param_name)")
    return source


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
