"""The MobileMoE model: a decoder-only transformer with fine-grained routed experts + a shared expert.

One readable file in the spirit of gpt-fast / nanoGPT. Shapes use:
  B batch, S new tokens, P cached tokens, T = P + S keys, H hidden, nh/nkv query/KV heads, D head dim,
  E routed experts, k experts per token, I routed expert width, V vocab, L layers.

KV cache layouts (forward takes either and returns the same kind, with the S new tokens appended):
  stacked  kv [L, 2, B, nkv, P, D]   kv[l, 0] = keys after RoPE, kv[l, 1] = values, positions 0..P-1:
           one tensor (eager generation, the MLIR export);
  layers   kv = [(k_0, v_0), ..., (k_{L-1}, v_{L-1})], k_l [B, nkv, D, P] (keys transposed),
           v_l [B, nkv, P, D]: what the TVM artifact exports (mobilemoe/export.py). A decode step
           copies each layer's cache once (its append) and never slices or re-stacks the whole
           cache; with the keys transposed, both attention products stream contiguous cache rows
           (q.K^T runs along t, p.V along d).

Routing (identical to HF GraniteMoeShared): logits = router(x) in float32, top-k on the logits
(sorted), softmax over the k selected logits; the shared expert is always on:
  y = sum_j w_j * expert_{i_j}(x) + shared(x).
Experts are stored stacked: w1 (gate) [E, I, H], w3 (up) [E, I, H], w2 (down) [E, H, I].

Options for the Hugging Face families of mobilemoe/arch/ (MobileMoEConfig fields; defaults = ours):
  router="softmax_topk"   w, i = top-k of softmax(logits) over all E (OLMoE, Qwen-MoE, Mixtral),
                          renormalised to sum 1 when norm_topk_prob
  shared_expert_gate      shared(x) * sigmoid(x @ g), g [1, H] (Qwen2-MoE)
  qk_norm                 RMSNorm of q and k before RoPE: "head" over D (Qwen3), "proj" over nh*D (OLMoE)
  qkv_bias, o_bias        attention projection biases (Qwen2, Llama attention_bias)
  embedding_multiplier, residual_multiplier, attention_multiplier, logits_scaling   (Granite)
  rope_type "linear" / "llama3" + rope_* fields: RoPE frequency scaling (rope_table)
The routing variant (router, norm_topk_prob, shared expert, its gate) is what the exported MoE
operator carries as attributes (mobilemoe/moe_op.py); the compiler's passes act on that operator
(FuseExpertGateUp, PackMoEExpertsInt4, SparseMoEDispatch).

The MoE layer has four numerically equivalent implementations (`MoE.impl`):
  "grouped": tokens sorted by expert, one GEMM per non-empty expert (torch._grouped_mm on CUDA bf16):
             training and eager prefill;
  "gather":  gathers the k selected experts' weights per token: eager decode (reads only k experts);
  "dense":   every expert on every token, combined with a [T, E] routing matrix (training sweeps
             that want no data-dependent shapes);
  "op":      the whole block as one mobilemoe::moe custom op (its eager kernel: route + "dense"):
             the export form (mobilemoe/export.py), inference only (no router logits, no autograd).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kv_cache, moe_op
from .config import MobileMoEConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def scale_inv_freq(inv_freq: torch.Tensor, rope_type: str, factor: float, low_freq_factor: float,
                   high_freq_factor: float, original_max_len: int) -> torch.Tensor:
    """RoPE frequency scaling as HF's "linear" and "llama3" rope types (MobileMoEConfig.rope_scaling)."""
    if rope_type == "linear":
        return inv_freq / factor
    low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long wavelengths: / factor
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_table(head_dim: int, max_len: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, D] in the rotate-half convention (as HF Llama); scaling: cfg.rope_scaling()."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is not None:
        inv_freq = scale_inv_freq(inv_freq, **scaling)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.int64).float(), inv_freq)  # [max_len, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, n, S, D]; cos/sin [B, 1, S, D]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    grouped = False  # True: the exported form (_grouped); False: SDPA (mobilemoe/export.py sets it)

    def __init__(self, cfg: MobileMoEConfig):
        super().__init__()
        self.nh, self.nkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attention_multiplier or self.d ** -0.5  # Granite sets its own
        self.wq = nn.Linear(cfg.hidden_size, self.nh * self.d, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.hidden_size, self.nkv * self.d, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.hidden_size, self.nkv * self.d, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.nh * self.d, cfg.hidden_size, bias=cfg.o_bias)
        # q/k RMSNorm before RoPE: over each head (Qwen3, "head") or the whole projection (OLMoE, "proj")
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(self.d if per_head else self.nh * self.d, cfg.norm_eps)
            self.k_norm = RMSNorm(self.d if per_head else self.nkv * self.d, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, past_k, past_v, keys_t: bool = False, slots=None):
        # x [B, S, H]; mask [B, 1, S, T] additive (0 / -max); past_k/v [B, nkv, P, D]
        # (keys_t: past_k and the returned keys are [B, nkv, D, P], the layered cache layout;
        # slots [B, S]: a fixed-capacity layered cache, the new K/V written there: mobilemoe/kv_cache.py)
        B, S, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # [B, S, nh * D], [B, S, nkv * D] x 2
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.nh, self.d).transpose(1, 2)  # [B, nh, S, D]
        k = k.view(B, S, self.nkv, self.d).transpose(1, 2)  # [B, nkv, S, D]
        v = v.view(B, S, self.nkv, self.d).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if slots is not None:
            return kv_cache.write_and_attend(self, q, k, v, past_k, past_v, slots)
        k_all = torch.cat([past_k, k.transpose(-1, -2)], dim=3) if keys_t else torch.cat([past_k, k], dim=2)
        v_all = torch.cat([past_v, v], dim=2)  # [B, nkv, T, D]; k_all [B, nkv, T, D] or [B, nkv, D, T]
        if self.grouped:
            y = self._grouped(q, k_all, v_all, mask, keys_t)
        else:
            y = self._sdpa(q, k_all.transpose(-1, -2) if keys_t else k_all, v_all, mask)
        y = y.transpose(1, 2).reshape(B, S, self.nh * self.d)
        return self.wo(y), k_all, v_all

    def _sdpa(self, q, k_all, v_all, mask):
        """PyTorch's fused attention over K/V repeated to every query head (training, eager)."""
        B, rep, (T, D) = q.shape[0], self.nh // self.nkv, k_all.shape[2:]
        kr = k_all[:, :, None].expand(B, self.nkv, rep, T, D).reshape(B, self.nh, T, D)
        vr = v_all[:, :, None].expand(B, self.nkv, rep, T, D).reshape(B, self.nh, T, D)
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=self.scale)  # [B, nh, S, D]

    def _grouped(self, q, k_all, v_all, mask, keys_t: bool = False):
        """The same attention with the query heads grouped by their KV head and K/V broadcast over the
        group inside the matmuls, not repeated by an expand + reshape copy (the exported form: a
        compiled decode step would otherwise copy the whole cache nh / nkv times). Head h = kv * rep + r.
        (Stacking the group's heads as rows, [B, nkv, rep * S, D], would be one plain batched matmul,
        but torch.export cannot prove that reshape for a dynamic S.)"""
        B, nh, S, D = q.shape
        rep = nh // self.nkv
        qg = q.view(B, self.nkv, rep, S, D) * self.scale
        # einsum: TVM imports it as one reduction over the cache as stored (a matmul against
        # k_all.transpose(-1, -2) materializes the transposed, broadcast cache every step)
        keys = "bgrsd,bgdt->bgrst" if keys_t else "bgrsd,bgtd->bgrst"
        scores = torch.einsum(keys, qg, k_all) + mask[:, :, None]  # [B, nkv, rep, S, T]
        p = torch.softmax(scores, dim=-1)
        return torch.einsum("bgrst,bgtd->bgrsd", p, v_all).reshape(B, nh, S, D)


