"""MobileMoE configuration: one dataclass, named presets, and the parameter / memory / FLOP accounting.

`python -m mobilemoe.config list` prints the presets table. Every count here is computed from the
config alone; tests check it against the parameters of the instantiated model.

Conventions used by the accounting (and by `train.scaling` budgets):
- total params: every parameter once (a tied embedding / LM head matrix counts once);
  `total_nonembed` leaves the embedding and LM head out.
- active params per token: what one token touches: attention, norms, router, the top-k routed
  experts, the shared expert, the embedding row it looks up is NOT counted (a lookup is no compute)
  but the LM head is. `active_nonembed` leaves the LM head out too.
- INT4 weight memory: every Linear weight (attention, experts, shared expert, dense FFN, embedding /
  LM head) as group-32 symmetric INT4 = 4 bits + one fp16 scale per 32 weights (4.5 bits/weight);
  router and norm weights stay float32 (see mobilemoe/quant.py for the format).
- FLOPs per token: 2 x active matmul params + attention (QK^T and PV: 4 * heads * head_dim * ctx).
  Decode at context `ctx`; prefill of `ctx` tokens averages (ctx + 1) / 2 keys per query.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import asdict, dataclass, fields

INT4_BITS_PER_WEIGHT = 4 + 16 / 32  # 4-bit codes + one fp16 scale per group of 32
FLOAT_BYTES = 4  # router and norms stay float32


QK_NORMS = ("none", "head", "proj")
ROPE_TYPES = ("default", "linear", "llama3")
ROUTERS = ("topk_softmax", "softmax_topk")


class ConfigError(ValueError):
    """A config file or field is invalid; the message names the file/field and what was expected."""


@dataclass
class MobileMoEConfig:
    name: str = "custom"
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 500000.0
    # RoPE frequency scaling (HF rope_parameters): "default" (none) | "linear" (all frequencies / factor) |
    # "llama3" (Llama 3.1+: low frequencies / factor, high kept, smooth between; the other rope_* fields)
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    # feed-forward: num_experts == 0 -> dense SwiGLU of width ffn_hidden
    ffn_hidden: int = 0
    num_experts: int = 8  # routed experts per layer
    top_k: int = 2
    expert_hidden: int = 256  # routed expert width (fine-grained: small)
    shared_expert_hidden: int = 256  # always-on shared expert width (0: none)
    # router settings (training)
    router_aux_loss_coef: float = 0.01  # load balancing (Switch-style)
    router_z_loss_coef: float = 0.001
    # special token ids (see mobilemoe/tokenizer.py)
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 2
    # architecture options: what the families of mobilemoe/arch/ set when they translate an HF
    # config.json; the defaults are MobileMoE's own architecture
    arch: str = "mobilemoe"  # the mobilemoe/arch family whose tensor names the checkpoint uses
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2, Qwen2-MoE)
    o_bias: bool = False  # bias on the output projection (Llama attention_bias)
    qk_norm: str = "none"  # "none" | "head": RMSNorm over head_dim (Qwen3) | "proj": over the projection (OLMoE)
    router: str = "topk_softmax"  # "topk_softmax": softmax over the top-k logits (ours, Granite) |
    #                               "softmax_topk": top-k of the softmax over all experts (OLMoE, Qwen-MoE, Mixtral)
    norm_topk_prob: bool = False  # softmax_topk: renormalise the k weights to sum to 1
    shared_expert_gate: bool = False  # the shared expert's output times sigmoid(x @ g) (Qwen2-MoE)
    embedding_multiplier: float = 1.0  # Granite: embeddings scaled by it
    residual_multiplier: float = 1.0  # Granite: each block's output scaled by it before the residual add
    attention_multiplier: float = 0.0  # Granite: attention score scale (0: 1/sqrt(head_dim))
    logits_scaling: float = 1.0  # Granite: logits divided by it

    # ---------------------------------------------------------------- validation
    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "config") -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
            if isinstance(v, bool) and f.type != "bool" or not isinstance(v, want):
                raise ConfigError(f"{source}: field '{f.name}' must be {f.type}, got {type(v).__name__} {v!r}")
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_seq_len"]
        for k in positive:
            if getattr(self, k) <= 0:
                raise ConfigError(f"{source}: field '{k}' must be > 0, got {getattr(self, k)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{source}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts < 0:
            raise ConfigError(f"{source}: num_experts must be >= 0, got {self.num_experts}")
        if self.is_moe:
            if not 1 <= self.top_k <= self.num_experts:
                raise ConfigError(f"{source}: top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
            if self.expert_hidden <= 0:
                raise ConfigError(f"{source}: expert_hidden must be > 0 for an MoE config, got {self.expert_hidden}")
        elif self.ffn_hidden <= 0:
            raise ConfigError(f"{source}: ffn_hidden must be > 0 when num_experts == 0 (dense), got {self.ffn_hidden}")
        for k, allowed in (("qk_norm", QK_NORMS), ("router", ROUTERS), ("rope_type", ROPE_TYPES)):
            if getattr(self, k) not in allowed:
                raise ConfigError(f"{source}: field '{k}' must be one of {list(allowed)}, got {getattr(self, k)!r}")
        if self.shared_expert_gate and not (self.is_moe and self.shared_expert_hidden):
            raise ConfigError(f"{source}: shared_expert_gate needs a shared expert (shared_expert_hidden > 0)")
        if self.logits_scaling <= 0 or self.attention_multiplier < 0:
            raise ConfigError(f"{source}: logits_scaling must be > 0 and attention_multiplier >= 0")

    def rope_scaling(self) -> dict | None:
        """mobilemoe.model.rope_table's `scaling` argument: None for plain RoPE."""
        if self.rope_type == "default":
            return None
        return {"rope_type": self.rope_type, "factor": self.rope_factor, "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor, "original_max_len": self.rope_original_max_len}

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "MobileMoEConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        cfg = cls.__new__(cls)
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            setattr(cfg, f.name, d.get(f.name, default))
        cfg.validate(source)
        return cfg

    @classmethod
    def from_name(cls, name: str) -> "MobileMoEConfig":
        """A preset by name, or a config.json path (e.g. one `python -m train.scaling design` wrote)."""
        if str(name).endswith(".json"):
            return load_config(name)
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name])

    def replace(self, **kw) -> "MobileMoEConfig":
        return dataclasses.replace(self, **kw)

    # ---------------------------------------------------------------- accounting
    def param_counts(self) -> dict:
        """Parameter counts by part, computed from the config alone."""
        H, L = self.hidden_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = H * q + 2 * H * kv + q * H + self.qkv_bias * (q + 2 * kv) + self.o_bias * H
        norms = 2 * H + {"none": 0, "head": 2 * self.head_dim, "proj": q + kv}[self.qk_norm]
        if self.is_moe:
            router = (self.num_experts + self.shared_expert_gate) * H  # the shared gate stays float too
            expert = 3 * H * self.expert_hidden
            routed_total, routed_active = self.num_experts * expert, self.top_k * expert
            shared = 3 * H * self.shared_expert_hidden
        else:
            router, routed_total, routed_active = 0, 0, 0
            shared = 3 * H * self.ffn_hidden  # the dense FFN is "always on", like a shared expert
        embed = self.vocab_size * H
        head = 0 if self.tie_embeddings else self.vocab_size * H
        return {
            "attention": L * attn, "norms": L * norms + H, "router": L * router,
            "routed_total": L * routed_total, "routed_active": L * routed_active,
            "shared": L * shared, "embedding": embed, "lm_head": head,
        }

    def total_params(self, include_embedding: bool = True) -> int:
        c = self.param_counts()
        total = sum(v for k, v in c.items() if k != "routed_active")
        return total if include_embedding else total - c["embedding"] - c["lm_head"]

    def active_params(self, include_lm_head: bool = True) -> int:
        c = self.param_counts()
        active = c["attention"] + c["norms"] + c["router"] + c["routed_active"] + c["shared"]
        if include_lm_head:
            active += self.vocab_size * self.hidden_size  # tied or not, the head matmul runs
        return active

    def int4_weight_bytes(self) -> int:
        c = self.param_counts()
        linear = c["attention"] + c["routed_total"] + c["shared"] + c["embedding"] + c["lm_head"]
        return math.ceil(linear * INT4_BITS_PER_WEIGHT / 8) + (c["router"] + c["norms"]) * FLOAT_BYTES

    def int4_active_bytes(self) -> int:
        """Weight bytes one decode step reads (INT4 + scales, float router/norms): decode's roofline."""
        c = self.param_counts()
        linear = c["attention"] + c["routed_active"] + c["shared"] + self.vocab_size * self.hidden_size
        return math.ceil(linear * INT4_BITS_PER_WEIGHT / 8) + (c["router"] + c["norms"]) * FLOAT_BYTES

    def flops_per_token(self, ctx: int, prefill: bool = False) -> int:
        """Forward FLOPs for one token at context `ctx` (decode) or averaged over a `ctx`-token prefill."""
        c = self.param_counts()
        matmul = c["attention"] + c["router"] + c["routed_active"] + c["shared"] + self.vocab_size * self.hidden_size
        keys = (ctx + 1) / 2 if prefill else ctx
        attn = 4 * self.num_layers * self.num_heads * self.head_dim * keys
        return int(2 * matmul + attn)


