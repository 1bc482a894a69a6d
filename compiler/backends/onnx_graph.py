"""The ONNX pieces the program translation (onnx_program.py) emits for parameters and the MoE op.

    Graph          nodes + initializers, generated value names (`prefix/Op_n`)
    Int4Weights    each weight of the program as ORT INT4 initializers, made once per parameter:
                   MatMulNBits' B [N, K / 32, 16] uint8 + scales [N, K / 32] float32 (a linear),
                   the same bytes read by GatherBlockQuantized (an embedding: tied tables share them)
    moe_to_qmoe    one mobilemoe::moe call as QMoE + the op's routing (+ the shared expert)

Every INT4 weight is quantize_int4 -> pack_int4 (the TVM artifact's words) -> int4_bytes (ORT's
byte layout g32_u8k2_zp8, mobilemoe/quant.py); scales are the same fp16 values widened to float32,
the type ORT wants next to float32 activations.

QMoE (the op's routed experts): logits = x @ router^T (+ router bias) in float32 [N, E]; the op's
routing ("topk_softmax": softmax over the top-k logits; "softmax_topk": top-k of the softmax,
renormalised when norm_topk_prob) scattered over all experts as router_weights [N, E]; QMoE picks
the top-k of softmax(logits), the same experts as top-k on the logits (softmax keeps the order), and
mixes them with router_weights as given, so every routing variant of the op is exact. fc1 = w1/w3
rows interleaved (swiglu_fusion=1), fc2 = w2. The shared expert: MatMulNBits for w1|w3 (one), w2,
times Sigmoid(MatMulNBits(x, shared_gate)) when gated.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mobilemoe.quant import BITS, GROUP_SIZE, int4_bytes, pack_int4, quantize_int4

MS = "com.microsoft"
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
# ORT ops outside the ONNX standard: a runtime needs a CPU kernel for each (domain, op)
CONTRIB_OPS = [(MS, "MatMulNBits"), (MS, "QMoE"), (MS, "GatherBlockQuantized"), (MS, "RotaryEmbedding"),
               (MS, "SkipSimplifiedLayerNormalization"), ("", "SimplifiedLayerNormalization")]
BLOB = GROUP_SIZE * BITS // 8  # bytes per block in MatMulNBits' B [N, K / 32, 16]

Weights = Callable[[str], torch.Tensor]  # our state_dict name -> float tensor


def int4_ort(w: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray]:
    """W [..., N, K] -> (uint8 [..., N, K // 2], float32 scales [..., N, K // 32]) from the same codes."""
    codes, scales = quantize_int4(w.float(), name)
    return int4_bytes(pack_int4(codes)).numpy(), scales.float().numpy()


def int4_able(shape) -> bool:
    """Whether a weight [..., N, K] is stored INT4 (K a multiple of the group), as the TVM artifact does."""
    return len(shape) >= 2 and shape[-1] % GROUP_SIZE == 0


def interleave_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[..., N, X] twice -> [..., 2N, X] with rows a0, b0, a1, b1, ... (QMoE's swiglu_fusion=1 fc1)."""
    return np.stack([a, b], axis=-2).reshape(*a.shape[:-2], 2 * a.shape[-2], a.shape[-1])


class Graph:
    """A list of nodes and initializers with generated value names (`prefix/op_n`)."""

    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self._count, self._consts = 0, {}

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, order="C"), name))  # 0-d stays 0-d
        return name

    def const(self, values, dtype=np.int64) -> str:
        """An anonymous constant initializer, one per distinct value."""
        a = np.asarray(values, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            self._count += 1
            self._consts[key] = self.init(f"const_{self._count}", a)
        return self._consts[key]

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


class Int4Weights:
    """The program's weights as ONNX initializers, each made once: INT4 (B + scales) or float32."""

    def __init__(self, g: Graph, weights: Weights, accuracy_level: int):
        self.g, self.w, self.acc = g, weights, accuracy_level
        self._int4, self._float = {}, {}

    def float(self, name: str, transpose: bool = False) -> str:
        key = (name, transpose)
        if key not in self._float:
            w = self.w(name).float().numpy()
            self._float[key] = self.g.init(name + (".T" if transpose else ""), w.T if transpose else w)
        return self._float[key]

    def int4(self, names: list[str]) -> tuple[str, str, int, int]:
        """cat(weights [N_i, K]) as MatMulNBits' B [N, K / 32, 16] and scales [N, K / 32] -> (B, scales, N, K)."""
        key = "+".join(names)
        if key not in self._int4:
            w = torch.cat([self.w(n) for n in names]) if len(names) > 1 else self.w(names[0])
            n, k = w.shape
            q, s = int4_ort(w, key)
            self._int4[key] = (self.g.init(f"{key}.q4", q.reshape(n, k // GROUP_SIZE, BLOB)),
                               self.g.init(f"{key}.scales", s), n, k)
        return self._int4[key]

    def matmul(self, x: str, names: list[str], prefix: str, bias: str | None = None) -> str:
        """x [..., K] @ cat(weights [N_i, K])^T (+ bias [N]) -> [..., sum N_i] through one MatMulNBits."""
        b, scales, n, k = self.int4(names)
        return self.g.op("MatMulNBits", [x, b, scales, "", "", bias or ""], prefix, domain=MS, K=k, N=n, bits=BITS,
                         block_size=GROUP_SIZE, accuracy_level=self.acc)

    def gather(self, name: str, ids: str, prefix: str) -> str:
        """Rows `ids` of the INT4 table `name` [V, H] (GatherBlockQuantized) -> [*ids.shape, H]."""
        table, scales, v, h = self.int4([name])
        scales3 = self.g.op("Reshape", [scales, self.g.const([v, h // GROUP_SIZE, 1])], prefix)
        rows = self.g.op("GatherBlockQuantized", [table, ids, scales3], prefix, domain=MS, gather_axis=0,
                         quantize_axis=2, block_size=GROUP_SIZE, bits=BITS)  # [*ids, H / 32, 32]
        return self.g.op("Reshape", [rows, self.g.const([0] * 2 + [-1])], prefix)  # ids [1, S] -> [1, S, H]


def _routing(g: Graph, logits: str, attrs: dict, p: str) -> str:
    """The op's routing weights scattered over all experts: [N, E], zero off the top-k."""
    k = g.const([attrs["top_k"]])
    if attrs["scoring"] == "topk_softmax":  # softmax over the k selected logits (ours, Granite)
        top, ids = g.op("TopK", [logits, k], p, outputs=2, axis=-1, largest=1, sorted=1)
        w = g.op("Softmax", [top], p, axis=-1)
    else:  # "softmax_topk": the top-k of the softmax over all experts (OLMoE, Qwen-MoE, Mixtral)
        w, ids = g.op("TopK", [g.op("Softmax", [logits], p, axis=-1), k], p, outputs=2, axis=-1, largest=1, sorted=1)
        if attrs["norm_topk_prob"]:
            w = g.op("Div", [w, g.op("ReduceSum", [w, g.const([-1])], p, keepdims=1)], p)
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    zeros = g.op("ConstantOfShape", [g.op("Shape", [logits], p)], p, value=zero)
    return g.op("ScatterElements", [zeros, ids, w], p, axis=1)


def moe_to_qmoe(w: Int4Weights, x: str, attrs: dict, ops: dict, prefix: str) -> str:
    """One mobilemoe::moe (attributes, {operand: our parameter name or None}) on x [N, H] -> [N, H]."""
    g, p = w.g, prefix
    logits = g.op("MatMul", [x, w.float(ops["router_weight"], transpose=True)], p)  # [N, E] float32
    if ops["router_bias"] is not None:
        logits = g.op("Add", [logits, w.float(ops["router_bias"])], p)
    router_weights = _routing(g, logits, attrs, p)
    w1, s1 = int4_ort(w.w(ops["w1"]), ops["w1"])  # [E, I, H / 2], [E, I, H / 32]
    w3, s3 = int4_ort(w.w(ops["w3"]), ops["w3"])
    w2, s2 = int4_ort(w.w(ops["w2"]), ops["w2"])  # [E, H, I / 2], [E, H, I / 32]
    fc1 = [g.init(f"{ops['w1']}+w3.q4", interleave_rows(w1, w3)), g.init(f"{ops['w1']}+w3.scales", interleave_rows(s1, s3))]
    fc2 = [g.init(f"{ops['w2']}.q4", w2), g.init(f"{ops['w2']}.scales", s2)]
    # inputs: x, router_probs, fc1 (+ bias), fc2 (+ bias), no fc3, no zero points (8), router_weights
    inputs = [x, logits, *fc1, "", *fc2, "", "", "", "", "", "", "", router_weights]
    y = g.op("QMoE", inputs, p, domain=MS, k=attrs["top_k"], activation_type="swiglu", swiglu_fusion=1,
             expert_weight_bits=BITS, block_size=GROUP_SIZE, normalize_routing_weights=0, accuracy_level=w.acc)
    if ops["shared_w1"] is not None:
        q = f"{p}.shared"
        gu = w.matmul(x, [ops["shared_w1"], ops["shared_w3"]], q)
        gate, up = g.op("Split", [gu], q, outputs=2, axis=-1, num_outputs=2)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], q)], q), up], q)
        shared = w.matmul(act, [ops["shared_w2"]], q)
        if ops["shared_gate"] is not None:  # Qwen2-MoE: times sigmoid(x @ gate^T), [N, 1]
            shared = g.op("Mul", [g.op("Sigmoid", [w.matmul(x, [ops["shared_gate"]], q)], q), shared], q)
        y = g.op("Add", [y, shared], p)
    return y