class FeedForward(nn.Module):
    """SwiGLU: the dense FFN and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _bf16_grouped_mm(x: torch.Tensor) -> bool:
    """Whether the grouped expert GEMMs can run as torch._grouped_mm in bf16 (CUDA): x is bf16, or
    autocast to bf16 is on (training keeps fp32 weights and activations between autocast ops)."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda")
                                         and torch.get_autocast_dtype("cuda") == torch.bfloat16)


class MoE(nn.Module):
    # mobilemoe::moe's tensor operands (but x) -> the parameter of this module that is each: the one
    # map from roles to parameters (the export form's operands, QAT's float weights by role)
    OPERANDS = {"router_weight": "router.weight", "router_bias": "router.bias", "w1": "w1", "w3": "w3", "w2": "w2",
                "shared_w1": "shared.w1.weight", "shared_w3": "shared.w3.weight", "shared_w2": "shared.w2.weight",
                "shared_gate": "shared_gate.weight"}

    def __init__(self, cfg: MobileMoEConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.expert_hidden
        self.num_experts, self.top_k = E, cfg.top_k
        self.router_kind, self.norm_topk_prob = cfg.router, cfg.norm_topk_prob
        self.router = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, I, H))  # gate
        self.w3 = nn.Parameter(torch.empty(E, I, H))  # up
        self.w2 = nn.Parameter(torch.empty(E, H, I))  # down
        self.shared = FeedForward(H, cfg.shared_expert_hidden) if cfg.shared_expert_hidden else None
        self.shared_gate = nn.Linear(H, 1, bias=False) if cfg.shared_expert_gate else None  # Qwen2-MoE
        self.impl = "auto"

    def route(self, x):
        # x [N, H] -> logits [N, E] (fp32), weights [N, k], ids [N, k]
        logits = self.router(x).float()
        w, ids = moe_op.route(logits, self.top_k, self.router_kind, self.norm_topk_prob)
        return logits, w.to(x.dtype), ids

    def forward(self, x):
        # x [B, S, H] -> y [B, S, H], router logits [B*S, E], expert ids [B*S, k] (None for "op")
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.impl == "op":
            return self._op(x).view(shape), None, None
        logits, w, ids = self.route(x)
        impl = self.impl
        if impl == "auto":
            impl = "gather" if (not self.training and x.shape[0] <= 4) else "grouped"
        y = {"dense": self._dense, "gather": self._gather, "grouped": self._grouped}[impl](x, w, ids)
        if self.shared_gate is not None:
            y = y + torch.sigmoid(self.shared_gate(x)) * self.shared(x)  # [N, 1] * [N, H]
        elif self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape), logits, ids

    # each operand role's part of the layer (the compiler's per-kernel accounting, compiler/profile.py)
    ROLE_PARTS = {"router_weight": "router", "router_bias": "router", "w1": "routed experts", "w3": "routed experts",
                  "w2": "routed experts", "shared_w1": "shared expert", "shared_w3": "shared expert",
                  "shared_w2": "shared expert", "shared_gate": "shared expert"}

    def operand(self, role: str):
        """The tensor of the op operand `role` (OPERANDS), or None where this layer has none."""
        t = self
        for attr in self.OPERANDS[role].split("."):
            t = getattr(t, attr, None) if t is not None else None
        return t

    def _op(self, x):
        """The whole block as one mobilemoe::moe (mobilemoe/moe_op.py): the export form."""
        return moe_op.moe(x, **{role: self.operand(role) for role in self.OPERANDS}, top_k=self.top_k,
                          scoring=self.router_kind, norm_topk_prob=self.norm_topk_prob)

    def _dense(self, x, w, ids):
        return moe_op.dense_experts(x, w, ids, self.w1, self.w3, self.w2)

    def _gather(self, x, w, ids):
        g = torch.einsum("nh,nkih->nki", x, self.w1[ids])  # w1[ids]: [N, k, I, H]
        u = torch.einsum("nh,nkih->nki", x, self.w3[ids])
        y = torch.einsum("nki,nkhi->nkh", F.silu(g) * u, self.w2[ids])
        return torch.einsum("nkh,nk->nh", y, w)

    def _grouped(self, x, w, ids):
        k = self.top_k
        flat = ids.reshape(-1)  # [N*k]
        order = torch.argsort(flat, stable=True)
        token = order // k
        xs = x[token]  # [N*k, H], grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        if _bf16_grouped_mm(x):  # bf16 tensors, or fp32 ones under bf16 autocast (training): one GEMM per op
            bf, offs = torch.bfloat16, torch.cumsum(counts, 0).to(torch.int32)
            xs = xs.to(bf)
            g = torch._grouped_mm(xs, self.w1.to(bf).transpose(1, 2), offs=offs)
            u = torch._grouped_mm(xs, self.w3.to(bf).transpose(1, 2), offs=offs)
            ys = torch._grouped_mm(F.silu(g) * u, self.w2.to(bf).transpose(1, 2), offs=offs)
        else:
            outs = []
            for e, xe in enumerate(torch.split(xs, counts.tolist())):
                if xe.shape[0]:
                    outs.append(F.linear(F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e]), self.w2[e]))
            ys = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[1])
        ys = ys * w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