def _moe(name, **kw) -> MobileMoEConfig:
    return MobileMoEConfig(name=name, **kw)


# Paper-scale presets. Shapes are reconstructed from the MobileMoE paper's figures (0.3-0.9B active,
# 1.3-5.3B total, counted without the embedding table as the paper's ranges only fit that way with a
# 202k vocabulary) with the MobileLLM-Pro tokenizer size (202048, tied embeddings), so that INT4
# weight memory compares with the dense baseline. Recipe shared by S/M/L: deep-and-thin (depth beats
# width at this size, MobileLLM), GQA with 4 KV heads of 64, 32-40 fine-grained experts of width
# H/2 (a dense 4H FFN cut in 8: granularity 8), top-4, plus one shared expert of width H: 4 + 2
# (the shared one is worth two routed) of ~34-42 expert-units active = moderate sparsity (~1/6).
_PAPER_VOCAB = 202048

PRESETS: dict[str, MobileMoEConfig] = {
    # S: ~0.3B active / ~1.35B total (non-embedding). 24 layers x 1024, 32 experts of 512, top-4.
    "mobilemoe-s": _moe("mobilemoe-s", vocab_size=_PAPER_VOCAB, hidden_size=1024, num_layers=24,
                        num_heads=16, num_kv_heads=4, head_dim=64, num_experts=32, top_k=4,
                        expert_hidden=512, shared_expert_hidden=1024, max_seq_len=4096),
    # M: ~0.6B active / ~2.8B total. MobileLLM-Pro's width (1280), 32 layers, 32 experts of 640.
    "mobilemoe-m": _moe("mobilemoe-m", vocab_size=_PAPER_VOCAB, hidden_size=1280, num_layers=32,
                        num_heads=20, num_kv_heads=4, head_dim=64, num_experts=32, top_k=4,
                        expert_hidden=640, shared_expert_hidden=1280, max_seq_len=4096),
    # L: ~0.9B active / ~5.2B total. 1536 wide, 34 layers, 40 experts of 768 (sparser: 4 of 40).
    "mobilemoe-l": _moe("mobilemoe-l", vocab_size=_PAPER_VOCAB, hidden_size=1536, num_layers=34,
                        num_heads=24, num_kv_heads=4, head_dim=64, num_experts=40, top_k=4,
                        expert_hidden=768, shared_expert_hidden=1536, max_seq_len=4096),
    # Dense baseline shaped like MobileLLM-Pro (~1.08B): 30 layers x 1280, 20/4 heads, FFN 6144.
    "mobilellm-pro": _moe("mobilellm-pro", vocab_size=_PAPER_VOCAB, hidden_size=1280, num_layers=30,
                          num_heads=20, num_kv_heads=4, head_dim=64, num_experts=0, top_k=0,
                          expert_hidden=0, shared_expert_hidden=0, ffn_hidden=6144, max_seq_len=4096),
    # The bundled default model (trained by train.pipeline on the project corpus, vocab 8192): ~8.4M
    # params, 16 fine-grained experts of 96 (top-2) + a shared expert of 256; bf16 on disk ~17 MB.
    "mobilemoe-tiny": _moe("mobilemoe-tiny", vocab_size=8192, hidden_size=256, num_layers=4,
                           num_heads=4, num_kv_heads=2, head_dim=64, num_experts=16, top_k=2,
                           expert_hidden=96, shared_expert_hidden=256, max_seq_len=1024),
    # Dense twin of mobilemoe-tiny with the same active parameters per token (FFN 256 + 2 x 96).
    "mobilemoe-tiny-dense": _moe("mobilemoe-tiny-dense", vocab_size=8192, hidden_size=256, num_layers=4,
                                 num_heads=4, num_kv_heads=2, head_dim=64, num_experts=0, top_k=0,
                                 expert_hidden=0, shared_expert_hidden=0, ffn_hidden=448, max_seq_len=1024),
    # Issue 17's MoE-vs-dense pairs on the ~55M-token corpus (vocab 8192, 1024 context). Each dense twin
    # has the MoE's active parameters per token (FFN = shared expert + top_k x expert width).
    # mini: ~22M total / ~10M active.
    "mobilemoe-mini": _moe("mobilemoe-mini", vocab_size=8192, hidden_size=384, num_layers=6,
                           num_heads=6, num_kv_heads=2, head_dim=64, num_experts=16, top_k=2,
                           expert_hidden=128, shared_expert_hidden=384, max_seq_len=1024),
    "mobilemoe-mini-dense": _moe("mobilemoe-mini-dense", vocab_size=8192, hidden_size=384, num_layers=6,
                                 num_heads=6, num_kv_heads=2, head_dim=64, num_experts=0, top_k=0,
                                 expert_hidden=0, shared_expert_hidden=0, ffn_hidden=640, max_seq_len=1024),
    # 50m: ~55M total / ~22M active (16 experts of 192, top-2, shared 512).
    "mobilemoe-50m": _moe("mobilemoe-50m", vocab_size=8192, hidden_size=512, num_layers=8,
                          num_heads=8, num_kv_heads=4, head_dim=64, num_experts=16, top_k=2,
                          expert_hidden=192, shared_expert_hidden=512, max_seq_len=1024),
    # small: the next bundled default model candidate, 50m with 12 experts: ~45M total (bf16 ~90 MB),
    # the same ~22M active, so mobilemoe-small-dense is the twin of both.
    "mobilemoe-small": _moe("mobilemoe-small", vocab_size=8192, hidden_size=512, num_layers=8,
                            num_heads=8, num_kv_heads=4, head_dim=64, num_experts=12, top_k=2,
                            expert_hidden=192, shared_expert_hidden=512, max_seq_len=1024),
    "mobilemoe-small-dense": _moe("mobilemoe-small-dense", vocab_size=8192, hidden_size=512, num_layers=8,
                                  num_heads=8, num_kv_heads=4, head_dim=64, num_experts=0, top_k=0,
                                  expert_hidden=0, shared_expert_hidden=0, ffn_hidden=896, max_seq_len=1024),
    # Test presets: seconds to build and run.
    "test-moe": _moe("test-moe", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, num_experts=8, top_k=2, expert_hidden=32,
                     shared_expert_hidden=64, max_seq_len=256),
    "test-moe-noshared": _moe("test-moe-noshared", vocab_size=512, hidden_size=64, num_layers=2,
                              num_heads=4, num_kv_heads=4, head_dim=16, num_experts=4, top_k=1,
                              expert_hidden=32, shared_expert_hidden=0, tie_embeddings=False,
                              max_seq_len=256),
    "test-dense": _moe("test-dense", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, num_experts=0, top_k=0, expert_hidden=0,
                       shared_expert_hidden=0, ffn_hidden=128, max_seq_len=256),
}

