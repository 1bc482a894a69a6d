"""Cheap reStructuredText -> Markdown-ish clean-up for Sphinx sources (no docutils).

A line-based state machine that keeps prose and code and drops markup noise:

* headings (over/underlined) become ``#``/``##``/... headings, levels in order of first use;
* literal blocks (``para::``) and code directives (code-block, doctest, ...) become
  fenced ````` blocks, dedented, with the language when the directive names one;
* admonitions become labels ("Note:", "New in version 3.2.", ...), object
  directives (function, class, ...) their signature in backticks;
* comments, targets (``.. _label:``), substitution definitions, directive options
  and noise directives (index, toctree, highlight, module, ...) are dropped;
* inline: Sphinx roles become plain text (``:ref:`` resolves to the section title
  when :func:`collect_refs` saw it) or `code` for code roles (``:func:`f``` -> `` `f()` ``),
  ``literals`` become `literals`, hyperlinks keep their text.

Inline markup is cleaned per paragraph, so roles broken over lines are handled.
"""
from __future__ import annotations

import posixpath
import re

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::\s*(.*)$")
_FOOTNOTE = re.compile(r"^(\s*)\.\.\s+(\[[^\]]+\])\s*(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s.*)?$")
_OPTION = re.compile(r"^\s+:[\w -]+:(\s.*)?$")
_ADORN = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")
_LABEL = re.compile(r"^\.\. _([^:\n]+):\s*$")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
_REF = re.compile(r"`([^`\n]+)`__?")
_ROLE = re.compile(r":(?:[\w-]+:)?([\w-]+):`([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_FOOTREF = re.compile(r" ?\[#?[\w.-]*\]_")

DROP_DIRECTIVES = {
    "index", "toctree", "highlight", "sectionauthor", "moduleauthor", "codeauthor", "module",
    "currentmodule", "tabularcolumns", "image", "figure", "raw", "only", "include",
    "literalinclude", "testsetup", "testcleanup", "meta", "contents", "todo", "program",
    "audit-event", "audit-event-table", "default-role", "role", "rst-class", "cssclass",
    "autoclass", "automethod", "autofunction", "autoattribute", "autodata", "automodule",
    "autoexception", "autosummary", "sidebar", "py:module", "py:currentmodule", "c:namespace",
}
CODE_DIRECTIVES = {  # directive -> default fence language
    "code-block": "", "sourcecode": "", "code": "", "doctest": "pycon", "testcode": "python",
    "testoutput": "", "productionlist": "", "parsed-literal": "", "click:example": "python",
    "click:run": "python",
}
LABELS = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "hint": "Hint:",
    "tip": "Tip:", "important": "Important:", "caution": "Caution:", "attention": "Attention:",
    "danger": "Danger:", "error": "Error:", "impl-detail": "CPython implementation detail:",
    "availability": "Availability: {arg}.", "versionadded": "New in version {arg}.",
    "versionchanged": "Changed in version {arg}:", "deprecated": "Deprecated since version {arg}:",
    "deprecated-removed": "Deprecated since version {arg}:", "admonition": "{arg}",
    "rubric": "{arg}", "topic": "{arg}",
}
_VERSIONED = {"versionadded", "versionchanged", "deprecated", "deprecated-removed"}
CODE_ROLES = {
    "func", "meth", "class", "mod", "attr", "data", "exc", "const", "obj", "keyword", "member",
    "macro", "type", "var", "expr", "program", "envvar", "option", "file", "samp", "command",
    "makevar", "opcode", "cmdoption", "confval", "dir", "directive", "role", "code", "kbd",
    "token", "enum", "struct", "union", "event",
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _heading_at(lines: list[str], i: int) -> tuple[tuple[str, bool], str, int] | None:
    """(style, title, lines consumed) when lines[i] starts a section heading, else None."""
    line = lines[i]
    nxt = lines[i + 1] if i + 1 < len(lines) else ""
    if _ADORN.match(line) and nxt.strip() and i + 2 < len(lines) \
            and lines[i + 2][:1] == line[:1] and _ADORN.match(lines[i + 2]):
        return (line[0], True), nxt.strip(), 3
    if line and not line[0].isspace() and not _ADORN.match(line) and _ADORN.match(nxt) \
            and len(nxt) >= len(line) and not _DIRECTIVE.match(line):
        return (nxt[0], False), line.strip(), 2
    return None


def collect_refs(text: str, doc_path: str, refs: dict[str, str]) -> None:
    """Add this document's cross-reference titles to refs (in place).

    Keys: ``"label:<lowercased label>"`` for ``.. _label:`` targets followed by a
    heading, ``"doc:<path without suffix>"`` for the document's first heading.
    """
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    pending: list[str] = []
    first = True
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1).strip().lower())
            continue
        head = _heading_at(lines, i)
        if head:
            title = clean_inline(head[1], refs)
            if first:
                refs["doc:" + doc_path.rsplit(".", 1)[0]] = title
                first = False
            for label in pending:
                refs["label:" + label] = title
            pending = []
        elif line and not line[0].isspace() and not _ADORN.match(line) and not _COMMENT.match(line):
            pending = []  # a label followed by text, not by a heading


