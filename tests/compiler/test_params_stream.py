"""compiler.params streams an artifact's weights: produced, packed and written one tensor at a time
(the file byte-identical to safetensors' own writer), in memory bounded by the largest tensor, not
by the model; and checkpoint builds read the checkpoint lazily (mobilemoe.checkpoint.LazyCheckpoint)."""
import random
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import compiler.params as params_mod
from compiler.params import (PackedParams, ParamError, RandomWeights, iter_params, materialize, model_weights,
                             quantize_weight, tvm_param_name, write_safetensors)
from mobilemoe.checkpoint import LazyCheckpoint, load_checkpoint, shape_only_model
from mobilemoe.quant import interleave_int4, pack_int4, quantize_int4


def test_streamed_file_is_byte_identical_to_save_file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"b.w": rng.standard_normal((3, 4)).astype("float32"), "a": np.arange(5, dtype="uint32"),
               "z_s": rng.standard_normal((2, 2)).astype("float16"), "empty": np.zeros((0, 3), "float32"),
               "i64": np.arange(2, dtype="int64"), "scalar": np.array(3.0, "float32"), "B": np.ones(7, "int8")}
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    specs = {k: (v.dtype.name, v.shape) for k, v in tensors.items()}
    items = list(tensors.items())
    random.Random(1).shuffle(items)  # any production order gives the same file
    write_safetensors(tmp_path / "new.safetensors", specs, items)
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("case", ["missing", "twice", "undeclared", "dtype", "shape"])
def test_writer_rejects_what_was_not_declared(case, tmp_path):
    a, b = np.zeros((2, 8), "float32"), np.ones(4, "uint32")
    specs = {"a": ("float32", (2, 8)), "b": ("uint32", (4,))}
    items = {"missing": [("a", a)], "twice": [("a", a), ("a", a), ("b", b)], "undeclared": [("a", a), ("c", b)],
             "dtype": [("a", a.astype("float16")), ("b", b)], "shape": [("a", a.T), ("b", b)]}[case]
    with pytest.raises(ParamError):
        write_safetensors(tmp_path / "p.safetensors", specs, items)


def test_blockwise_quantization_is_whole_tensor_quantization(monkeypatch):
    w = torch.randn(4, 96, 64) * 0.05
    codes, scales = quantize_int4(w)
    monkeypatch.setattr(params_mod, "QUANT_BLOCK", 64 * 5)  # 5 rows a block: blocks straddle the experts
    packed, s = quantize_weight(w.numpy())
    assert np.array_equal(packed, pack_int4(codes).numpy()) and np.array_equal(s, scales.numpy())


