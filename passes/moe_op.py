"""The Relax form of mobilemoe::moe (mobilemoe/moe_op.py): one call per MoE layer, what the MoE passes act on.

    y = mobilemoe.moe(x, router_weight, [router_bias], w1, w3 | w13, w2,
                      [shared_w1, shared_w3, shared_w2], [shared_gate])        attrs: MoEAttrs

    x [N, H] -> y [N, H]; operands in the order MoEAttrs.roles(): which optional ones are present
    is part of the attributes, so a pass reads each operand by its role, never by a parameter name.
    experts="int4": each routed expert weight (ROUTED: w1, w3, w13, w2) is two operands instead,
    <role>_codes uint32 [E, N, K // 8] and <role>_scales float16 [E, N, K // 32] (mobilemoe.quant's
    group-32 INT4 layout; PackMoEExpertsInt4).

MoEAttrs (a DictAttrs on the call): top_k, scoring ("topk_softmax" | "softmax_topk"), norm_topk_prob,
router_bias, num_shared_experts (0 | 1), shared_expert_gate, gate_up: "separate" (w1, w3
[E, I, H], as imported) | "fused" (w13 [E, 2I, H] = concat(w1, w3, axis=1): FuseExpertGateUp), and
experts: "float" (as imported) | "int4" (the routed experts packed: PackMoEExpertsInt4).

compiler/importer.py emits the call; FuseExpertGateUp fuses its gate/up operands; PackMoEExpertsInt4
packs its routed experts; SparseMoEDispatch lowers it (routing, expert kernels reading the k
selected experts, shared expert); DecomposeMoE lowers a float call to the dense reference
(`decompose`: every expert on every token, the einsum form the exporter used to emit). The op is
registered with a type rule and purity only: one that reaches LegalizeOps unlowered stays and fails
in VM codegen, naming "mobilemoe.moe".

The Relax ops that make the routing and the shared expert (`emit_routing`, `emit_shared`) are those
TVM's importer made of the PyTorch model's: routing `R.topk` + `R.nn.softmax` on the float32 logits,
the shared SwiGLU as `R.matmul` against `R.permute_dims` of its weights with `g * sigmoid(g)`,
which the later passes (QuantizeInt4Weights, PretransposeWeights, FastSigmoid) rewrite.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import tvm
from tvm import relax

from .common import emit_like, is_op, rewrite_relax_functions

OP_NAME = "mobilemoe.moe"
SCORINGS = ("topk_softmax", "softmax_topk")
GATE_UP = ("separate", "fused")
EXPERTS = ("float", "int4")
ROUTED = ("w1", "w3", "w13", "w2")  # the routed experts' stacked weights [E, N, K]: what INT4 packs


def packed_roles(role: str) -> tuple[str, str]:
    """The two operands of a routed expert weight under experts="int4": (codes, scales)."""
    return role + "_codes", role + "_scales"


@dataclass(frozen=True)
class MoEAttrs:
    top_k: int
    scoring: str
    norm_topk_prob: bool = False
    router_bias: bool = False
    num_shared_experts: int = 0
    shared_expert_gate: bool = False
    gate_up: str = "separate"
    experts: str = "float"

    def __post_init__(self):
        if (self.scoring not in SCORINGS or self.gate_up not in GATE_UP or self.experts not in EXPERTS
                or self.num_shared_experts not in (0, 1)):
            raise ValueError(f"{OP_NAME}: scoring must be one of {SCORINGS}, gate_up one of {GATE_UP}, experts one "
                             f"of {EXPERTS}, num_shared_experts 0 or 1; got {self}")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError(f"{OP_NAME}: shared_expert_gate needs a shared expert; got {self}")

    def routed(self) -> tuple[str, ...]:
        """The routed experts' weight roles (ROUTED) this call has, each one operand or, INT4, two."""
        return (("w1", "w3") if self.gate_up == "separate" else ("w13",)) + ("w2",)

    def routed_operands(self) -> tuple[str, ...]:
        """The operand names of routed()'s weights: one each, or (codes, scales) each under experts="int4"."""
        return tuple(r for w in self.routed() for r in (packed_roles(w) if self.experts == "int4" else (w,)))

    def roles(self) -> tuple[str, ...]:
        """The operand names, in call order."""
        return (("x", "router_weight") + (("router_bias",) if self.router_bias else ()) + self.routed_operands()
                + (("shared_w1", "shared_w3", "shared_w2") if self.num_shared_experts else ())
                + (("shared_gate",) if self.shared_expert_gate else ()))

    def to_attrs(self):
        return tvm.ir.make_node("ir.DictAttrs", **asdict(self))

    @classmethod
    def from_attrs(cls, attrs) -> "MoEAttrs":
        return cls(top_k=int(attrs["top_k"]), scoring=str(attrs["scoring"]), norm_topk_prob=bool(attrs["norm_topk_prob"]),
                   router_bias=bool(attrs["router_bias"]), num_shared_experts=int(attrs["num_shared_experts"]),
                   shared_expert_gate=bool(attrs["shared_expert_gate"]), gate_up=str(attrs["gate_up"]),
                   experts=str(attrs["experts"]))