# Shapes of public Hugging Face MoE models (dims from their config.json; random weights: for shape
# builds and speed measurements, `compiler.build --preset NAME`). Context capped at 4096 like ours.
_GRANITE = dict(arch="granitemoe", num_kv_heads=8, head_dim=64, expert_hidden=512, top_k=8,
                shared_expert_hidden=0, vocab_size=49155, rope_theta=10000000.0, norm_eps=1e-6,
                embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                logits_scaling=6.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, max_seq_len=4096)
PRESETS.update({
    # ibm-granite/granite-3.1-1b-a400m: 24 x 1024, 16/8 heads, 32 experts of 512, top-8
    "granite-3.1-1b-a400m": _moe("granite-3.1-1b-a400m", hidden_size=1024, num_layers=24, num_heads=16,
                                 num_experts=32, **_GRANITE),
    # ibm-granite/granite-3.1-3b-a800m: 32 x 1536, 24/8 heads, 40 experts of 512, top-8
    "granite-3.1-3b-a800m": _moe("granite-3.1-3b-a800m", hidden_size=1536, num_layers=32, num_heads=24,
                                 num_experts=40, **_GRANITE),
    # allenai/OLMoE-1B-7B-0924: 16 x 2048, 16 heads of 128, q/k norm, 64 experts of 1024, top-8
    "olmoe-1b-7b": _moe("olmoe-1b-7b", arch="olmoe", vocab_size=50304, hidden_size=2048, num_layers=16,
                        num_heads=16, num_kv_heads=16, head_dim=128, num_experts=64, top_k=8,
                        expert_hidden=1024, shared_expert_hidden=0, tie_embeddings=False,
                        rope_theta=10000.0, qk_norm="proj", router="softmax_topk", max_seq_len=4096,
                        bos_token_id=0, eos_token_id=50279, pad_token_id=1),
    # Qwen/Qwen1.5-MoE-A2.7B: 24 x 2048, 16 heads of 128, qkv bias, 60 experts of 1408, top-4,
    # shared expert of 5632 behind a sigmoid gate
    "qwen1.5-moe-a2.7b": _moe("qwen1.5-moe-a2.7b", arch="qwen2_moe", vocab_size=151936, hidden_size=2048,
                              num_layers=24, num_heads=16, num_kv_heads=16, head_dim=128, num_experts=60,
                              top_k=4, expert_hidden=1408, shared_expert_hidden=5632, tie_embeddings=False,
                              rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, router="softmax_topk",
                              shared_expert_gate=True, max_seq_len=4096, bos_token_id=151643,
                              eos_token_id=151643, pad_token_id=151643),
})


