"""Cheap roff (man(7) / pod2man) -> Markdown-ish text for manual pages (no groff needed).

* ``.TH`` is dropped, ``.SH``/``.SS`` become ``#``/``##`` headings;
* ``.TP``/``.IP``/``.TQ`` tagged paragraphs become an item line (the tag) followed by its
  description indented by four spaces, so option lists stay "tag / indented text"
  (what :mod:`train.qa_pairs` reads as option descriptions);
* ``.nf``/``.fi``, ``.EX``/``.EE`` and pod2man's ``.Vb``/``.Ve`` become fenced code;
* fonts (``\\fB``, ``.B``, ``.BR`` ...) become plain text, escapes (``\\-``, ``\\(aq``,
  ``\\*(L"`` ...) their characters; comments, ``.IX`` index entries and other requests
  (``.PD``, ``.ne``, ``.de`` macro definitions ...) are dropped.
"""
from __future__ import annotations

import re

_NAMED = {
    "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "em": "--", "en": "-",
    "hy": "-", "mi": "-", "bu": "*", "co": "(c)", "rg": "(R)", "tm": "(TM)", "ga": "`", "ha": "^",
    "ti": "~", "rs": "\\", "bv": "|", "or": "|", "pl": "+", "eq": "=", "lt": "<", "gt": ">",
    "<=": "<=", ">=": ">=", "!=": "!=", "->": "->", "<-": "<-", "mu": "x", "de": " degrees",
    "Aq": "'", "L\"": '"', "R\"": '"', "C`": "", "C'": "", "PI": "pi", "sq": "#", "fo": "<<",
    "fc": ">>", "dg": "+", "sc": "S", "ct": "c", "Po": "L", "Ye": "Y",
}
_ESCAPES = [
    (re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[-+]?\d"), ""),  # size changes
    (re.compile(r"\\[\*]?\((..)"), lambda m: _NAMED.get(m.group(1), "")),
    (re.compile(r"\\[\*]?\[([^\]]*)\]"), lambda m: _NAMED.get(m.group(1), "")),
    (re.compile(r"\\\*(.)"), lambda m: _NAMED.get(m.group(1), "")),
    (re.compile(r"\\[hvwoHSlLDNXxbRkZz]'[^']*'"), ""),
    (re.compile(r"\\n(?:\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\[&|^%:\ncdp),/]"), ""),
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\(.)"), r"\1"),
]
_ALT_FONTS = {"BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "B", "I", "CW", "R"}
_CODE_ON = {"nf", "EX", "Vb"}
_CODE_OFF = {"fi", "EE", "Ve"}
_PARA = {"PP", "LP", "P", "sp", "br", "Sp", "RE", "RS", "in", "ti"}


def unescape(text: str) -> str:
    """Replace roff escapes in one line of text by plain characters."""
    text = text.replace("\\\\", "\0").replace("\\e", "\0")  # literal backslashes, restored last
    for pat, rep in _ESCAPES:
        text = pat.sub(rep, text)
    return text.replace("\0", "\\")


def _args(rest: str) -> list[str]:
    """Macro arguments: whitespace separated, double quotes group (``""`` is a literal quote)."""
    out, cur, quoted, i = [], "", False, 0
    while i < len(rest):
        c = rest[i]
        if c == '"':
            if quoted and rest[i + 1:i + 2] == '"':
                cur += '"'
                i += 1
            else:
                quoted = not quoted
        elif c in " \t" and not quoted:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    if cur:
        out.append(cur)
    return out


def clean_man(text: str) -> str:
    """Convert one manual page's roff source into text (see the module docstring); "" if nothing left."""
    out: list[str] = []
    code = False
    item_pending = False  # the next text line is a .TP tag
    indent = ""  # "    " while inside a tagged paragraph's body
    skip_def = False
    for raw in text.replace("\r\n", "\n").split("\n"):
        if skip_def:  # inside a .de macro definition
            skip_def = raw.strip() != ".."
            continue
        if raw.startswith((".\\\"", "'\\\"", '\\"', ".\\#")) or raw.strip() in (".", "'"):
            continue
        if raw[:1] in ".'" and len(raw) > 1:
            m = re.match(r"[.'\s]*([A-Za-z]\w{0,3}|\\\"|[^\s]+)\s*(.*)$", raw[1:])
            if not m:
                continue
            name, rest = m.group(1), m.group(2)
            args = _args(rest)
            if name in ("de", "de1", "am", "ig"):
                skip_def = True
            elif name in ("SH", "SS", "Sh", "Ss"):
                title = unescape(" ".join(args)).strip()
                if title:
                    out += ["", ("# " if name.upper() == "SH" else "## ") + title, ""]
                indent, item_pending = "", False
            elif name in _CODE_ON:
                if not code:
                    out += ["", indent + "```"]
                code = True
            elif name in _CODE_OFF:
                if code:
                    out += [indent + "```", ""]
                code = False
            elif name in ("TP", "TQ"):
                out.append("") if name == "TP" else None
                item_pending, indent = True, ""
            elif name == "IP":
                tag = unescape(args[0]) if args else ""
                out.append("")
                if tag and tag not in ("\\(bu", "*", "-", "o"):
                    out.append(tag)
                    indent = "    "
                else:  # a bullet or an untagged indented paragraph
                    indent = "    "
            elif name in _PARA:
                if name in ("PP", "LP", "P", "sp", "Sp"):
                    out.append("")
                    if name in ("PP", "LP", "P"):
                        indent = ""
            elif name in _ALT_FONTS:
                sep = " " if name in ("B", "I", "SM", "SB", "CW", "R") else ""  # .BR etc. alternate fonts
                line = unescape(sep.join(args))
                if line:
                    _text_line(out, line, indent, item_pending)
                    if item_pending:
                        item_pending, indent = False, "    "
            elif name in ("UR", "MT"):
                pass
            elif name in ("UE", "ME"):
                if args and out:
                    out[-1] += unescape(args[0])
            continue  # other requests (.TH, .IX, .PD, .ne, .if, .ds, .nr, .hy, .ad ...) are dropped
        line = unescape(raw)
        if code:
            out.append(indent + line.rstrip())
            continue
        if not line.strip():
            out.append("")
            continue
        _text_line(out, line.strip(), indent, item_pending)
        if item_pending:
            item_pending, indent = False, "    "
    if code:
        out.append(indent + "```")
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(ln.rstrip() for ln in out)).strip("\n")
    return cleaned + "\n" if cleaned else ""


def _text_line(out: list[str], line: str, indent: str, is_tag: bool) -> None:
    if is_tag:
        out.append(line)  # the tag of a tagged paragraph, on its own line, not indented
    else:
        out.append(indent + line)