def _infer_type(call, ctx):
    x = call.args[0].ty
    return relax.TensorType(x.shape, x.dtype) if x.shape is not None else relax.TensorType(dtype=x.dtype, ndim=2)


if OP_NAME not in tvm.ir.Op.list_op_names():
    tvm.ir._ffi_api.RegisterOp(OP_NAME, "the MoE block of mobilemoe::moe (passes/moe_op.py)")
    tvm.ir.register_op_attr(OP_NAME, "FInferType", _infer_type)
    tvm.ir.register_op_attr(OP_NAME, "FPurity", True)
OP = tvm.ir.Op.get(OP_NAME)


def make(attrs: MoEAttrs, operands: dict) -> relax.Call:
    """The call of `attrs` on `operands` ({role: expr}, exactly attrs.roles())."""
    if set(operands) != set(attrs.roles()):
        raise ValueError(f"{OP_NAME}: operands {sorted(operands)} do not match the attributes' {list(attrs.roles())}")
    return relax.Call(OP, [operands[r] for r in attrs.roles()], attrs.to_attrs())


def match(expr) -> tuple[MoEAttrs, dict] | None:
    """(attributes, {role: operand}) of a mobilemoe.moe call, else None."""
    if not is_op(expr, OP_NAME):
        return None
    attrs = MoEAttrs.from_attrs(expr.attrs)
    return attrs, dict(zip(attrs.roles(), expr.args))


def _linear(bb: relax.BlockBuilder, x, w):
    """x @ w^T as the importer makes an nn.Linear: R.matmul against R.permute_dims of the weight."""
    return bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w, axes=[1, 0])), out_dtype=str(x.ty.dtype)))


def emit_routing(bb: relax.BlockBuilder, attrs: MoEAttrs, ops: dict) -> tuple[relax.Var, relax.Var]:
    """-> (w [N, k] in x's dtype, ids [N, k] int64): mobilemoe.moe_op.route on the float32 logits."""
    x, k = ops["x"], attrs.top_k
    logits = _linear(bb, x, ops["router_weight"])  # [N, E]
    if attrs.router_bias:
        logits = bb.emit(relax.op.add(logits, ops["router_bias"]))
    if str(logits.ty.dtype) != "float32":
        logits = bb.emit(relax.op.astype(logits, "float32"))
    scores = logits if attrs.scoring == "topk_softmax" else bb.emit(relax.op.nn.softmax(logits, axis=-1))
    top = bb.emit(relax.op.topk(scores, k=k, axis=-1, ret_type="both", largest=True, dtype="int64"))
    w, ids = bb.emit(relax.TupleGetItem(top, 0)), bb.emit(relax.TupleGetItem(top, 1))
    if attrs.scoring == "topk_softmax":
        w = bb.emit(relax.op.nn.softmax(w, axis=-1))
    elif attrs.norm_topk_prob:
        w = bb.emit(relax.op.divide(w, bb.emit(relax.op.sum(w, axis=[-1], keepdims=True))))
    if str(x.ty.dtype) != "float32":
        w = bb.emit(relax.op.astype(w, str(x.ty.dtype)))
    return w, ids