def clean_inline(text: str, refs: dict[str, str] | None = None, doc_path: str = "") -> str:
    """Simplify inline markup of one paragraph: links, Sphinx roles, ``literals``."""
    refs = refs or {}

    def role(m: re.Match) -> str:
        name, body = m.group(1), m.group(2)
        explicit = re.match(r"^(.+?)\s*<([^<>]+)>$", body, re.DOTALL)
        title = (explicit.group(1) if explicit else body).lstrip("!")
        if explicit:
            return title
        if name == "ref":
            return refs.get("label:" + title.lower(), title)
        if name == "doc":
            target = posixpath.normpath(posixpath.join(posixpath.dirname(doc_path), title)) \
                if not title.startswith("/") else title.lstrip("/")
            return refs.get("doc:" + target, title)
        if title.startswith("~"):
            title = title[1:].rsplit(".", 1)[-1]
        if name == "pep":
            return f"PEP {title}"
        if name == "rfc":
            return f"RFC {title}"
        if name in CODE_ROLES:
            if name in ("func", "meth") and not title.endswith(")"):
                title += "()"
            return f"`{title}`"
        return title

    text = _LINK.sub(r"\1", text)
    text = _ROLE.sub(role, text)
    text = _REF.sub(r"\1", text)
    text = _LITERAL.sub(r"`\1`", text)
    text = _FOOTREF.sub("", text)
    return text.replace("\\ ", "")


def clean_rst(text: str, refs: dict[str, str] | None = None, doc_path: str = "") -> str:
    """Clean one reStructuredText document (see the module docstring); returns text ending in a newline
    or "" when nothing is left. refs/doc_path resolve :ref:/:doc: roles (see collect_refs)."""
    lines = [ln.expandtabs(8).rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    out: list[tuple[bool, str]] = []  # (is_prose, line); prose is inline-cleaned per paragraph
    styles: list[tuple[str, bool]] = []
    block: dict | None = None  # {"kind": "drop"|"code", "indent", "content", "lang"}

    def close_code() -> None:
        if block and block["kind"] == "code" and block["content"] is not None:
            while out and not out[-1][1]:
                out.pop()
            out.extend([(False, " " * block["indent"] + "```"), (False, "")])

    i = 0
    while i < len(lines):
        line = lines[i]
        if block is not None:
            if not line or _indent(line) > block["indent"]:
                if block["kind"] == "code" and line and block["content"] is None and _OPTION.match(line) \
                        and block["options"]:
                    pass  # a code directive's options
                elif block["kind"] == "code" and (line or block["content"] is not None):
                    block["options"] = False
                    if block["content"] is None:
                        block["content"] = _indent(line)
                        if out and out[-1][1]:
                            out.append((False, ""))
                        out.append((False, " " * block["indent"] + "```" + block["lang"]))
                    cut = min(block["content"], _indent(line))
                    out.append((False, " " * block["indent"] + line[cut:] if line else ""))
                i += 1
                continue
            close_code()
            block = None
        indent = _indent(line)
        head = _heading_at(lines, i)
        if head:
            style, title, step = head
            if style not in styles:
                styles.append(style)
            out.extend([(False, ""), (True, "#" * min(styles.index(style) + 1, 6) + " " + title), (False, "")])
            i += step
            continue
        if not indent and _ADORN.match(line):  # transition line
            i += 1
            continue
        m = _DIRECTIVE.match(line)
        if m:
            pad, name, arg = m.group(1), m.group(2), m.group(3).strip()
            while arg.endswith("\\") and i + 1 < len(lines):  # signature continued over lines
                i += 1
                arg = arg[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            if name in DROP_DIRECTIVES:
                block = {"kind": "drop", "indent": indent}
            elif name in CODE_DIRECTIVES:
                lang = arg.split()[0] if arg and name in ("code-block", "sourcecode", "code") else ""
                block = {"kind": "code", "indent": indent, "content": None, "options": True,
                         "lang": lang or CODE_DIRECTIVES[name]}
            else:
                if name in _VERSIONED:
                    version, _, rest = arg.partition(" ")
                    label = LABELS[name].format(arg=version) + (" " + rest if rest else "")
                elif name in LABELS:
                    label = LABELS[name].format(arg=arg)
                else:
                    label = "`" + arg + "`" if arg else ""
                if label.strip():
                    out.append((True, pad + label))
                while i < len(lines) and lines[i] and _indent(lines[i]) > indent and _OPTION.match(lines[i]):
                    i += 1  # the directive's options; its content is prose and stays
            continue
        m = _FOOTNOTE.match(line)
        if m:
            out.append((True, m.group(1) + m.group(2) + " " + m.group(3)))
        elif _COMMENT.match(line):  # comments, targets, substitution definitions
            block = {"kind": "drop", "indent": indent}
        elif line.endswith("::"):  # a paragraph introducing a literal block
            head_text = line[:-2].rstrip()
            if head_text.strip():
                out.append((True, head_text if line[:-2].endswith(" ") else head_text + ":"))
            block = {"kind": "code", "indent": indent, "content": None, "options": False, "lang": ""}
        else:
            out.append((bool(line), line))
        i += 1
    close_code()

    result: list[str] = []
    j = 0
    while j < len(out):  # clean inline markup over each run of prose lines (a paragraph)
        if not out[j][0]:
            result.append(out[j][1])
            j += 1
            continue
        k = j
        while k < len(out) and out[k][0]:
            k += 1
        result.extend(clean_inline("\n".join(t for _, t in out[j:k]), refs, doc_path).split("\n"))
        j = k
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(result)).strip("\n")
    return cleaned + "\n" if cleaned else ""
