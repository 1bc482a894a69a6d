"""The model's exported program (torch.export, the one the TVM importer imports) as one ONNX graph.

    proto = translate(export_entry(model, "prefill", cache="layers"), weight_source, buffers)

Nothing here knows the decoder: every node of the ExportedProgram's graph is translated in order,
so any architecture option (q/k norm, biases, multipliers, RoPE scaling, the MoE routing variant)
reaches the ONNX graph through the program alone. Three node kinds read parameters, and these carry
the INT4 weights (onnx_graph.py: the TVM artifact's very codes, regrouped as ORT bytes):
    aten.linear(x, W, b)      W INT4-able (K % 32 == 0): MatMulNBits, and the linears of one input
                              (q|k|v, gate|up) as one MatMulNBits + Split; else a float MatMul
    aten.embedding(W, ids)    GatherBlockQuantized on W's INT4 bytes (a tied table: the LM head's)
    mobilemoe::moe            QMoE + the op's routing (onnx_graph.moe_to_qmoe)
Every other parameter or buffer (norm weights, RoPE tables) is a float32 initializer. SymInts (the
dynamic sequence and cache lengths) are int64 [1] tensors computed from Shape.

Graph interface (the program's, renamed; batch 1):
    inputs   input_ids [1, S] int64, positions [1, S] int64 (P .. P+S-1),
             past_key_values.{i}.key [1, nkv, D, P], past_key_values.{i}.value [1, nkv, P, D]
    outputs  logits [1, V] of the last position, present.{i}.key / .value with P + S positions
(the cache layout "layers" of mobilemoe/export.py: keys transposed).
"""
from __future__ import annotations

import operator
import re

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from mobilemoe import moe_op

from . import onnx_patterns
from .onnx_graph import MS, Graph, Int4Weights, Weights, int4_able, moe_to_qmoe

INT64_MAX = 2**63 - 1
DTYPES = {torch.float32: TensorProto.FLOAT, torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL,
          torch.int32: TensorProto.INT32, torch.float16: TensorProto.FLOAT16}
NP_DTYPES = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_, torch.int32: np.int32}
SKIP = {torch.ops.aten._assert_tensor_metadata.default}
ELEMENTWISE = {  # aten -> ONNX, two operands (tensor or Python scalar)
    torch.ops.aten.add.Tensor: "Add", torch.ops.aten.sub.Tensor: "Sub", torch.ops.aten.mul.Tensor: "Mul",
    torch.ops.aten.div.Tensor: "Div", torch.ops.aten.le.Tensor: "LessOrEqual", torch.ops.aten.lt.Tensor: "Less",
    torch.ops.aten.ge.Tensor: "GreaterOrEqual", torch.ops.aten.gt.Tensor: "Greater",
    torch.ops.aten.pow.Tensor_Scalar: "Pow", torch.ops.aten.maximum.default: "Max",
    torch.ops.aten.minimum.default: "Min",
}
UNARY = {torch.ops.aten.neg.default: "Neg", torch.ops.aten.sigmoid.default: "Sigmoid",
         torch.ops.aten.exp.default: "Exp", torch.ops.aten.sqrt.default: "Sqrt", torch.ops.aten.tanh.default: "Tanh"}
SYM_ARITH = {operator.add: "Add", operator.sub: "Sub", operator.mul: "Mul", operator.floordiv: "Div"}


class UnsupportedOp(NotImplementedError):
    """An op of the exported program with no ONNX translation here (the message names it)."""


class Sym(str):
    """An ONNX value holding a SymInt as an int64 tensor of shape [1]."""


def _dim_name(d, names: dict) -> str | int:
    if isinstance(d, int):
        return d
    return re.sub(r"\b\w+\b", lambda m: names.get(m.group(0), m.group(0)), str(d))