def load_config(path) -> MobileMoEConfig:
    """Load our config.json (the `mobilemoe` block of an HF-compatible checkpoint config, or a bare one)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if isinstance(d, dict) and "mobilemoe" in d:
        d = d["mobilemoe"]
    return MobileMoEConfig.from_dict(d, source=str(path))


def format_count(n: float, unit: str = "") -> str:
    """A count as preset_table prints it: 2 decimals, a K / M / G / T suffix, then unit (1.23G); whole below 1000."""
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n:.0f}{unit}"


def preset_table(names=None, ctx: int = 1024, prompt: int = 512) -> str:
    rows = [("preset", "total", "total-nonembed", "active", "active-nonembed", "INT4 MB",
             "decode FLOPs/tok", "prefill FLOPs/tok")]
    for n in names or PRESETS:
        c = PRESETS[n]
        rows.append((n, format_count(c.total_params()), format_count(c.total_params(False)),
                     format_count(c.active_params()), format_count(c.active_params(False)),
                     f"{c.int4_weight_bytes() / 2**20:.1f}", format_count(c.flops_per_token(ctx)),
                     format_count(c.flops_per_token(prompt, prefill=True))))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w[i]) if i else v.ljust(w[i]) for i, v in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines) + f"\n(decode at context {ctx}; prefill averaged over a {prompt}-token prompt)"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mobilemoe.config", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="table of presets: params, INT4 memory, FLOPs per token")
    ls.add_argument("--ctx", type=int, default=1024, help="decode context length")
    ls.add_argument("--prompt", type=int, default=512, help="prefill prompt length")
    show = sub.add_parser("show", help="print one preset as JSON")
    show.add_argument("name")
    a = p.parse_args(argv)
    if a.cmd == "list":
        print(preset_table(ctx=a.ctx, prompt=a.prompt))
    else:
        try:
            print(json.dumps(MobileMoEConfig.from_name(a.name).to_dict(), indent=2))
        except ConfigError as e:
            p.error(str(e))


if __name__ == "__main__":
    main()
