"""Byte-level BPE tokenizer (HF ``tokenizers``) and the chat format of MobileMoE.

Tokenizer: GPT-2 style byte-level BPE (ByteLevel pre-tokenizer, no normalizer,
ByteLevel decoder), so any Unicode string round-trips exactly through
encode/decode. Encoding adds no BOS/EOS by itself: callers add them.
Ids 0..6 are the special tokens, in the order of :data:`SPECIAL_TOKENS`; the
256 byte symbols follow, then the learned merges.

Chat format (one string, no separators; :func:`chat_template`)::

    <|bos|><|system|>{system}<|end|><|user|>{question}<|end|><|assistant|>{answer}<|end|>...

with ``<|assistant|>`` appended when a generation prompt is asked for; a reply
ends at ``<|end|>`` (generation should stop on ``<|end|>`` or ``<|eos|>``).
:func:`encode_chat` returns the ids plus a loss mask that is 1 exactly on the
assistant's answer tokens and their closing ``<|end|>`` (aligned with the ids:
mask[i] says whether token i is a training target).

The bundled tokenizer (vocab 8192, trained on the corpus of ``train.corpus``)
is ``mobilemoe/assets/tokenizer.json``; rebuild it with::

    python -m train.corpus --out data/corpus
    python -m mobilemoe.tokenizer train --corpus data/corpus --vocab-size 8192 \\
        --out mobilemoe/assets/tokenizer.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)  # ids 0..6
BOS_ID, EOS_ID, PAD_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = range(len(SPECIAL_TOKENS))
STOP_TOKEN_IDS = (EOS_ID, END_ID)  # generation ends at either
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# Jinja version of chat_template() for HF transformers (apply_chat_template).
CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def default_tokenizer_path() -> Path:
    """The tokenizer bundled with the package: ``mobilemoe/assets/tokenizer.json``."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer.json"


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unk token: byte-level BPE covers every byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _is_file(item) -> bool:
    try:
        return isinstance(item, (str, os.PathLike)) and len(str(item)) < 4096 and Path(item).is_file()
    except OSError:
        return False


def _iter_texts(files_or_iterator) -> Iterator[str]:
    """Texts from files or strings.

    A list/tuple whose items all name existing files (str or Path) is read as files:
    ``*.jsonl`` yields the "text" field of each line (train.corpus format), any other
    file its whole content. Otherwise items are texts, except Path objects (files).
    """
    items = files_or_iterator
    as_files = isinstance(items, (list, tuple)) and len(items) > 0 and all(_is_file(x) for x in items)
    for item in items:
        if as_files or isinstance(item, os.PathLike):
            path = Path(item)
            if path.suffix == ".jsonl":
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            yield json.loads(line)["text"]
            else:
                yield path.read_text(encoding="utf-8")
        else:
            yield item


def train_tokenizer(files_or_iterator, vocab_size: int, out_path: str | os.PathLike | None = None,
                    min_frequency: int = 2, show_progress: bool = True, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer and save it to out_path (if given).

    files_or_iterator: a list of files (``.jsonl`` corpus files or plain text files, str or
    Path), or any iterable of document strings (see _iter_texts).
    vocab_size includes the 7 special tokens and the 256 byte symbols.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is below {len(SPECIAL_TOKENS) + 256} "
                         "(special tokens + 256 bytes)")
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(_iter_texts(files_or_iterator), trainer=trainer, length=length)
    check_special_tokens(tok)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tok.save(str(tmp), pretty=False)
        os.replace(tmp, out_path)
    return tok


def check_special_tokens(tok: Tokenizer, where: str = "tokenizer") -> None:
    """Raise ValueError unless SPECIAL_TOKENS have ids 0..6 and are special added tokens."""
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise ValueError(f"{where}: special token {t!r} has id {tok.token_to_id(t)}, expected {i}")
    added = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    missing = [t for t in SPECIAL_TOKENS if t not in added]
    if missing:
        raise ValueError(f"{where}: {missing} are in the vocab but not registered as special tokens")


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer.json (or a directory holding one); default: the bundled tokenizer.

    Raises FileNotFoundError when the file is missing and ValueError when it is not
    a tokenizer JSON or lacks MobileMoE's special tokens; both name the path.
    """
    path = Path(path) if path is not None else default_tokenizer_path()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        hint = " (build it: python -m mobilemoe.tokenizer train ...)" if path == default_tokenizer_path() else ""
        raise FileNotFoundError(f"tokenizer file not found: {path}{hint}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a valid tokenizers JSON file: {e}") from None
    check_special_tokens(tok, where=str(path))
    return tok


def load_model_tokenizer(path: str | os.PathLike, config) -> tuple[Tokenizer, tuple[int, ...]]:
    """A checkpoint's or artifact's tokenizer and the ids that end generation. Ours (config.arch
    "mobilemoe"): load_tokenizer, STOP_TOKEN_IDS. An imported HF model (mobilemoe/arch): its
    tokenizer.json as transformers wrote it, stopping at its config's eos_token_id."""
    if config.arch == "mobilemoe":
        return load_tokenizer(path), STOP_TOKEN_IDS
    path = Path(path)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a valid tokenizers JSON file: {e}") from None
    return tok, tuple(i for i in (config.eos_token_id,) if i >= 0)


