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

from .checkpoint import CheckpointError, load_checkpoint
from .model import MobileMoE
from .text_format import load_text_format
from .tokenizer import chat_template

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


def generate_with(step, prompt: list[int], max_new_tokens: int, max_seq_len: int, temperature: float = 0.0,
                  top_p: float = 1.0, eos_id=None, seed: int | None = None,
                  on_token=None) -> tuple[list[int], GenerationStats]:
    """The generation loop over any backend. step(token_ids, kv) -> (last-position logits [V], kv);
    kv=None on the first (prefill) call. eos_id: an id or a collection of ids that stop generation."""
    if not prompt:
        raise ValueError("generate: the prompt must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > max_seq_len:
        raise ValueError(f"generate: prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_seq_len ({max_seq_len})")
    stop = set() if eos_id is None else ({eos_id} if isinstance(eos_id, int) else set(eos_id))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    t0 = time.perf_counter()
    logits, kv = step(prompt, None)
    out = [sample(torch.as_tensor(logits), temperature, top_p, gen)]
    t1 = time.perf_counter()
    if on_token:
        on_token(out[-1])
    while len(out) < max_new_tokens and out[-1] not in stop:
        logits, kv = step([out[-1]], kv)
        out.append(sample(torch.as_tensor(logits), temperature, top_p, gen))
        if on_token:
            on_token(out[-1])
    t2 = time.perf_counter()
    return out, GenerationStats(len(prompt), len(out), t1 - t0, t2 - t1)


@torch.no_grad()
def generate(model: MobileMoE, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id=None, seed: int | None = None,
             on_token=None) -> tuple[list[int], GenerationStats]:
    """Prefill `prompt`, then decode one token at a time with the KV cache. Returns new token ids."""
    device = model.embed.weight.device

    def step(ids, kv):
        logits, kv = model(torch.tensor([ids], device=device), kv=kv, last_only=True)
        return logits[0, -1], kv

    return generate_with(step, prompt, max_new_tokens, model.config.max_seq_len, temperature, top_p,
                         eos_id, seed, on_token)


@torch.no_grad()
def teacher_forced_top1(model: MobileMoE, prompt: list[int], tokens: list[int]) -> float:
    """Share of `tokens` (generated after `prompt` by another backend) that are also the model's
    greedy choice at their position, given the same preceding tokens."""
    if not tokens:
        return float("nan")
    seq = torch.tensor([prompt + tokens[:-1]], device=model.embed.weight.device)
    pred = model(seq)[0][0, len(prompt) - 1:].argmax(-1)  # the prediction for each of `tokens`
    return float((pred.cpu() == torch.tensor(tokens)).float().mean())


def prompt_ids(tokenizer, text: str, chat: bool, bos_id: int, own: bool = True, fmt=None) -> list[int]:
    """Token ids for a prompt: BOS + text, or the chat template with a generation prompt.
    own=False (an imported HF model's tokenizer): the tokenizer's own post-processor adds BOS, and a
    chat is rendered by `fmt`, the model's TextFormat (its Jinja chat template: mobilemoe/text_format.py)."""
    if not own:
        if chat:
            if fmt is None:
                raise ValueError("--chat: an imported model's chat needs its TextFormat (mobilemoe.text_format)")
            return fmt.encode_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)[0]
        return tokenizer.encode(text).ids
    if chat:
        return tokenizer.encode(chat_template([{"role": "user", "content": text}], add_generation_prompt=True)).ids
    return [bos_id] + tokenizer.encode(text).ids


class PromptError(ValueError):
    """A command-line prompt that cannot be generated from; the message names the option."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (--max-new-tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def checked_prompt_ids(tokenizer, text: str, chat: bool, bos_id: int, max_new_tokens: int,
                       max_seq_len: int, vocab_size: int | None = None, own: bool = True, fmt=None) -> list[int]:
    """prompt_ids() for a command line: the text must be UTF-8, its ids inside the model's vocabulary
    and, with max_new_tokens, fit the model's context; otherwise a PromptError saying what to change."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates
        byte = text[e.start].encode("utf-8", "surrogateescape").hex()
        raise PromptError(f"--prompt: not valid UTF-8 (byte 0x{byte} at character {e.start}); "
                          f"pass the prompt as UTF-8 text") from None
    ids = prompt_ids(tokenizer, text, chat, bos_id, own, fmt)
    if vocab_size is not None and max(ids) >= vocab_size:
        raise PromptError(f"--prompt: the tokenizer gives token id {max(ids)}, outside the model's vocabulary "
                          f"of {vocab_size}: the tokenizer.json beside the model does not belong to it")
    if len(ids) + max_new_tokens > max_seq_len:
        room = max_seq_len - len(ids)
        hint = (f"lower --max-new-tokens to at most {room}" if room >= 1
                else f"shorten the prompt to under {max_seq_len - 1} tokens")
        raise PromptError(f"--prompt: {len(ids)} tokens + --max-new-tokens {max_new_tokens} exceed the model's "
                          f"context of {max_seq_len} tokens (max_seq_len); {hint}")
    return ids


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mobilemoe.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL_DIR, help="checkpoint dir (default: bundled model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (an imported "
                   "model's own: chat_template.jinja or tokenizer_config.json)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        model = load_checkpoint(a.checkpoint)
        tok, fmt = load_text_format(a.checkpoint, model.config, a.checkpoint / "tokenizer.json")
        ids = checked_prompt_ids(tok, a.prompt, a.chat, model.config.bos_token_id, a.max_new_tokens,
                                 model.config.max_seq_len, model.config.vocab_size,
                                 own=model.config.arch == "mobilemoe", fmt=fmt)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    new, stats = generate(model, ids, a.max_new_tokens, a.temperature, a.top_p, eos_id=fmt.stop_ids, seed=a.seed)
    print(a.prompt + tok.decode(new, skip_special_tokens=True))
    print(f"[{stats}]", file=sys.stderr)


if __name__ == "__main__":
    main()
