"""How a model's tokenizer frames documents and chats: ours, or an imported checkpoint's own.

    ours       mobilemoe.tokenizer: documents <|bos|> text <|eos|>, chats in our format
               (mobilemoe.tokenizer.chat_template / encode_chat), generation stops at <|end|> / <|eos|>
    imported   an HF checkpoint's tokenizer.json: documents framed as its post-processor does
               (e.g. <s> text) + the config's eos_token_id; chats rendered by its Jinja chat
               template (chat_template.jinja, else tokenizer_config.json "chat_template") in
               jinja2's immutable sandbox with the globals transformers gives templates
               (raise_exception, strftime_now, tojson): no remote code runs. Generation stops at the
               config's, tokenizer_config.json's and generation_config.json's EOS ids.

encode_chat(tokenizer, messages) -> (ids, mask): for a template, the rendered text tokenized whole
(no special tokens added, as transformers' apply_chat_template), mask 1 on the tokens of each
assistant turn. A turn is the text the template adds between rendering messages[:k] with a
generation prompt and rendering messages[:k+1]: the answer and the template's end-of-turn marker,
which is what generation learns to stop at. A template whose renderings of a conversation's
prefixes are not prefixes of the whole (one that rewrites earlier turns) is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import (BOS_ID, EOS_ID, PAD_ID, STOP_TOKEN_IDS, encode_chat, load_model_tokenizer,
                        load_tokenizer)

TEMPLATE_FILE, TOKENIZER_CONFIG = "chat_template.jinja", "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")  # the template sees these strings


class ChatTemplateError(ValueError):
    """A chat template is missing, does not render, or cannot mark the assistant's turns (names the file)."""


