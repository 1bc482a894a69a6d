"""Import a MobileMoE model into one TVM Relax IRModule with two entry functions.

    prefill(tokens [1, S] i64, positions [1, S] i64, k_0, v_0, ..., k_{L-1}, v_{L-1}, *params)
        -> (logits [1, V], k_0', v_0', ..., k_{L-1}', v_{L-1}')
    decode (token  [1, 1] i64, position  [1, 1] i64, k_0, v_0, ..., *params) -> (logits [1, V], k_0', ...)

    k_l [1, nkv, D, P], v_l [1, nkv, P, D] f32 (the "layers" cache layout of mobilemoe/export.py);
    k_l', v_l': with the S new tokens appended.

kv_cache="inplace" (the default) imports decode in the "inplace" layout instead: k_l [1, nkv, D, C],
v_l [1, nkv, C, D] at a fixed capacity C, the token written at slot `position` by an
R.call_tir_inplace of tir_kernels/kv_cache.py's kv_write (the outputs k_l', v_l' are the input
buffers), attention by its prefix_attention over slots 0..position (the custom ops of
mobilemoe/kv_cache.py, mapped here through the importer's custom_convert_map). kv_cache="grow": the
functional decode above (each step returns grown copies). inplace_prefill=True (compiler.build's with the
in-place cache: compiler/backends/tvm.py) imports prefill in the in-place layout too: the S tokens written at their
positions, each attending to slots 0..its position (prefix_attention with a symbolic token count), so
a prompt chunk neither copies the valid prefix nor returns a new cache.

Each MoE layer is one mobilemoe::moe op in the exported program (mobilemoe/moe_op.py) and one
`mobilemoe.moe` call here (passes/moe_op.py): the routing variant as attributes, the layer's router,
expert and shared-expert parameters as operands; passes/ act on that call.

Both functions take the same parameters, in the same order, under the same names (the attribute
"num_input" = num_inputs(config) = 2 + 2L separates user inputs from parameters). The torch.export graphs go through
PyTorch's default decompositions except einsum (attention's einsums import as one reduction each).
"""
from __future__ import annotations

import json
import re

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from tir_kernels.kv_cache import ATTEND, WRITE, kv_write, prefix_attention
from mobilemoe.export import export_entry
from mobilemoe.model import MobileMoE
from passes import moe_op
from passes.common import WEIGHT_PARTS

from .params import tvm_param_name

ENTRY_POINTS = ("prefill", "decode")
KV_CACHES = ("inplace", "grow")


def num_inputs(config) -> int:
    """User inputs of an entry point: tokens, positions and a K and a V cache per layer."""
    return 2 + 2 * config.num_layers


class ImportError_(RuntimeError):
    """The checkpoint could not be imported; the message names the op and the layer."""


