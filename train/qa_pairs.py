"""Question/answer pairs with checkable answers, derived from corpus documents (train.corpus).

Three kinds of items, each asked both ways (a "forward" question whose answer is the
documentation's description, and a "reverse" question whose answer names the thing):

  option    a manual page's option list ("-a, --all" + indented description):
            "What does `ls -a` do?" -> "`-a`, `--all`: do not ignore entries starting with ."
            "Which option of `ls` does this: do not ignore entries starting with .?" -> "`-a` (`--all`)."
  command   a manual page's NAME line ("ls - list directory contents"):
            "What does the `ls` command do?" -> "`ls`: list directory contents."
            "Which command does this: list directory contents?" -> "`ls`."
  api       an API entry (`name(args)` + indented description; Sphinx and HTML docs):
            "Which Python function does this: Join one or more path segments intelligently?"
            -> "`os.path.join()`." (forward API questions come from train.sft_data)

Every record carries a ``check`` for :func:`mobilemoe.answer_check.check_answer`:
``{"any_of": [names]}`` (reverse: the answer must name one of them) or ``{"words": [...],
"min_share": 0.5}`` (forward: the answer must contain at least half of the description's
content words). ``item`` identifies the documented thing, so that both questions about one
item always land in the same split (see :func:`qa_split`).
"""
from __future__ import annotations

import hashlib
import re
import textwrap
from collections.abc import Iterator

from mobilemoe.answer_check import content_words

OPTION_TAG = re.compile(r"^(--?[A-Za-z0-9?#][^\s,]*)(,\s*--?[A-Za-z0-9][^\s,]*)*(\s+\S+)?$")
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z0-9?#][\w-]*)")
NAME_LINE = re.compile(r"^([\w.:+\[\]-]+(?:,\s*[\w.:+\[\]-]+)*)\s+-{1,2}\s+(.+)$")
SIGNATURE = re.compile(r"^`([A-Za-z_][\w.]*)(\(.*\))?`\s*$")
MAX_DESC = 400
QA_HELDOUT_FRAC = 0.05

OPTION_FORWARD = ("What does `{cmd} {opt}` do?", "What does the `{opt}` option of `{cmd}` do?",
                  "Explain `{cmd} {opt}`.")
OPTION_REVERSE = ("Which option of `{cmd}` does this: {desc}?", "Which `{cmd}` option means: {desc}?")
COMMAND_FORWARD = {"1": "What does the `{name}` command do?", "8": "What does the `{name}` command do?",
                   "2": "What does the system call `{name}()` do?", "3": "What does the C function `{name}()` do?",
                   "3perl": "What is the Perl module `{name}` for?", "": "What is `{name}`?"}
COMMAND_REVERSE = {"1": "Which command does this: {desc}?", "8": "Which administration command does this: {desc}?",
                   "2": "Which system call does this: {desc}?", "3": "Which C library function does this: {desc}?",
                   "3perl": "Which Perl module is this: {desc}?", "": "Which manual page is about this: {desc}?"}
API_REVERSE = ("Which {project} function does this: {desc}?", "Name the {project} API that does this: {desc}?")
NAME_REVERSE = ("Which {project} name is described as: {desc}?", "In {project}, what is this called: {desc}?")


def _pick(options, *key: str) -> str:
    h = int.from_bytes(hashlib.sha256("\0".join(key).encode()).digest()[:4], "big")
    return options[h % len(options)]


def qa_split(source: str, item: str, heldout_frac: float = QA_HELDOUT_FRAC) -> str:
    """"heldout_qa" for ~heldout_frac of items (by a hash of source/item), else "train"."""
    h = int.from_bytes(hashlib.sha256(f"qa\0{source}\0{item}".encode()).digest()[:8], "big")
    return "heldout_qa" if h / 2**64 < heldout_frac else "train"


def _one_line(text: str, max_chars: int = MAX_DESC) -> str:
    """The first paragraph of text on one line, cut at a sentence end when longer than max_chars."""
    para = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    line = re.sub(r"\s+", " ", para).strip()
    if len(line) > max_chars:
        cut = line[:max_chars]
        end = cut.rfind(". ")
        line = cut[:end + 1] if end > 40 else ""
    return line


def _clause(desc: str) -> str:
    """A description as a clause inside a question: first sentence, no final period."""
    first = re.split(r"(?<=\w[.!?])\s", desc, maxsplit=1)[0]
    return re.sub(r"(?<=\w)[.:;]$", "", first.strip())


def _record(question: str, answer: str, check: dict, kind: str, item: str, doc: dict) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "check": check, "kind": kind, "item": item, "source": doc.get("source", ""), "path": doc.get("path", "")}


def _forward_check(desc: str) -> dict | None:
    words = content_words(desc)[:8]
    return {"words": words, "min_share": 0.5} if len(words) >= 2 else None