def model_like(layers: int = 24, experts: int = 8, hidden: int = 256, inner: int = 64, vocab: int = 1024):
    """Parameter specs and transforms shaped like a build's (passes/common.py): per layer a norm, q/o
    projections, a router (transposed), w1 + w3 concatenated then INT4 (interleaved codes) and w2 in
    INT4; an INT4 embedding table. Source names -> shapes for RandomWeights."""
    shapes, transforms, specs = {}, [], {}

    def int4(src, out, shape, interleave=None, scales_interleave=None):
        *lead, n, k = shape
        transforms.append({"out": f"{out}__q4", "op": "int4_codes", "inputs": [src],
                           **({"interleave": interleave} if interleave else {})})
        transforms.append({"out": f"{out}__s", "op": "int4_scales", "inputs": [src],
                           **({"interleave": scales_interleave} if scales_interleave else {})})
        specs[f"{out}__q4"] = ("uint32", (*lead, n, k // 8))
        specs[f"{out}__s"] = ("float16", (*lead, n, k // 32))

    shapes["emb"] = (vocab, hidden)
    int4("emb", "emb", (vocab, hidden))
    for i in range(layers):
        p = f"l{i}_"
        shapes[p + "norm"] = (hidden,)
        specs[p + "norm"] = ("float32", (hidden,))
        for w in ("wq", "wo"):
            shapes[p + w] = (hidden, hidden)
            int4(p + w, p + w, (hidden, hidden), [4, 2])
        shapes[p + "router"] = (experts, hidden)
        transforms.append({"out": p + "router__t", "op": "transpose", "inputs": [p + "router"]})
        specs[p + "router__t"] = ("float32", (hidden, experts))
        shapes[p + "w1"] = shapes[p + "w3"] = (experts, inner, hidden)
        shapes[p + "w2"] = (experts, hidden, inner)
        transforms.append({"out": p + "w13", "op": "concat", "inputs": [p + "w1", p + "w3"], "axis": 1})
        int4(p + "w13", p + "w13", (experts, 2 * inner, hidden), [4, 2])
        int4(p + "w2", p + "w2", (experts, hidden, inner), [8, 1], [8, 1])  # row lanes (AVX2)
    return shapes, transforms, specs


def test_params_are_written_one_tensor_at_a_time(tmp_path):
    """The params phase's traced allocations stay within a few of the largest tensor, while the model
    (float, or even packed) is many times that: holding every packed tensor until the end, as one
    save_file call must, breaks the bound."""
    shapes, transforms, specs = model_like()
    packed = PackedParams(RandomWeights(shapes))
    names = list(specs)
    packed.add({n: specs[n] for n in names[: len(names) // 2]}, transforms)  # two entry points sharing some
    packed.add(specs, transforms)
    w13 = 2 * 4 * int(np.prod(shapes["l0_w1"]))  # the largest float tensor: a concatenation
    largest = max(w13, *(4 * int(np.prod(s)) for s in shapes.values()))
    packed_bytes = sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s in specs.values())
    float_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    bound = 3 * largest  # a concat's inputs and output, then its packed codes (an eighth) + interleaved copy
    assert packed_bytes > 2 * bound and float_bytes > 10 * bound  # the bound tells streaming from holding

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        packed.write(tmp_path / "streamed.safetensors")
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    print(f"params phase: traced peak {peak / 2**20:.1f} MiB; largest tensor {largest / 2**20:.1f} MiB, "
          f"packed model {packed_bytes / 2**20:.1f} MiB, float model {float_bytes / 2**20:.1f} MiB")
    assert peak < bound, f"traced peak {peak} B while writing params: over {bound} B (3x the largest tensor)"

    # the same bytes as materialising everything and writing it with safetensors
    arrays = packed.arrays()
    assert list(arrays) == names
    save_file(arrays, str(tmp_path / "whole.safetensors"))
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    # and the values are mobilemoe.quant's, on whole tensors
    src = RandomWeights(shapes)
    w13 = np.concatenate([src["l3_w1"], src["l3_w3"]], axis=1)
    codes, scales = quantize_int4(torch.from_numpy(w13))
    assert np.array_equal(arrays["l3_w13__q4"], interleave_int4(pack_int4(codes).numpy(), 4, 2))
    assert np.array_equal(arrays["l3_w13__s"], scales.numpy())
    codes, scales = quantize_int4(torch.from_numpy(np.asarray(src["l3_w2"])))
    assert np.array_equal(arrays["l3_w2__q4"], interleave_int4(pack_int4(codes).numpy(), 8, 1))
    assert np.array_equal(arrays["l3_w2__s"], interleave_int4(scales.numpy(), 8, 1))
    assert np.array_equal(arrays["l5_router__t"], src["l5_router"].T)


def test_each_weight_is_drawn_and_quantized_once():
    shapes, transforms, specs = model_like(layers=2)
    reads = []

    class Counting(RandomWeights):
        def __getitem__(self, name):
            reads.append(name)
            return super().__getitem__(name)

    names = list(specs)
    random.Random(0).shuffle(names)  # scales before codes, too
    out = materialize(names, transforms, Counting(shapes))
    assert list(out) == names
    assert sorted(reads) == sorted(shapes)  # every source tensor read exactly once


def test_lazy_checkpoint_reads_what_load_checkpoint_holds(ckpt):
    lazy = LazyCheckpoint(ckpt)
    model = load_checkpoint(ckpt)
    shape_only = shape_only_model(lazy.config)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert set(lazy) == set(params)
    for name, p in params.items():
        got = lazy[name]
        assert got.dtype == torch.float32 and torch.equal(got, p.detach()), name
    # the build's source: TVM names -> our parameters of the shape-only model, values from the checkpoint
    source = model_weights(shape_only, [tvm_param_name(n) for n in params], lazy)
    name = "layers.1.moe.w2"
    assert np.array_equal(source[tvm_param_name(name)], params[name].detach().numpy())
    with pytest.raises(ParamError):
        model_weights(shape_only, ["p_model_no_such_weight"], lazy)


def test_tvm_build_never_loads_the_checkpoint(ckpt, tmp_path, monkeypatch):
    """compiler.build hands a TVM backend a shape-only model and the lazy reader: load_checkpoint (the
    whole model in float) is not called."""
    import compiler.build as build_mod

    def no_load(*a, **k):
        raise AssertionError("load_checkpoint called by a TVM build")

    seen = {}
    monkeypatch.setattr(build_mod, "load_checkpoint", no_load)
    monkeypatch.setattr(build_mod.tvm_backend, "build_artifact",
                        lambda model, spec, out, options: seen.update(model=model, options=options) or out)
    build_mod.build(ckpt, "host", tmp_path / "art", verbose=False)
    assert isinstance(seen["options"].weights, LazyCheckpoint) and not seen["options"].random_weights
    assert seen["model"].config == seen["options"].weights.config