def emit_shared(bb: relax.BlockBuilder, attrs: MoEAttrs, ops: dict, routed: relax.Expr) -> relax.Expr:
    """routed [N, H] (an expression not yet emitted) + the shared expert (times its sigmoid gate);
    `routed` itself when there is none. The result is not emitted."""
    if not attrs.num_shared_experts:
        return routed
    routed, x = bb.emit(routed), ops["x"]
    g = _linear(bb, x, ops["shared_w1"])
    act = bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(g, bb.emit(relax.op.sigmoid(g)))),
                                    _linear(bb, x, ops["shared_w3"])))
    y = _linear(bb, act, ops["shared_w2"])
    if attrs.shared_expert_gate:
        y = bb.emit(relax.op.multiply(bb.emit(relax.op.sigmoid(_linear(bb, x, ops["shared_gate"]))), y))
    return relax.op.add(routed, y)


def expert_weight(attrs: MoEAttrs, ops: dict, role: str):
    """A routed expert weight (ROUTED): its operand, or under experts="int4" its (codes, scales) operands."""
    return tuple(ops[r] for r in packed_roles(role)) if attrs.experts == "int4" else ops[role]


def gate_up(bb: relax.BlockBuilder, attrs: MoEAttrs, ops: dict):
    """The stacked gate/up weight [E, 2I, H] (INT4: its (codes, scales)): the w13 operand(s), or w1
    and w3 concatenated here (INT4: codes and scales each; the groups run along H, so rows concatenate)."""
    if attrs.gate_up == "fused":
        return expert_weight(attrs, ops, "w13")
    w1, w3 = expert_weight(attrs, ops, "w1"), expert_weight(attrs, ops, "w3")
    if attrs.experts == "int4":
        return tuple(bb.emit(relax.op.concat([a, b], axis=1)) for a, b in zip(w1, w3))
    return bb.emit(relax.op.concat([w1, w3], axis=1))


def decompose(bb: relax.BlockBuilder, attrs: MoEAttrs, ops: dict) -> relax.Expr:
    """The dense reference (mobilemoe.moe_op.dense_experts): every expert on every token, combined by
    a [N, E] routing matrix; -> y [N, H] (the last value not emitted)."""
    x = ops["x"]
    w, ids = emit_routing(bb, attrs, ops)
    E = int(ops["w2"].ty.shape.values[0])
    onehot = bb.emit(relax.op.equal(bb.emit(relax.op.expand_dims(ids, axis=[-1])), bb.emit(relax.op.arange(0, E, 1, "int64"))))
    onehot = bb.emit(relax.op.astype(onehot, str(x.ty.dtype)))
    combine = bb.emit(relax.op.sum(bb.emit(relax.op.multiply(onehot, bb.emit(relax.op.expand_dims(w, axis=[2])))), axis=[1]))
    if attrs.gate_up == "fused":
        gu = bb.emit(relax.op.einsum([x, ops["w13"]], "nh,eih->nei"))  # [N, E, 2I]
        I = int(gu.ty.shape.values[2]) // 2
        g = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[0], end=[I]))
        u = bb.emit(relax.op.strided_slice(gu, axes=[2], begin=[I], end=[2 * I]))
    else:
        g = bb.emit(relax.op.einsum([x, ops["w1"]], "nh,eih->nei"))  # [N, E, I]
        u = bb.emit(relax.op.einsum([x, ops["w3"]], "nh,eih->nei"))
    a = bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(g, bb.emit(relax.op.sigmoid(g)))), u))
    y = bb.emit(relax.op.einsum([a, ops["w2"]], "nei,ehi->neh"))  # [N, E, H]
    return emit_shared(bb, attrs, ops, relax.op.einsum([y, combine], "neh,ne->nh"))


def rewrite_calls(lower, mod: tvm.IRModule) -> tvm.IRModule:
    """Every mobilemoe.moe call of every Relax function replaced by lower(bb, attrs, operands): an
    expression (emitted in the call's place, under its name) or None (the call stays)."""

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            found = match(binding.value)
            if found is not None:
                attrs, ops = found
                ops = {r: self.visit_expr(e) for r, e in ops.items()}
                out = lower(self.builder_, attrs, ops)
                if out is not None:
                    self.set_var_remap(binding.var, emit_like(self.builder_, out, binding.var))
                    return
            super().visit_var_binding_(binding)

    return rewrite_relax_functions(_Rewriter(mod), mod)