def man_items(text: str) -> tuple[list[str], str, list[tuple[list[str], str]]]:
    """(names, summary, [(option tags, description)]) of a manual page cleaned by train.man_clean."""
    names, summary, options = [], "", []
    lines = text.splitlines()
    section = ""
    for i, line in enumerate(lines):
        if line.startswith("# "):
            section = line[2:].strip().upper()
            continue
        if section == "NAME" and not summary and line.strip():  # the NAME text, joined over its lines
            body = []
            for nxt in lines[i:]:
                if nxt.startswith("#") or (body and not nxt.strip()):
                    break
                body.append(nxt.strip())
            m = NAME_LINE.match(re.sub(r"\s*,\s*", ", ", " ".join(body)))
            if m:
                names = [n.strip() for n in m.group(1).split(",") if n.strip()]
                summary = m.group(2).strip()
            else:
                summary = "-"  # not a NAME line: do not look again
        if line and not line[0].isspace() and OPTION_TAG.match(line.strip()):
            block = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and not nxt.startswith("    "):
                    break
                block.append(nxt)
            desc = _one_line(textwrap.dedent("\n".join(block)))
            tags = OPTION.findall(line.split(" ", 1)[0] if " " in line and "," not in line else line)
            if desc and tags and len(desc.split()) >= 3:
                options.append((list(dict.fromkeys(tags)), desc))
    return names, summary, options


def _man_section(path: str) -> str:
    m = re.search(r"\.(\d)(perl)?$", path) or re.search(r"man(\d)/", path)
    if not m:
        return ""
    sec = m.group(1) + ("perl" if m.re.groups > 1 and m.group(2) else "")
    return sec if sec in COMMAND_FORWARD else ""


def man_pairs(doc: dict) -> Iterator[dict]:
    """Option and command pairs of one manual-page document."""
    names, summary, options = man_items(doc["text"])
    if not names or summary == "-":
        return
    name, path, sec = names[0], doc.get("path", ""), _man_section(doc.get("path", ""))
    if summary and len(summary.split()) >= 2:
        item = f"command:{name}"
        desc = summary.rstrip(" .")
        fwd = _forward_check(desc)
        if fwd:
            yield _record(COMMAND_FORWARD[sec].format(name=name), f"`{name}`: {desc}.", fwd, "command", item, doc)
        yield _record(COMMAND_REVERSE[sec].format(desc=desc), ", ".join(f"`{n}`" for n in names) + ".",
                      {"any_of": names}, "command", item, doc)
    if sec not in ("1", "8"):
        return
    seen = set()
    for tags, desc in options:
        opt = tags[0]
        if opt in seen:
            continue
        seen.add(opt)
        item = f"option:{name} {opt}"
        fwd = _forward_check(desc)
        answer = ", ".join(f"`{t}`" for t in tags) + ": " + desc
        if fwd:
            q = _pick(OPTION_FORWARD, path, opt).format(cmd=name, opt=opt)
            yield _record(q, answer, fwd, "option", item, doc)
        clause = _clause(desc)
        if len(clause.split()) >= 3:
            q = _pick(OPTION_REVERSE, path, opt, "r").format(cmd=name, desc=clause)
            a = f"`{tags[0]}`" + (" (" + ", ".join(f"`{t}`" for t in tags[1:]) + ")" if tags[1:] else "") + "."
            yield _record(q, a, {"any_of": tags}, "option", item, doc)


def api_reverse_pairs(doc: dict, project: str, module: str = "") -> Iterator[dict]:
    """Reverse questions for API entries (`name(args)` + indented description) of a document."""
    lines = doc["text"].splitlines()
    cur_module = module
    for i, line in enumerate(lines):
        mt = re.match(r"^# `([A-Za-z_][\w.]*)`\s+(?:---|--|—|-)\s+", line)
        if mt:
            cur_module = mt.group(1)
        m = SIGNATURE.match(line)
        if not m:
            continue
        block = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and not nxt.startswith((" ", "\t")):
                break
            block.append(nxt)
        desc = _one_line(textwrap.dedent("\n".join(block)))
        clause = _clause(desc)
        if len(clause.split()) < 4 or clause.startswith(("See ", "Alias", "Deprecated", "Same as")):
            continue
        name = m.group(1)
        full = f"{cur_module}.{name}" if cur_module and not name.startswith(cur_module + ".") else name
        call = "()" if m.group(2) else ""
        q = _pick(API_REVERSE if call else NAME_REVERSE, doc.get("path", ""), full).format(project=project, desc=clause)
        keys = list(dict.fromkeys([full, name]))
        yield _record(q, f"`{full}{call}`.", {"any_of": keys}, "api", f"api:{full}", doc)
