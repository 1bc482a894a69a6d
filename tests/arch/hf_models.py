"""Tiny random checkpoints that transformers itself writes, one per supported HF model_type.

Small enough to build in a second, shaped so that every Linear's input width is a multiple of the
INT4 group (32) and the vocabulary covers the held-out sample's tokenizer ids (mod 512).
Weights are re-drawn (norm weights around 1, biases non-zero) so that every option shows.
"""
from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=64, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
MOE = dict(num_experts_per_tok=2, intermediate_size=32)

# model_type -> (extra config kwargs, how transformers writes it)
TINY = {
    "granitemoeshared": (dict(MOE, num_local_experts=8, shared_intermediate_size=64, embedding_multiplier=12.0,
                              residual_multiplier=0.22, attention_multiplier=0.2, logits_scaling=6.0), {}),
    "granitemoe": (dict(MOE, num_local_experts=4, embedding_multiplier=4.0, residual_multiplier=0.5,
                        attention_multiplier=0.125, logits_scaling=2.0, tie_word_embeddings=True), {}),
    "olmoe": (dict(MOE, num_experts=8, norm_topk_prob=False), {}),
    "qwen2_moe": (dict(MOE, num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                       norm_topk_prob=False), {"max_shard_size": "40KB"}),  # sharded
    "qwen3_moe": (dict(MOE, num_experts=8, moe_intermediate_size=32, norm_topk_prob=True), {}),
    "mixtral": (dict(MOE, num_local_experts=4), {"dtype": torch.bfloat16}),  # bf16 on disk
    "llama": (dict(attention_bias=True, tie_word_embeddings=True, rope_parameters=dict(  # Llama 3.1+ RoPE
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)), {}),
    "qwen2": (dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
              {"dtype": torch.float16}),  # fp16 on disk
    "qwen3": (dict(), {}),
}


def variant_config(model_type: str):
    """Our MobileMoEConfig of the tiny HF config of `model_type`, read by its arch family (no transformers)."""
    from mobilemoe.arch import config_from_hf
    return config_from_hf({"model_type": model_type, **COMMON, **TINY[model_type][0]}, f"tiny {model_type} config.json")


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)


def save_tiny(model_type: str, out: Path, seed: int = 0) -> Path:
    """transformers' own tiny random model of `model_type` written to `out`; returns out."""
    from transformers import AutoConfig, AutoModelForCausalLM
    extra, how = TINY[model_type]
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model, seed)
    if "dtype" in how:
        model = model.to(how["dtype"])
    model.save_pretrained(out, max_shard_size=how.get("max_shard_size", "5GB"))
    return Path(out)


# A chat template that only joins the contents: ids inside the tiny models' 512-token vocabulary
CHATML = "{% for m in messages %}{{ m['content'] }} {% endfor %}"

# A ChatML-like template as instruct models ship, the assistant's turn marked for transformers'
# return_assistant_tokens_mask ({% generation %}), ending at <|im_end|> (the tokenizer's eos_token).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }} "
                 "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
                 "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
CHAT_WORDS = 512  # the vocabulary: specials, roles, then the words w8 .. w511


def write_tokenizer(d: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A word-level tokenizer.json as an HF model ships it (<s>=0, </s>=1, <pad>=2, its post-processor
    adds <s>) + tokenizer_config.json with `chat_template` (none: no template)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {**{t: i for i, t in enumerate(specials)}, "user": 5, "assistant": 6, "system": 7,
             **{f"w{i}": i for i in range(8, CHAT_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.add_special_tokens(specials)
    tok.save(str(Path(d) / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
              "pad_token": "<pad>", **({"chat_template": chat_template} if chat_template else {})}
    (Path(d) / "tokenizer_config.json").write_text(json.dumps(config))
    return Path(d)