def _check_messages(messages: list[dict]) -> None:
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS or not isinstance(m.get("content"), str):
            raise ValueError(f"message {k} must be {{'role': one of {sorted(ROLE_TOKENS)}, "
                             f"'content': str}}, got {m!r}")


def chat_template(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render messages ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` as one
    string in the chat format (module docstring); add ``<|assistant|>`` to prompt a reply."""
    _check_messages(messages)
    text = BOS + "".join(ROLE_TOKENS[m["role"]] + m["content"] + END for m in messages)
    return text + ASSISTANT if add_generation_prompt else text


def encode_chat(tokenizer: Tokenizer, messages: list[dict],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of chat_template(messages) and a same-length 0/1 loss mask.

    The mask is 1 on each assistant message's content tokens and its closing ``<|end|>``,
    0 elsewhere (BOS, role tokens, system and user turns). Message contents are encoded
    as plain text: special-token strings inside a content do not become special ids.
    For ordinary content the ids equal ``tokenizer.encode(chat_template(messages)).ids``.
    (Briefly sets ``tokenizer.encode_special_tokens``: do not share one Tokenizer across threads here.)
    """
    _check_messages(messages)
    ids_of = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    ids, mask = [ids_of[BOS]], [0]
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # contents cannot inject special tokens
    try:
        contents = tokenizer.encode_batch([m["content"] for m in messages], add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = previous
    for m, enc in zip(messages, contents):
        target = 1 if m["role"] == "assistant" else 0
        ids.append(ids_of[ROLE_TOKENS[m["role"]]])
        mask.append(0)
        ids.extend(enc.ids)
        mask.extend([target] * len(enc.ids))
        ids.append(ids_of[END])
        mask.append(target)
    if add_generation_prompt:
        ids.append(ids_of[ASSISTANT])
        mask.append(0)
    return ids, mask


def write_hf_tokenizer_files(tokenizer: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir,
    so that ``transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)`` (and
    AutoTokenizer) opens it with our BOS/EOS/PAD and chat template. Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)
    extra = [SYSTEM, USER, ASSISTANT, END]
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": extra,  # transformers 4.x name
        "extra_special_tokens": extra,  # transformers 5.x name
        "chat_template": CHAT_TEMPLATE_JINJA,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1_000_000_000,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({**special, "additional_special_tokens": extra}, indent=2) + "\n", encoding="utf-8")
    return out_dir


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over texts (higher = better compression)."""
    texts = list(texts)
    n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return sum(len(t.encode("utf-8")) for t in texts) / max(n_tokens, 1)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mobilemoe.tokenizer", description="MobileMoE byte-level BPE")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on a corpus dir from train.corpus (its train.jsonl)")
    t.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", type=Path, default=default_tokenizer_path())
    t.add_argument("--hf-dir", type=Path, help="also write HF transformers tokenizer files here")
    e = sub.add_parser("eval", help="bytes/token of a tokenizer on a corpus split")
    e.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    e.add_argument("--split", default="heldout")
    e.add_argument("--tokenizer", type=Path, default=default_tokenizer_path())
    args = p.parse_args(argv)

    if args.cmd == "train":
        train_file = args.corpus / "train.jsonl"
        if not train_file.is_file():
            print(f"error: {train_file} not found; build the corpus first: "
                  f"python -m train.corpus --out {args.corpus}", file=sys.stderr)
            return 1
        tok = train_tokenizer([train_file], args.vocab_size, args.out, min_frequency=args.min_frequency,
                              length=_count_lines(train_file))
        print(f"wrote {args.out} (vocab {tok.get_vocab_size()}, {args.out.stat().st_size / 1024:.0f} KiB)")
        if args.hf_dir:
            print(f"wrote HF tokenizer files to {write_hf_tokenizer_files(tok, args.hf_dir)}")
        args.tokenizer, args.split = args.out, "heldout"
    split_file = args.corpus / f"{args.split}.jsonl"
    if not split_file.is_file():
        print(f"{'warning' if args.cmd == 'train' else 'error'}: {split_file} not found, no bytes/token",
              file=sys.stderr)
        return 0 if args.cmd == "train" else 1
    bpt = bytes_per_token(load_tokenizer(args.tokenizer), _iter_texts([split_file]))
    print(f"{split_file}: {bpt:.3f} bytes/token")
    return 0

if __name__ == "__main__":
    sys.exit(main())
