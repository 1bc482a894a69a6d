"""What the Llama-shaped families share: reading the common HF config fields and the attention /
norm / embedding tensor names.

HFConfig wraps a config.json dict so that every error names the file and the field. Its
`llama_fields()` translates the fields every family here has (sizes, heads, RoPE, norm eps, tied
embeddings, special tokens) and refuses what the model does not implement: a rope_type other
than default / linear / llama3, partial rotary embeddings, an activation other than SiLU, a sliding window in use.
"""
from __future__ import annotations

from ..config import ROPE_TYPES, ConfigError
from .tensors import Stack

MAX_SEQ_LEN = 4096  # RoPE table length for imported models (max_position_embeddings is capped to it)


class HFConfig:
    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def error(self, field: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{field}' {msg}")

    def get(self, field: str, default=None):
        v = self.raw.get(field)
        return default if v is None else v

    def require(self, *fields: str):
        """The first of `fields` present (HF renamed some across versions), else a ConfigError."""
        for f in fields:
            if self.raw.get(f) is not None:
                return self.raw[f]
        raise ConfigError(f"{self.source}: missing field '{fields[0]}'")

    def expect(self, field: str, allowed, default=None):
        v = self.get(field, default)
        if v not in allowed:
            raise self.error(field, f"is {v!r}; supported: {list(allowed)}")
        return v

    def token_id(self, field: str, default: int) -> int:
        v = self.raw.get(field)
        if isinstance(v, list):  # several eos ids: generation stops at the first
            v = v[0] if v else None
        return default if v is None else int(v)

    def rope(self) -> dict:
        """MobileMoEConfig's rope_* fields from rope_parameters (transformers 5) or rope_theta + rope_scaling."""
        field = "rope_parameters" if self.raw.get("rope_parameters") else "rope_scaling"
        rope = self.raw.get(field) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise self.error(field, f"has rope_type {kind!r}; supported: {list(ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", self.raw.get("partial_rotary_factor", 1.0)) != 1.0:
            raise self.error("partial_rotary_factor", "must be 1.0 (RoPE over the whole head)")
        out = {"rope_theta": float(rope.get("rope_theta", self.get("rope_theta", 10000.0))), "rope_type": kind}
        if kind != "default":
            out["rope_factor"] = float(rope["factor"])
        if kind == "llama3":
            out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_len=int(rope["original_max_position_embeddings"]))
        return out

    def check_sliding_window(self, max_seq_len: int) -> None:
        """A sliding window narrower than the context we run is not implemented."""
        types = self.raw.get("layer_types") or []
        bad = sorted(set(types) - {"full_attention"})
        if bad:
            raise self.error("layer_types", f"has {bad}; supported: ['full_attention'] (no sliding window)")
        window = self.raw.get("sliding_window")
        in_use = self.raw.get("use_sliding_window", window is not None)
        if in_use and window and window < max_seq_len:
            raise self.error("sliding_window", f"is {window} (in use); supported: none (full attention only)")

    def moe_fields(self, hidden: str, aux_default: float, experts=("num_experts", "num_local_experts")) -> dict:
        """The routed-expert fields every MoE family reads: count, top-k, width, load-balancing coef."""
        return {"num_experts": int(self.require(*experts)), "top_k": int(self.require("num_experts_per_tok")),
                "expert_hidden": int(self.require(hidden)),
                "router_aux_loss_coef": float(self.get("router_aux_loss_coef", aux_default))}

    def llama_fields(self) -> dict:
        """MobileMoEConfig fields every Llama-shaped family shares."""
        hidden, heads = int(self.require("hidden_size")), int(self.require("num_attention_heads"))
        self.expect("hidden_act", ("silu",), default="silu")
        max_seq_len = min(int(self.get("max_position_embeddings", MAX_SEQ_LEN)), MAX_SEQ_LEN)
        self.check_sliding_window(max_seq_len)
        return dict(
            vocab_size=int(self.require("vocab_size")), hidden_size=hidden,
            num_layers=int(self.require("num_hidden_layers")), num_heads=heads,
            num_kv_heads=int(self.get("num_key_value_heads", heads)),
            head_dim=int(self.get("head_dim", hidden // heads)),
            **self.rope(), norm_eps=float(self.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(self.get("tie_word_embeddings", True)), max_seq_len=max_seq_len,
            bos_token_id=self.token_id("bos_token_id", -1), eos_token_id=self.token_id("eos_token_id", -1),
            pad_token_id=self.token_id("pad_token_id", -1),
        )


def base_tensor_map(cfg) -> dict:
    """Embedding, final norm, LM head, and each layer's norms and attention (Llama names)."""
    m = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        m[q + "attn_norm.weight"] = p + "input_layernorm.weight"
        m[q + "ffn_norm.weight"] = p + "post_attention_layernorm.weight"
        for ours, hf in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            m[q + f"attn.{ours}.weight"] = p + f"self_attn.{hf}.weight"
            if cfg.qkv_bias and ours != "wo" or cfg.o_bias and ours == "wo":
                m[q + f"attn.{ours}.bias"] = p + f"self_attn.{hf}.bias"
        if cfg.qk_norm != "none":
            m[q + "attn.q_norm.weight"] = p + "self_attn.q_norm.weight"
            m[q + "attn.k_norm.weight"] = p + "self_attn.k_norm.weight"
    return m


def swiglu_map(ours: str, hf: str, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    """A SwiGLU FeedForward (ours.w1/w3/w2) from three HF Linear layers under `hf`."""
    return {f"{ours}.{w}.weight": f"{hf}.{n}.weight" for w, n in zip(("w1", "w3", "w2"), names)}


def experts_map(ours: str, hf: str, num_experts: int, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    """Our stacked experts (ours.w1/w3/w2 [E, ...]) from per-expert HF Linear layers hf.{e}.<name>."""
    return {f"{ours}.{w}": Stack(tuple(f"{hf}.{e}.{n}.weight" for e in range(num_experts)))
            for w, n in zip(("w1", "w3", "w2"), names)}


def routed_moe_map(cfg, layer: str, router: str, experts: str, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    """Base map + each layer's router and per-expert SwiGLU weights; `layer` is formatted with the
    layer index, `router` and `experts` are HF names under it."""
    m = base_tensor_map(cfg)
    for i in range(cfg.num_layers):
        p, q = layer.format(i), f"layers.{i}.moe"
        m[q + ".router.weight"] = p + router
        m.update(experts_map(q, p + experts, cfg.num_experts, names))
    return m


def rope_parameters(cfg) -> dict:
    """The inverse of HFConfig.rope: transformers' rope_parameters."""
    out = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        out["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_len)
    return out


def llama_hf_fields(cfg, dtype) -> dict:
    """The config.json fields every Llama-shaped family writes (the inverse of llama_fields)."""
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope_parameters(cfg),
        **{k: (None if v < 0 else v) for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                                 ("pad_token_id", cfg.pad_token_id))},
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