def layer_of(node) -> str:
    """For error messages: the model layer an exported FX node comes from, its innermost nn_module_stack
    entry ("layers.0.moe"; "model" for the top module, "?" when the node has none)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else "?"
    return re.sub(r"^L\['self'\]\.?", "", str(path)) or "model"


def _decompose(ep):
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.einsum.default, None)  # keep einsum: attention's reductions over the cache
    return ep.run_decompositions(table)


def _kv_write(node, importer):
    """mobilemoe::kv_write -> R.call_tir_inplace(kv_write, (k, v, k_new, v_new, pos)): outputs alias k, v."""
    k, v, k_new, v_new, pos = importer.retrieve_args(node)
    _, nkv, d, _ = k.ty.shape.values
    name = WRITE if isinstance(k_new.ty.shape.values[3], tvm.tirx.IntImm) else f"{WRITE}_tokens"  # prefill's: its own
    gv = importer.block_builder.add_func(kv_write(int(nkv), int(d), str(k.ty.dtype)), name)
    return importer.block_builder.emit(relax.call_tir_inplace(gv, [k, v, k_new, v_new, pos], [0, 1], [k.ty, v.ty]))


def _prefix_attention(node, importer):
    """mobilemoe::prefix_attention -> R.call_tir(prefix_attention, (q, k, v, pos)): decode's kernel for one
    token, prefill's for a symbolic token count."""
    q, k, v, pos = importer.retrieve_args(node)
    _, nh, s, d = q.ty.shape.values
    static = isinstance(s, tvm.tirx.IntImm)
    if str(q.ty.dtype) != "float32" or (static and int(s) != 1):
        raise ImportError_(f"prefix_attention: float32 queries, one token or a symbolic count, expected; got q {q.ty}")
    nkv = int(k.ty.shape.values[1])
    kernel = prefix_attention(nkv, int(nh) // nkv, int(d), queries=1 if static else None)
    gv = importer.block_builder.add_func(kernel, ATTEND if static else f"{ATTEND}_tokens")
    return importer.block_builder.emit(relax.call_tir(gv, [q, k, v, pos], out_ty=q.ty))


def _moe(node, importer):
    """mobilemoe::moe -> one mobilemoe.moe call: the routing variant as MoEAttrs, the tensors as operands."""
    schema = [a.name for a in node.target._schema.arguments]
    args = dict(zip(schema, importer.retrieve_args(node)))  # torch.export passes a custom op's arguments by position
    try:
        attrs = moe_op.MoEAttrs(top_k=int(args["top_k"]), scoring=str(args["scoring"]),
                                norm_topk_prob=bool(args["norm_topk_prob"]), router_bias=args["router_bias"] is not None,
                                num_shared_experts=int(args["shared_w1"] is not None),
                                shared_expert_gate=args["shared_gate"] is not None)
    except ValueError as e:
        raise ImportError_(f"mobilemoe::moe (from layer '{_layer_of(node)}'): {e}") from None
    operands = {r: args[r] for r in attrs.roles()}
    return importer.block_builder.emit(moe_op.make(attrs, operands))


CUSTOM_OPS = {"kv_write.default": _kv_write, "prefix_attention.default": _prefix_attention, "moe.default": _moe}


def _check_supported(ep, entry: str) -> None:
    """Name the first op TVM's importer lacks, with the module (layer) it came from."""
    known = set(ExportedProgramImporter().create_convert_map()) | set(CUSTOM_OPS)
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name not in known and not name.startswith(("getitem", "_assert", "sym_")):
            raise ImportError_(f"{entry}: op '{name}' (from layer '{layer_of(node)}') is not supported by "
                               f"TVM's PyTorch importer; rewrite that layer with supported ops")


def _importer(with_weights: bool):
    class Importer(ExportedProgramImporter):
        """Without weights, parameters become 1-element placeholders: only their types matter."""
        params: set = set()

        def _convert_pytorch_tensor_to_tvm(self, tensor):
            if not with_weights and id(tensor) in self.params:
                tensor = torch.zeros(1, dtype=tensor.dtype)
            return super()._convert_pytorch_tensor_to_tvm(tensor)
    return Importer()


def import_model(model: MobileMoE, with_weights: bool = True, kv_cache: str = "inplace", inplace_prefill: bool = False):
    """-> (IRModule with `prefill` and `decode`, ordered param names, {name: np.ndarray}).

    with_weights=False imports the graph only (the values dict is empty): for shape-only builds with
    generated weights (compiler.build --random-weights), without copying gigabytes of parameters.
    """
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if inplace_prefill and kv_cache != "inplace":
        raise ValueError("inplace_prefill needs kv_cache='inplace'")
    model = model.eval()
    funcs, kernels, names, values = {}, {}, None, None
    parts = json.dumps({tvm_param_name(n): part for n, part in model.weight_parts().items()})
    for entry in ENTRY_POINTS:
        inplace = kv_cache == "inplace" and (entry == "decode" or inplace_prefill)
        layout = "inplace" if inplace else "layers"
        ep = _decompose(export_entry(model, entry, cache=layout))
        _check_supported(ep, entry)
        importer = _importer(with_weights)
        importer.params = {id(p) for p in ep.parameters()}
        try:
            mod = importer.from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True,
                                                 no_bind_return_tuple=False, custom_convert_map=CUSTOM_OPS)
        except Exception as e:  # the importer raises bare AssertionErrors: add context
            raise ImportError_(f"{entry}: TVM import failed: {e}") from e
        mod, params = relax.frontend.detach_params(mod)
        func = mod["main"]
        p_names = [v.name for v in func.params[num_inputs(model.config):]]
        if names is None:
            names = p_names
            values = {n: p.numpy() for n, p in zip(p_names, params["main"])} if with_weights else {}
        elif p_names != names:
            raise ImportError_(f"{entry}: parameter list differs from {ENTRY_POINTS[0]}'s")
        funcs[entry] = func.with_attr("global_symbol", entry).with_attr(WEIGHT_PARTS, parts)
        kernels.update({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"})  # kv cache kernels
    out = tvm.IRModule({**{tvm.ir.GlobalVar(k): v for k, v in funcs.items()}, **kernels})
    return out, names, values


def example_feed(model: MobileMoE, entry: str, tokens: list[int], past: int, kv: np.ndarray | None = None):
    """Numpy inputs for an entry point (tests, benchmarks): tokens, positions, then the K (transposed)
    and V caches of each layer, from kv [L, 2, 1, nkv, P, D] (zeros when None)."""
    c = model.config
    seq = len(tokens)
    if kv is None:
        kv = np.zeros((c.num_layers, 2, 1, c.num_kv_heads, past, c.head_dim), dtype="float32")
    return (np.asarray([tokens], dtype="int64"), np.arange(past, past + seq, dtype="int64")[None],
            *[np.ascontiguousarray(kv[i, j].swapaxes(-1, -2) if j == 0 else kv[i, j])
              for i in range(c.num_layers) for j in range(2)])
