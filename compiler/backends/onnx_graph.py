"""The MobileMoE decoder as one ONNX graph of ONNX Runtime's CPU contrib ops, built node by node.

Graph interface (batch 1; the KV cache is explicit, one pair of tensors per layer):
    inputs   input_ids              [1, S] int64
             seqlens_k              [1] int32     P + S - 1 (GroupQueryAttention's convention)
             total_sequence_length  [] int32      P + S
             past_key_values.{i}.key / .value     [1, nkv, P, D] float32 (keys after RoPE)
    outputs  logits                 [1, V] float32 of the last position
             present.{i}.key / .value             [1, nkv, P + S, D]
Positions are implicit: GroupQueryAttention rotates the S new tokens as positions P .. P+S-1, which
is what generation feeds (the TVM artifact's explicit `positions` input is always that range too).

Per layer, hidden states x are [S, H] float32:
    h      = x normed (SkipSimplifiedLayerNormalization fuses the residual add with the next norm)
    qkv    = MatMulNBits(h, wq|wk|wv)                            [S, (nh + 2 nkv) D]
    a, kv' = GroupQueryAttention(qkv, past kv, do_rotary=1)      cos/sin [max_seq_len, D/2]
    x, h   = x + MatMulNBits(a, wo), then normed
    MoE:     each layer's mobilemoe::moe op of the exported program (mobilemoe/moe_op.py
             exported_calls: its attributes and parameter operands) as
             logits = MatMul(h, router^T) (+ router bias) in float32                         [S, E]
             w, ids = the op's routing: TopK(logits) then Softmax ("topk_softmax"), or
                      TopK(Softmax(logits)), renormalised when norm_topk_prob ("softmax_topk")
             router_weights = ScatterElements(0, ids, w)                                        [S, E]
             y = QMoE(h, logits, fc1 = w1/w3 rows interleaved, fc2 = w2, router_weights)
                 + shared(h) (times Sigmoid(MatMulNBits(h, shared_gate)) when gated)
    dense:   y = MatMulNBits(silu(g) * u) with g|u = MatMulNBits(h, w1|w3)
QMoE picks the top-k of softmax(logits), the same experts as top-k on the logits (softmax keeps the
order), and mixes them with router_weights as given, so every routing variant of the op is exact.
Embedding: GatherBlockQuantized on the INT4 table; with tied embeddings it reads the very bytes of
the LM head's MatMulNBits weight. Router and norm weights stay float32.

Every INT4 weight is quantize_int4 -> pack_int4 (the TVM artifact's words) -> int4_bytes (ORT's
byte layout g32_u8k2_zp8, mobilemoe/quant.py); scales are the same fp16 values widened to float32,
the type ORT wants next to float32 activations.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mobilemoe.config import MobileMoEConfig
from mobilemoe.model import rope_table
from mobilemoe.quant import BITS, GROUP_SIZE, int4_bytes, pack_int4, quantize_int4

MS = "com.microsoft"
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
# ORT ops outside the ONNX standard: a runtime needs a CPU kernel for each (domain, op)
CONTRIB_OPS = [(MS, "MatMulNBits"), (MS, "QMoE"), (MS, "GroupQueryAttention"), (MS, "GatherBlockQuantized"),
               (MS, "SkipSimplifiedLayerNormalization"), ("", "SimplifiedLayerNormalization")]
BLOB = GROUP_SIZE * BITS // 8  # bytes per block in MatMulNBits' B [N, K / 32, 16]

Weights = Callable[[str], torch.Tensor]  # our state_dict name -> float tensor


def int4_ort(w: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray]:
    """W [..., N, K] -> (uint8 [..., N, K // 2], float32 scales [..., N, K // 32]) from the same codes."""
    codes, scales = quantize_int4(w.float(), name)
    return int4_bytes(pack_int4(codes)).numpy(), scales.float().numpy()


def interleave_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[..., N, X] twice -> [..., 2N, X] with rows a0, b0, a1, b1, ... (QMoE's swiglu_fusion=1 fc1)."""
    return np.stack([a, b], axis=-2).reshape(*a.shape[:-2], 2 * a.shape[-2], a.shape[-1])


class Graph:
    """A list of nodes and initializers with generated value names (`prefix/op_n`)."""

    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self._count = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        return self.init(name, np.asarray(values, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], prefix: str, outputs: int | list[str] = 1,
           domain: str = "", **attrs):
        self._count += 1
        name = f"{prefix}/{op_type}_{self._count}"
        outs = outputs if isinstance(outputs, list) else [f"{name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def model(self, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "mobilemoe", self.inputs, self.outputs, self.inits)
        return helper.make_model(graph, opset_imports=OPSETS, producer_name="mobilemoe", doc_string=doc)


class DecoderBuilder:
    def __init__(self, cfg: MobileMoEConfig, weights: Weights, accuracy_level: int, moe_ops: list[tuple[dict, dict]]):
        self.cfg, self.w, self.acc, self.moe_ops = cfg, weights, accuracy_level, moe_ops
        self.g = Graph()

    # ------------------------------------------------------------------ pieces
    def int4_weight(self, names: list[str], init_name: str | None = None) -> tuple[str, str, int, int]:
        """cat(weights [N_i, K]) as MatMulNBits' B [N, K / 32, 16] and scales [N, K / 32] initializers."""
        w = torch.cat([self.w(n) for n in names]) if len(names) > 1 else self.w(names[0])
        n, k = w.shape
        base = init_name or names[0]
        q, s = int4_ort(w, base)
        return (self.g.init(f"{base}.q4", q.reshape(n, k // GROUP_SIZE, BLOB)),
                self.g.init(f"{base}.scales", s), n, k)

    def matmul_int4(self, x: str, names: list[str], prefix: str, init_name: str | None = None,
                    outputs: int | list[str] = 1) -> str:
        """x [S, K] @ cat(weights [N_i, K])^T -> [S, sum N_i] through one MatMulNBits."""
        b, scales, n, k = self.int4_weight(names, init_name)
        return self.matmul_nbits(x, b, scales, n, k, prefix, outputs)

    def matmul_nbits(self, x: str, b: str, scales: str, n: int, k: int, prefix: str,
                     outputs: int | list[str] = 1) -> str:
        return self.g.op("MatMulNBits", [x, b, scales], prefix, outputs=outputs, domain=MS, K=k, N=n, bits=BITS,
                         block_size=GROUP_SIZE, accuracy_level=self.acc)

    def swiglu(self, h: str, w1: str, w3: str, w2: str, prefix: str) -> str:
        """Dense FFN / shared expert: w2(silu(w1 h) * w3 h), gate and up as one MatMulNBits ({prefix}.w13)."""
        gu = self.matmul_int4(h, [w1, w3], prefix, init_name=f"{prefix}.w13")
        g, u = self.g.op("Split", [gu], prefix, outputs=2, axis=-1, num_outputs=2)
        act = self.g.op("Mul", [self.g.op("Mul", [g, self.g.op("Sigmoid", [g], prefix)], prefix), u], prefix)
        return self.matmul_int4(act, [w2], prefix)

    def routing(self, logits: str, attrs: dict, p: str) -> str:
        """The op's routing weights scattered over all experts: [S, E], zero off the top-k."""
        g, k = self.g, self.g.const(f"{p}.k", [attrs["top_k"]])
        if attrs["scoring"] == "topk_softmax":  # softmax over the k selected logits (ours, Granite)
            top, ids = g.op("TopK", [logits, k], p, outputs=2, axis=-1, largest=1, sorted=1)
            w = g.op("Softmax", [top], p, axis=-1)
        else:  # "softmax_topk": the top-k of the softmax over all experts (OLMoE, Qwen-MoE, Mixtral)
            w, ids = g.op("TopK", [g.op("Softmax", [logits], p, axis=-1), k], p, outputs=2, axis=-1, largest=1, sorted=1)
            if attrs["norm_topk_prob"]:
                w = g.op("Div", [w, g.op("ReduceSum", [w, g.const(f"{p}.last", [-1])], p, keepdims=1)], p)
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        zeros = g.op("ConstantOfShape", [g.op("Shape", [logits], p)], p, value=zero)
        return g.op("ScatterElements", [zeros, ids, w], p, axis=1)

    def moe(self, h: str, i: int, attrs: dict, ops: dict) -> str:
        """Layer i's mobilemoe::moe (attributes, {operand: our parameter name or None}) as QMoE + routing."""
        g, p = self.g, f"layers.{i}.moe"
        router_t = self.w(ops["router_weight"]).float().numpy().T  # [H, E]
        logits = g.op("MatMul", [h, g.init(f"{p}.router.weight_t", router_t)], p)  # [S, E]
        if ops["router_bias"] is not None:
            logits = g.op("Add", [logits, g.init(f"{p}.router.bias", self.w(ops["router_bias"]).float().numpy())], p)
        router_weights = self.routing(logits, attrs, p)
        w1, s1 = int4_ort(self.w(ops["w1"]), ops["w1"])  # [E, I, H / 2], [E, I, H / 32]
        w3, s3 = int4_ort(self.w(ops["w3"]), ops["w3"])
        w2, s2 = int4_ort(self.w(ops["w2"]), ops["w2"])  # [E, H, I / 2], [E, H, I / 32]
        fc1 = [g.init(f"{p}.w13.q4", interleave_rows(w1, w3)), g.init(f"{p}.w13.scales", interleave_rows(s1, s3))]
        fc2 = [g.init(f"{p}.w2.q4", w2), g.init(f"{p}.w2.scales", s2)]
        # inputs: x, router_probs, fc1 (+ bias), fc2 (+ bias), no fc3, no zero points (8), router_weights
        inputs = [h, logits, *fc1, "", *fc2, "", "", "", "", "", "", "", router_weights]
        y = g.op("QMoE", inputs, p, domain=MS, k=attrs["top_k"], activation_type="swiglu", swiglu_fusion=1,
                 expert_weight_bits=BITS, block_size=GROUP_SIZE, normalize_routing_weights=0,
                 accuracy_level=self.acc)
        if ops["shared_w1"] is not None:
            q = f"{p}.shared"
            shared = self.swiglu(h, ops["shared_w1"], ops["shared_w3"], ops["shared_w2"], q)
            if ops["shared_gate"] is not None:  # Qwen2-MoE: times sigmoid(h @ gate^T), [S, 1]
                shared = g.op("Mul", [g.op("Sigmoid", [self.matmul_int4(h, [ops["shared_gate"]], q)], q), shared], q)
            y = g.op("Add", [y, shared], p)
        return y

    def attention(self, h: str, i: int, seqlens: str, total: str) -> str:
        c, p, g = self.cfg, f"layers.{i}.attn", self.g
        qkv = self.matmul_int4(h, [f"{p}.wq.weight", f"{p}.wk.weight", f"{p}.wv.weight"], p, init_name=f"{p}.wqkv")
        qkv = g.op("Unsqueeze", [qkv, g.const(f"{p}.axis0", [0])], p)  # [1, S, (nh + 2 nkv) D]
        kv_shape = [1, c.num_kv_heads, "past_sequence_length", c.head_dim]
        present_shape = [1, c.num_kv_heads, "total_sequence_length", c.head_dim]
        past, present = [], []
        for kind in ("key", "value"):
            past.append(f"past_key_values.{i}.{kind}")
            present.append(f"present.{i}.{kind}")
            g.inputs.append(helper.make_tensor_value_info(past[-1], TensorProto.FLOAT, kv_shape))
            g.outputs.append(helper.make_tensor_value_info(present[-1], TensorProto.FLOAT, present_shape))
        a, *_ = g.op("GroupQueryAttention", [qkv, "", "", *past, seqlens, total, "rope.cos", "rope.sin"], p,
                     outputs=[f"{p}/attn_out", *present], domain=MS, num_heads=c.num_heads,
                     kv_num_heads=c.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                     scale=1.0 / math.sqrt(c.head_dim))  # [1, S, nh D]; packed qkv: no key/value inputs
        a = g.op("Reshape", [a, g.const(f"{p}.flat", [-1, c.num_heads * c.head_dim])], p)
        return self.matmul_int4(a, [f"{p}.wo.weight"], p)

    def norm(self, x: str, name: str, skip: str | None = None) -> tuple[str, str]:
        """-> (normed, x + skip): SimplifiedLayerNormalization, or the Skip variant that adds first."""
        gamma = self.g.init(name, self.w(name).float().numpy())
        eps = self.cfg.norm_eps
        if skip is None:
            return self.g.op("SimplifiedLayerNormalization", [x, gamma], name, axis=-1, epsilon=eps), x
        normed, _, _, total = self.g.op("SkipSimplifiedLayerNormalization", [x, skip, gamma], name,
                                        outputs=[f"{name}/normed", "", "", f"{name}/sum"], domain=MS, epsilon=eps)
        return normed, total

    def embedding(self, ids: str) -> str:
        """GatherBlockQuantized over the INT4 table [V, H / 32, 16] -> [S, H]."""
        c, g = self.cfg, self.g
        q, s = int4_ort(self.w("embed.weight"), "embed.weight")
        v, h = c.vocab_size, c.hidden_size
        table = g.init("embed.weight.q4", q.reshape(v, h // GROUP_SIZE, BLOB))
        self.embed_scales = g.init("embed.weight.scales", s)  # [V, H / 32]: MatMulNBits' shape
        scales = g.op("Reshape", [self.embed_scales, g.const("embed.scales3", [v, h // GROUP_SIZE, 1])], "embed")
        rows = g.op("GatherBlockQuantized", [table, ids, scales], "embed", domain=MS, gather_axis=0,
                    quantize_axis=2, block_size=GROUP_SIZE, bits=BITS)  # [1, S, H / 32, 32]
        self.embed_table = table
        return g.op("Reshape", [rows, g.const("embed.flat", [-1, h])], "embed")

    # ------------------------------------------------------------------ whole graph
    def build(self) -> onnx.ModelProto:
        c, g = self.cfg, self.g
        g.inputs += [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence_length"]),
                     helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                     helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
        g.outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, c.vocab_size]))
        cos, sin = rope_table(c.head_dim, c.max_seq_len, c.rope_theta)  # [max_len, D], halves repeat
        g.init("rope.cos", cos[:, : c.head_dim // 2].numpy())
        g.init("rope.sin", sin[:, : c.head_dim // 2].numpy())
        x = self.embedding("input_ids")
        h, x = self.norm(x, "layers.0.attn_norm.weight")
        for i in range(c.num_layers):
            a = self.attention(h, i, "seqlens_k", "total_sequence_length")
            h, x = self.norm(x, f"layers.{i}.ffn_norm.weight", skip=a)
            f = f"layers.{i}.ffn"
            y = (self.moe(h, i, *self.moe_ops[i]) if c.is_moe
                 else self.swiglu(h, f"{f}.w1.weight", f"{f}.w3.weight", f"{f}.w2.weight", f))
            nxt = f"layers.{i + 1}.attn_norm.weight" if i + 1 < c.num_layers else "norm.weight"
            h, x = self.norm(x, nxt, skip=y)
        last = g.op("Slice", [h, g.const("last.start", [-1]), g.const("last.end", [2**62]), g.const("last.axes", [0])],
                    "lm_head")  # [1, H]
        if c.tie_embeddings:  # the embedding's very bytes and scales
            self.matmul_nbits(last, self.embed_table, self.embed_scales, c.vocab_size, c.hidden_size, "lm_head",
                              outputs=["logits"])
        else:
            self.matmul_int4(last, ["lm_head.weight"], "lm_head", outputs=["logits"])
        return g.model(f"MobileMoE {c.name}: INT4 ({GROUP_SIZE}-group) decoder with an explicit KV cache")


def build_decoder(cfg: MobileMoEConfig, weights: Weights, accuracy_level: int = 0,
                  moe_ops: list[tuple[dict, dict]] = ()) -> onnx.ModelProto:
    """The decoder graph for `cfg`, with INT4 weights quantized from `weights(name)` (float tensors);
    moe_ops: each layer's mobilemoe::moe (mobilemoe.moe_op.exported_calls, parameter names as ours)."""
    if cfg.is_moe and len(moe_ops) != cfg.num_layers:
        raise ValueError(f"config {cfg.name}: {len(moe_ops)} mobilemoe::moe ops for {cfg.num_layers} MoE layers")
    return DecoderBuilder(cfg, weights, accuracy_level, list(moe_ops)).build()