class ProgramTranslator:
    def __init__(self, ep: torch.export.ExportedProgram, weights: Weights, buffers: dict, accuracy_level: int):
        self.ep, self.g = ep, Graph()
        self.w = Int4Weights(self.g, weights, accuracy_level)
        sig = ep.graph_signature
        self.params = {k: v.removeprefix("model.") for k, v in sig.inputs_to_parameters.items()}
        self.buffer_names = {k: v.removeprefix("model.") for k, v in sig.inputs_to_buffers.items()}
        self.buffers = {k: buffers[v] for k, v in self.buffer_names.items()}
        self.env: dict[str, object] = {}
        self.matches: dict[torch.fx.Node, tuple[str, dict]] = {}
        self.fused: dict[str, str] = {}  # linear node -> its piece of a fused MatMulNBits
        self.moe_calls = {id(n): i for i, n in enumerate(
            n for n in ep.graph.nodes if n.op == "call_function" and n.target == torch.ops.mobilemoe.moe.default)}

    # ------------------------------------------------------------------ values
    def v(self, a):
        """An FX argument as an ONNX value name (tensors, SymInts), a float initializer (parameters,
        buffers) or the Python value itself (ints, floats, lists of those)."""
        if isinstance(a, torch.fx.Node):
            if a.name in self.params:
                return self.w.float(self.params[a.name])
            if a.name in self.buffers and a.name not in self.env:
                self.env[a.name] = self.g.init(self.buffer_names[a.name], self.buffers[a.name].float().numpy())
            return self.env[a.name]
        if isinstance(a, (list, tuple)):
            return [self.v(x) for x in a]
        return a

    def ints(self, values, prefix: str) -> str:
        """A list of ints and SymInt values as one int64 [n] tensor (a constant when all are ints)."""
        vals = self.v(values)
        if all(isinstance(x, int) for x in vals):
            return self.g.const(vals)
        parts = [x if isinstance(x, Sym) else self.g.const([x]) for x in vals]
        return Sym(self.g.op("Concat", parts, prefix, axis=0))

    def scalar_like(self, x, node: torch.fx.Node) -> str:
        """A Python scalar operand as a constant of the node's computation dtype."""
        dtype = node.meta["val"].dtype
        if dtype == torch.bool:  # comparisons: the other operand's dtype
            other = next(a for a in node.args if isinstance(a, torch.fx.Node))
            dtype = other.meta["val"].dtype
        return self.g.const(x, NP_DTYPES[dtype])

    @staticmethod
    def rank(a: torch.fx.Node) -> int:
        return a.meta["val"].dim()

    # ------------------------------------------------------------------ nodes
    def call(self, node: torch.fx.Node):
        t, args, p = node.target, node.args, node.name
        g = self.g
        if t in SKIP:
            return None
        if node in self.matches:
            return self.fused_op(node, *self.matches[node])
        if t == torch.ops.mobilemoe.moe.default:
            return self.moe(node)
        if t == torch.ops.aten.linear.default:
            return self.linear(node)
        if t == torch.ops.aten.embedding.default:
            w, ids = args[0], args[1]
            if w.name in self.params and int4_able(w.meta["val"].shape):
                return self.w.gather(self.params[w.name], self.v(ids), p)
            return g.op("Gather", [self.v(w), self.v(ids)], p, axis=0)
        if t in ELEMENTWISE:
            a, b = args[0], args[1]
            if node.kwargs.get("alpha", 1) != 1:
                raise UnsupportedOp(f"{node.format_node()}: alpha != 1")
            ins = [self.v(x) if isinstance(x, torch.fx.Node) else self.scalar_like(x, node) for x in (a, b)]
            return g.op(ELEMENTWISE[t], ins, p)
        if t in UNARY:
            return g.op(UNARY[t], [self.v(args[0])], p)
        if t == torch.ops.aten.rsqrt.default:
            return g.op("Reciprocal", [g.op("Sqrt", [self.v(args[0])], p)], p)
        if t == torch.ops.aten.silu.default:
            x = self.v(args[0])
            return g.op("Mul", [x, g.op("Sigmoid", [x], p)], p)
        if t == torch.ops.aten.softmax.int:
            return g.op("Softmax", [self.v(args[0])], p, axis=args[1])
        if t == torch.ops.aten.mean.dim:
            keep = int(args[2] if len(args) > 2 else node.kwargs.get("keepdim", False))
            return g.op("ReduceMean", [self.v(args[0]), g.const(list(args[1]))], p, keepdims=keep)
        if t == torch.ops.aten.to.dtype:
            src, dst = args[0].meta["val"].dtype, args[1]
            return self.v(args[0]) if src == dst else g.op("Cast", [self.v(args[0])], p, to=DTYPES[dst])
        if t in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
            static = self.static_shape(args[1])
            return g.op("Reshape", [self.v(args[0]), self.ints(args[1], p) if static is None else g.const(static)], p)
        if t == torch.ops.aten.transpose.int:
            r = self.rank(args[0])
            perm = list(range(r))
            a, b = args[1] % r, args[2] % r
            perm[a], perm[b] = perm[b], perm[a]
            return g.op("Transpose", [self.v(args[0])], p, perm=perm)
        if t == torch.ops.aten.permute.default:
            return g.op("Transpose", [self.v(args[0])], p, perm=list(args[1]))
        if t == torch.ops.aten.unsqueeze.default:
            return g.op("Unsqueeze", [self.v(args[0]), g.const([args[1] % (self.rank(args[0]) + 1)])], p)
        if t == torch.ops.aten.slice.Tensor:
            dim, start, end, step = (*args[1:], *(0, None, None, 1)[len(args) - 1:])
            start, end = (0 if start is None else start), (INT64_MAX if end is None else end)
            return g.op("Slice", [self.v(args[0]), self.ints([start], p), self.ints([end], p), g.const([dim]),
                                  g.const([step])], p)
        if t == torch.ops.aten.select.int:
            return g.op("Gather", [self.v(args[0]), g.const(args[2])], p, axis=args[1])
        if t == torch.ops.aten.index_select.default:
            return g.op("Gather", [self.v(args[0]), self.v(args[2])], p, axis=args[1])
        if t == torch.ops.aten.cat.default:
            dim = args[1] if len(args) > 1 else 0
            return g.op("Concat", self.v(args[0]), p, axis=dim % self.rank(args[0][0]))
        if t == torch.ops.aten.flip.default:
            dims = list(args[1])
            n = len(dims)
            return g.op("Slice", [self.v(args[0]), g.const([-1] * n), g.const([-INT64_MAX - 1] * n), g.const(dims),
                                  g.const([-1] * n)], p)
        if t == torch.ops.aten.einsum.default:
            ops = args[1]
            axes = onnx_patterns.as_matmul(args[0], *ops) if len(ops) == 2 else None
            if axes is None:
                return g.op("Einsum", self.v(ops), p, equation=args[0])
            b = self.v(ops[1])
            if axes:
                b = g.op("Unsqueeze", [b, g.const(axes)], p)
            return g.op("MatMul", [self.v(ops[0]), b], p)
        if t == torch.ops.aten.arange.default:
            end = self.ints([args[0]], p)
            r = g.op("Range", [g.const(0), g.op("Squeeze", [end], p), g.const(1)], p)
            dtype = node.meta["val"].dtype
            return r if dtype == torch.int64 else g.op("Cast", [r], p, to=DTYPES[dtype])
        if t == torch.ops.aten.sym_size.int:
            return Sym(g.op("Shape", [self.v(args[0])], p, start=args[1], end=args[1] + 1))
        if t in SYM_ARITH:
            a, b = (self.v(x) for x in args)
            if not isinstance(a, Sym) and not isinstance(b, Sym):
                return t(a, b)
            ins = [x if isinstance(x, Sym) else g.const([x]) for x in (a, b)]
            return Sym(g.op(SYM_ARITH[t], ins, p))
        raise UnsupportedOp(f"the ONNX fallback has no translation for {t} ({node.format_node()}); "
                            f"build a TVM target instead")

    # ------------------------------------------------------------------ patterns (onnx_patterns.py)
    def find_patterns(self, nodes) -> None:
        """Each node that roots a pattern -> (kind, what its op needs); checks what FX cannot see."""
        for n in nodes:
            if (m := onnx_patterns.rms_norm(n, lambda a: isinstance(a, torch.fx.Node) and a.name in self.params)) is not None:
                x = onnx_patterns.through_casts(m["x"])
                if onnx_patterns.residual_add(x) and x not in self.matches:  # x = a + b: one SkipSimplified..
                    self.matches[x] = ("skip_rms_norm", {"a": x.args[0], "b": x.args[1], **m, "x": None, "root": n})
                    self.matches[n] = ("after", {"x": x})
                else:
                    self.matches[n] = ("rms_norm", m)
            elif (m := onnx_patterns.rotary(n, lambda a: isinstance(a, torch.fx.Node) and a.name in self.buffers)) is not None:
                d = m["x"].meta["val"].shape[-1]
                cos, sin = (self.buffers[m[k].name].float() for k in ("cos", "sin"))
                if torch.equal(cos[:, : d // 2], cos[:, d // 2:]) and torch.equal(sin[:, : d // 2], sin[:, d // 2:]):
                    self.matches[n] = ("rotary", m)  # rotate-half tables: ORT reads the first half

    def inputs_of(self, n: torch.fx.Node) -> list:
        """The nodes n's ONNX translation reads: a pattern's inputs, else n's own."""
        if n in self.matches:
            return [v for k, v in self.matches[n][1].items() if isinstance(v, torch.fx.Node) and k != "root"]
        if n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default) and \
                self.static_shape(n.args[1]) is not None:
            return [n.args[0]]
        return n.all_input_nodes

    @staticmethod
    def static_shape(shape) -> list[int] | None:
        """A reshape's target with at most one SymInt as a constant, the SymInt as -1 (the one dim
        Reshape infers: the element count fixes it), or None."""
        syms = [d for d in shape if not isinstance(d, int)]
        if len(syms) > 1 or -1 in shape and syms:
            return None
        return [d if isinstance(d, int) else -1 for d in shape]

    def fused_op(self, node: torch.fx.Node, kind: str, m: dict) -> str:
        g, p = self.g, node.name
        if kind == "rms_norm":
            return g.op("SimplifiedLayerNormalization", [self.v(m["x"]), self.v(m["weight"])], p, axis=-1,
                        epsilon=m["eps"], stash_type=1)
        if kind == "skip_rms_norm":  # the add's value (the sum) now; the norm's when its root comes
            normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [self.v(m["a"]), self.v(m["b"]),
                                                                           self.v(m["weight"])], p,
                                       outputs=[f"{p}/normed", "", "", f"{p}/sum"], domain=MS, epsilon=m["eps"])
            self.env[f"{m['root'].name}.normed"] = normed
            return total
        if kind == "after":
            return self.env[f"{node.name}.normed"]
        d = m["x"].meta["val"].shape[-1]
        half = {}
        for k in ("cos", "sin"):
            key = f"{self.buffer_names[m[k].name]}.half"
            if key not in self.env:
                self.env[key] = g.init(key, self.buffers[m[k].name].float()[:, : d // 2].numpy())
            half[k] = self.env[key]
        return g.op("RotaryEmbedding", [self.v(m["x"]), self.v(m["positions"]), half["cos"], half["sin"]], p,
                    domain=MS, interleaved=0)

    def rename(self, old: str, new: str) -> None:
        """Value `old` is called `new` everywhere in the graph (its producer's output and every reader)."""
        for n in self.g.nodes:
            for io in (n.input, n.output):
                for i, x in enumerate(io):
                    if x == old:
                        io[i] = new

    def linear(self, node: torch.fx.Node) -> str:
        """aten.linear; INT4 weights of one input go through one MatMulNBits (then Split per linear)."""
        if node.name in self.fused:
            return self.fused[node.name]
        x, w, b = (list(node.args) + [None])[:3]
        if w.name not in self.params:  # a computed weight: plain float MatMul
            y = self.g.op("MatMul", [self.v(x), self.g.op("Transpose", [self.v(w)], node.name, perm=[1, 0])], node.name)
            return y if b is None else self.g.op("Add", [y, self.v(b)], node.name)
        if not int4_able(w.meta["val"].shape):
            y = self.g.op("MatMul", [self.v(x), self.w.float(self.params[w.name], transpose=True)], node.name)
            return y if b is None else self.g.op("Add", [y, self.v(b)], node.name)
        group = [u for u in x.users if u.target == torch.ops.aten.linear.default and len(u.args) > 1
                 and u.args[0] is x and u.args[1].name in self.params and int4_able(u.args[1].meta["val"].shape)
                 and (len(u.args) > 2 and u.args[2] is not None) == (b is not None)
                 and (b is None or u.args[2].name in self.params)]
        group.sort(key=lambda u: list(x.users).index(u))
        names = [self.params[u.args[1].name] for u in group]
        bias = None
        if b is not None:
            biases = [self.w.w(self.params[u.args[2].name]).float() for u in group]
            bias = self.g.init("+".join(self.params[u.args[2].name] for u in group), torch.cat(biases).numpy())
        y = self.w.matmul(self.v(x), names, node.name, bias)
        if len(group) == 1:
            return y
        widths = self.g.const([u.args[1].meta["val"].shape[0] for u in group])
        pieces = self.g.op("Split", [y, widths], node.name, outputs=len(group), axis=-1)
        self.fused.update({u.name: piece for u, piece in zip(group, pieces)})
        return self.fused[node.name]

    def moe(self, node: torch.fx.Node) -> str:
        attrs, ops = moe_op.call_operands(node, self.params)
        x = node.args[0]  # the op's first operand: the hidden states [N, H]
        return moe_to_qmoe(self.w, self.v(x), attrs, ops, f"moe_{self.moe_calls[id(node)]}")

    # ------------------------------------------------------------------ whole program
    def translate(self, input_names: list[str], output_names: list[str], doc: str) -> onnx.ModelProto:
        g, user_inputs = self.g, self.ep.graph_signature.user_inputs
        nodes = list(self.ep.graph.nodes)
        placeholders = {n.name: n for n in nodes if n.op == "placeholder"}
        dims = {}
        for name, fx_name in zip(input_names, user_inputs):
            for d in placeholders[fx_name].meta["val"].shape:
                if not isinstance(d, int):
                    dims.setdefault(str(d), {"input_ids": "sequence_length"}.get(name, "past_sequence_length"))
        for name, fx_name in zip(input_names, user_inputs):
            val = placeholders[fx_name].meta["val"]
            g.inputs.append(helper.make_tensor_value_info(name, DTYPES[val.dtype],
                                                          [_dim_name(d, dims) for d in val.shape]))
            self.env[fx_name] = name
        self.find_patterns(nodes)
        outs = nodes[-1].args[0]  # the output node's values
        live, todo = set(), list(outs)
        while todo:  # what the outputs need, through the patterns' inputs (their insides are not translated)
            n = todo.pop()
            if isinstance(n, torch.fx.Node) and n not in live:
                live.add(n)
                todo.extend(self.inputs_of(n))
        for node in nodes:
            if node.op == "call_function" and node in live:
                self.env[node.name] = self.call(node)
        if len(outs) != len(output_names):
            raise ValueError(f"the program has {len(outs)} outputs, the ONNX interface names {len(output_names)}")
        produced = {o for n in g.nodes for o in n.output}
        taken = set()
        for name, out in zip(output_names, outs):
            value = self.v(out)
            if value in produced and value not in taken:  # the producing node writes the output itself:
                self.rename(value, name)                  # an Identity would copy it (the KV cache)
                taken.add(value)
            else:
                g.op("Identity", [value], "output", outputs=[name])
            val = out.meta["val"]
            g.outputs.append(helper.make_tensor_value_info(name, DTYPES[val.dtype],
                                                           [_dim_name(d, dims) for d in val.shape]))
        return g.model(doc)


def translate(ep: torch.export.ExportedProgram, weights: Weights, buffers: dict, accuracy_level: int,
              input_names: list[str], output_names: list[str], doc: str) -> onnx.ModelProto:
    """The ONNX graph of `ep` (weights: our parameter name -> float tensor; buffers: our buffer name -> tensor)."""
    return ProgramTranslator(ep, weights, buffers, accuracy_level).translate(input_names, output_names, doc)