class Block(nn.Module):
    def __init__(self, cfg: MobileMoEConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.moe = MoE(cfg) if cfg.is_moe else None
        self.ffn = None if cfg.is_moe else FeedForward(cfg.hidden_size, cfg.ffn_hidden)
        self.residual_multiplier = cfg.residual_multiplier  # Granite

    def residual(self, x, y):
        return x + (y if self.residual_multiplier == 1.0 else y * self.residual_multiplier)

    def forward(self, x, cos, sin, mask, past_k, past_v, keys_t: bool = False, slots=None):
        a, k, v = self.attn(self.attn_norm(x), cos, sin, mask, past_k, past_v, keys_t, slots)
        x = self.residual(x, a)
        h = self.ffn_norm(x)
        if self.moe is None:
            return self.residual(x, self.ffn(h)), k, v, None
        y, logits, ids = self.moe(h)
        return self.residual(x, y), k, v, (logits, ids)


class MobileMoE(nn.Module):
    def __init__(self, cfg: MobileMoEConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling())
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        out_std = std / math.sqrt(2 * self.config.num_layers)  # residual projections (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w2.weight", "moe.w2")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def float_weight_names(self) -> set[str]:
        """Parameters that stay float in the INT4 model besides the norms: each MoE op's operands of
        the roles moe_op.FLOAT_ROLES (the router), by their names here (outer names when parametrized)."""
        return {f"{name}.{MoE.OPERANDS[role]}" for name, mod in self.named_modules() if isinstance(mod, MoE)
                for role in moe_op.FLOAT_ROLES if mod.operand(role) is not None}

    def weight_parts(self) -> dict[str, str]:
        """Each parameter name (tied ones under both names) -> its part of the layer, from the module
        holding it and, inside the MoE, its role in the op: "attention", "router", "routed experts",
        "shared expert", "dense ffn", "norm", "embedding" or "lm head"."""
        parts = {name: "other" for name, _ in self.named_parameters(remove_duplicate=False)}
        parts.update({"embed.weight": "embedding", "lm_head.weight": "lm head"})
        for mname, mod in self.named_modules():
            own = [f"{mname}.{n}" for n, _ in mod.named_parameters(remove_duplicate=False)]
            if isinstance(mod, Attention):
                parts.update(dict.fromkeys(own, "attention"))
            elif isinstance(mod, Block) and mod.ffn is not None:
                parts.update(dict.fromkeys((f"{mname}.ffn.{n}" for n, _ in mod.ffn.named_parameters()), "dense ffn"))
            elif isinstance(mod, MoE):
                parts.update({f"{mname}.{MoE.OPERANDS[role]}": part for role, part in MoE.ROLE_PARTS.items()
                              if mod.operand(role) is not None})
        for mname, mod in self.named_modules():  # norms last: q/k norms sit inside attention
            if isinstance(mod, RMSNorm):
                parts[f"{mname}.weight"] = "norm"
        return parts

    def set_moe_impl(self, impl: str) -> None:
        if impl not in ("auto", "dense", "gather", "grouped", "op"):
            raise ValueError(f"MoE impl must be auto|dense|gather|grouped|op, got {impl!r}")
        for layer in self.layers:
            if layer.moe is not None:
                layer.moe.impl = impl

    def empty_kv(self, batch: int = 1, dtype=None, device=None) -> torch.Tensor:
        c = self.config
        return torch.zeros(c.num_layers, 2, batch, c.num_kv_heads, 0, c.head_dim,
                           dtype=dtype or self.embed.weight.dtype, device=device or self.embed.weight.device)

    def forward(self, tokens, positions=None, kv=None, *, return_aux: bool = False, last_only: bool = False,
                inplace: bool = False):
        """tokens [B, S] int64; positions [B, S] int64 (default P..P+S-1); kv [L, 2, B, nkv, P, D]
        or a list of L (k [B, nkv, D, P], v [B, nkv, P, D]) pairs (the layouts of the module docstring).

        Returns (logits [B, S, V], kv with P+S positions, in the layout given) and, with return_aux, a dict with
        the load-balancing loss, router z-loss and per-expert token share [L, E].
        last_only: logits of the last position only ([B, 1, V]): what generation needs.
        inplace: kv is a layered cache of fixed capacity P (mobilemoe/kv_cache.py): the S new tokens'
        K/V are written at `positions` (required) and each attends to the cache up to its position;
        returns the written caches (capacity P).
        """
        B, S = tokens.shape
        if kv is None:
            kv = self.empty_kv(B)
        layered = isinstance(kv, (list, tuple))
        if inplace and (positions is None or not layered):
            raise ValueError("inplace: a layered cache of fixed capacity and the positions to write are required")
        P = kv[0][0].shape[3] if layered else kv.shape[4]
        if positions is None:
            positions = torch.arange(P, P + S, device=tokens.device).expand(B, S)
        x = self.embed(tokens)  # [B, S, H]
        if self.config.embedding_multiplier != 1.0:  # Granite
            x = x * self.config.embedding_multiplier
        D = self.config.head_dim
        cos = torch.index_select(self.rope_cos, 0, positions.reshape(-1)).view(B, 1, S, D).to(x.dtype)
        sin = torch.index_select(self.rope_sin, 0, positions.reshape(-1)).view(B, 1, S, D).to(x.dtype)
        key_pos = torch.arange(P + S, device=tokens.device)
        visible = key_pos[None, None, :] <= positions[:, :, None]  # [B, S, T]
        # additive mask [B, 1, S, T]: 0 where visible, -finfo.max where not (TVM imports float masks)
        mask = None if inplace else ((visible.to(x.dtype) - 1) * torch.finfo(x.dtype).max)[:, None]
        new_kv, routing = [], []
        for i, layer in enumerate(self.layers):
            past_k, past_v = kv[i] if layered else (kv[i, 0], kv[i, 1])
            if layered:  # one cache length for all layers: torch.export then gives them one symbol
                torch._check(past_k.shape[3] == P)
                torch._check(past_v.shape[2] == P)
            x, k, v, r = layer(x, cos, sin, mask, past_k, past_v, keys_t=layered, slots=positions if inplace else None)
            new_kv.append((k, v) if layered else torch.stack([k, v]))
            routing.append(r)
        if last_only:
            # x[:, S - 1:] written so that its length is a static 1 in TVM: a slice starting at S - 1
            # imports as a dynamic slice whose length TVM cannot simplify (and FuseOps then fails on
            # it); x[:, -1] imports as a negative take index. Flipping costs one copy of x.
            x = x.flip(1)[:, :1]
        logits = self.lm_head(self.norm(x))
        if self.config.logits_scaling != 1.0:  # Granite
            logits = logits / self.config.logits_scaling
        kv_out = new_kv if layered else torch.stack(new_kv)
        if not return_aux:
            return logits, kv_out
        return logits, kv_out, self.router_losses(routing)

    def router_losses(self, routing) -> dict:
        """Switch-style load balancing (E * sum_e f_e P_e) and z-loss (mean logsumexp^2), per layer mean."""
        if not self.config.is_moe:
            zero = self.embed.weight.new_zeros(())
            return {"load_balance": zero, "z_loss": zero, "expert_share": None}
        E, k = self.config.num_experts, self.config.top_k
        lb, z, share = [], [], []
        for logits, ids in routing:
            frac = F.one_hot(ids, E).sum(1).float().mean(0) / k  # [E] share of assignments
            prob = torch.softmax(logits, dim=-1).mean(0)  # [E]
            lb.append(E * (frac * prob).sum())
            z.append(torch.logsumexp(logits, dim=-1).pow(2).mean())
            share.append(frac.detach())
        return {"load_balance": torch.stack(lb).mean(), "z_loss": torch.stack(z).mean(),
                "expert_share": torch.stack(share)}
