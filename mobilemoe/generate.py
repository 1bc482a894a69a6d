"""Reference PyTorch inference: prefill + decode with the KV cache, greedy or top-p sampling.

    python -m mobilemoe.generate --checkpoint DIR --prompt "..." [--max-new-tokens 64]
        [--temperature 0.8 --top-p 0.9 --seed 0] [--chat]

Without --checkpoint the bundled default model is used. Prints the text, then prefill and decode
tokens/s. `generate()` is the API used by tests, the evaluation harness and the compiler's checks.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import MobileMoE

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        # the first new token comes from prefill; decode produced the rest
        return max(self.new_tokens - 1, 0) / max(self.decode_s, 1e-9)

    def __str__(self) -> str:
        return (f"prefill {self.prompt_tokens} tok in {self.prefill_s * 1e3:.1f} ms ({self.prefill_tok_s:.1f} tok/s), "
                f"decode {max(self.new_tokens - 1, 0)} tok in {self.decode_s * 1e3:.1f} ms ({self.decode_tok_s:.1f} tok/s)")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """logits [V] -> token id. temperature 0 = greedy; otherwise nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # smallest set whose mass reaches top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        return int(idx[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: MobileMoE, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int | None = None,
             on_token=None) -> tuple[list[int], GenerationStats]:
    """Prefill `prompt`, then decode one token at a time with the KV cache. Returns new token ids."""
    if not prompt:
        raise ValueError("generate: the prompt must hold at least one token")
    limit = model.config.max_seq_len
    if len(prompt) + max_new_tokens > limit:
        raise ValueError(f"generate: prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_seq_len ({limit})")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    device = model.embed.weight.device
    t0 = time.perf_counter()
    logits, kv = model(torch.tensor([prompt], device=device), last_only=True)
    out = [sample(logits[0, -1], temperature, top_p, gen)]
    t1 = time.perf_counter()
    if on_token:
        on_token(out[-1])
    while len(out) < max_new_tokens and out[-1] != eos_id:
        logits, kv = model(torch.tensor([[out[-1]]], device=device), kv=kv)
        out.append(sample(logits[0, -1], temperature, top_p, gen))
        if on_token:
            on_token(out[-1])
    t2 = time.perf_counter()
    return out, GenerationStats(len(prompt), len(out), t1 - t0, t2 - t1)


def main(argv=None):
    from .checkpoint import CheckpointError, load_checkpoint
    from .tokenizer import chat_template, load_tokenizer

    p = argparse.ArgumentParser(prog="python -m mobilemoe.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL_DIR, help="checkpoint dir (default: bundled model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        model = load_checkpoint(a.checkpoint)
        tok = load_tokenizer(a.checkpoint / "tokenizer.json")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    text = chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True) if a.chat else a.prompt
    ids = tok.encode(text).ids
    if not a.chat:
        ids = [model.config.bos_token_id] + ids
    new, stats = generate(model, ids, a.max_new_tokens, a.temperature, a.top_p,
                          eos_id=model.config.eos_token_id, seed=a.seed)
    print(a.prompt + tok.decode(new, skip_special_tokens=True))
    print(f"[{stats}]", file=sys.stderr)


if __name__ == "__main__":
    main()