@dataclass(frozen=True)
class TextFormat:
    bos: tuple[int, ...]  # ids before every document
    eos_id: int  # id after every document
    pad_id: int  # fills a packed row (never a target)
    stop_ids: tuple[int, ...]  # ids that end generation
    template: str = ""  # Jinja chat template; "" for ours
    source: str = ""  # where the template came from (errors name it)
    special: tuple[tuple[str, str], ...] = ()  # (bos_token, "<s>"), ...: the template's special strings

    @property
    def own(self) -> bool:
        return not self.source

    def document(self, ids: list[int]) -> list[int]:
        return [*self.bos, *ids, self.eos_id]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.template:
            raise ChatTemplateError(f"{self.source}: no 'chat_template' (nor a {TEMPLATE_FILE} beside it): "
                                    f"chats cannot be formatted for this model")
        try:
            return _compile(self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  **dict(self.special))
        except Exception as e:  # noqa: BLE001 - jinja2 raises many kinds, and the template its own
            raise ChatTemplateError(f"{self.source}: chat template failed ({type(e).__name__}: {e})") from None

    def encode_chat(self, tokenizer, messages: list[dict], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """Token ids of the chat and a same-length 0/1 mask, 1 on the assistant's turns (module doc)."""
        if self.own:
            return encode_chat(tokenizer, messages, add_generation_prompt)
        text = self.render(messages, add_generation_prompt)
        spans = []  # [start, end) characters of each assistant turn
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            prompt, turn = self.render(messages[:k], True), self.render(messages[:k + 1])
            if not (turn.startswith(prompt) and text.startswith(turn)):
                raise ChatTemplateError(f"{self.source}: the chat template renders message {k} differently "
                                        f"in a longer conversation; cannot mark the assistant's turns")
            spans.append((len(prompt), len(turn)))
        enc = tokenizer.encode(text, add_special_tokens=False)
        mask = [int(any(s < stop and e > start for start, stop in spans)) for s, e in enc.offsets]
        return enc.ids, mask

    def key(self) -> str:
        """What decides the ids of a text (part of the tokenized-data cache key)."""
        return json.dumps([self.bos, self.eos_id, self.pad_id, self.template, self.special])


OURS = TextFormat(bos=(BOS_ID,), eos_id=EOS_ID, pad_id=PAD_ID, stop_ids=STOP_TOKEN_IDS)


class GenerationTag(Extension):
    """transformers' {% generation %}...{% endgeneration %} (marks the assistant's text): rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise ValueError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    """The template in jinja2's immutable sandbox, set up as transformers sets it up."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{path}: not valid JSON ({e})") from None
    return raw if isinstance(raw, dict) else {}


def _template(d: Path, tok_config: dict) -> tuple[str, str]:
    """(template, where it came from): chat_template.jinja first (as transformers), then tokenizer_config.json's
    chat_template (a string, or a list of {name, template}: the one named "default")."""
    if (d / TEMPLATE_FILE).is_file():
        return (d / TEMPLATE_FILE).read_text(encoding="utf-8"), str(d / TEMPLATE_FILE)
    t = tok_config.get("chat_template") or ""
    if isinstance(t, list):
        t = next((x.get("template", "") for x in t if isinstance(x, dict) and x.get("name") == "default"), "")
    if not isinstance(t, str):
        raise ChatTemplateError(f"{d / TOKENIZER_CONFIG}: field 'chat_template' must be a string or a list of "
                                f"{{'name', 'template'}}, got {type(t).__name__}")
    return t, str(d / TOKENIZER_CONFIG)


def _bos(tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer's post-processor puts before a text (e.g. <s>; none for byte-level BPEs)."""
    plain, full = tokenizer.encode("a", add_special_tokens=False).ids, tokenizer.encode("a").ids
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return tuple(full[:at])


def _ids(value) -> list[int]:
    return [int(v) for v in (value if isinstance(value, list) else [value]) if v is not None]


def imported_format(d, config, tokenizer) -> TextFormat:
    """The TextFormat of an imported checkpoint dir `d` (its tokenizer and config read already)."""
    d = Path(d)
    tok_config = _read_json(d / TOKENIZER_CONFIG)
    special = {}
    for name in SPECIAL_NAMES:
        v = tok_config.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            special[name] = v
    for name, i in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id)):
        if name not in special and i >= 0 and tokenizer.id_to_token(i) is not None:
            special[name] = tokenizer.id_to_token(i)
    template, source = _template(d, tok_config)
    eos = config.eos_token_id if config.eos_token_id >= 0 else tokenizer.token_to_id(special.get("eos_token", ""))
    if eos is None:
        raise ChatTemplateError(f"{d / 'config.json'}: no eos_token_id (nor an eos_token in {TOKENIZER_CONFIG}): "
                                f"documents need an end-of-text id")
    stops = [eos, *_ids(_read_json(d / GENERATION_CONFIG).get("eos_token_id"))]
    if tokenizer.token_to_id(special.get("eos_token", "")) is not None:
        stops.append(tokenizer.token_to_id(special["eos_token"]))
    return TextFormat(bos=_bos(tokenizer), eos_id=eos,
                      pad_id=config.pad_token_id if config.pad_token_id >= 0 else eos,
                      stop_ids=tuple(dict.fromkeys(stops)), template=template, source=source,
                      special=tuple(sorted(special.items())))


def load_text_format(ckpt_dir, config, tokenizer_path=None):
    """(tokenizer, TextFormat) of a checkpoint dir (None: a model built from a preset): ours (its
    tokenizer.json, else the bundled one) or an imported model's (its own tokenizer.json, required).
    tokenizer_path: another tokenizer.json, whose directory then gives an imported model's chat template."""
    path = Path(tokenizer_path) if tokenizer_path else Path(ckpt_dir) / "tokenizer.json" if ckpt_dir else None
    if config.arch == "mobilemoe" or path is None:
        return load_tokenizer(path if tokenizer_path or (path and path.is_file()) else None), OURS
    tok, _ = load_model_tokenizer(path, config)
    return tok, imported_format(path.parent, config, tok)
