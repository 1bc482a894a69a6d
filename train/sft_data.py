"""Instruction data for the SFT stage, derived from the open documentation corpus (train.corpus).

Question/answer pairs come out of each cleaned document:
  API entries    a top-level signature line  `name(args)`  followed by its indented description
                 -> "What does `module.name()` do?"  ->  the description's first paragraphs, and the
                 reverse "Which Python function does this: <first sentence>?" -> "`module.name()`."
  sections       a Markdown heading followed by prose
                 -> "Tell me about <heading> in Python." (a few templates) -> the section's opening.
  manual pages   options and NAME lines, both directions (train.qa_pairs.man_pairs):
                 "What does `ls -a` do?" -> the option's text; "Which command does this: ...?" -> "`ls`."
Answers are verbatim documentation text (cut at a paragraph boundary, at most `max_answer_chars`),
so the pairs carry the licence of their source document (see the corpus' SOURCES.json).
Templates are chosen by a hash of the document path and the item, so the output is deterministic.
Every record has a "check" for mobilemoe.answer_check (does the answer name the right thing).

    python -m train.sft_data --corpus data/corpus --out data/sft

writes `train.jsonl`, `heldout_qa.jsonl` (held-out items of the train documents: the exact-answer
test) and `heldout.jsonl` (pairs of the corpus' held-out documents), one record a line:
{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "check", "kind", "item", "source", "path"}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from mobilemoe.answer_check import content_words
from mobilemoe.checkpoint import atomic_dir
from train.qa_pairs import QA_HELDOUT_FRAC, api_reverse_pairs, man_pairs, qa_split

PROJECT_NAMES = {"python3.11-doc": "Python", "sphinx-doc": "Sphinx", "python-flask-doc": "Flask",
                 "python-click-doc": "Click", "python-pandas-doc": "pandas", "python-astropy-doc": "Astropy",
                 "python-sklearn-doc": "scikit-learn", "python-statsmodels-doc": "statsmodels",
                 "python-sympy-doc": "SymPy", "python-dask-doc": "Dask", "python-xarray-doc": "xarray",
                 "python-pytest-doc": "pytest", "python-setuptools-doc": "setuptools",
                 "python-werkzeug-doc": "Werkzeug", "python-mpmath-doc": "mpmath", "linux-doc": "the Linux kernel",
                 "python-django-doc": "Django", "python-scipy-doc": "SciPy", "python-sqlalchemy-doc": "SQLAlchemy",
                 "postgresql-doc-15": "PostgreSQL", "debian-reference-en": "Debian", "debian-handbook": "Debian",
                 "nodejs-doc": "Node.js", "git-doc": "Git", "octave-doc": "GNU Octave", "bash-doc": "Bash",
                 "openjdk-17-doc": "Java", "perl-doc": "Perl", "manpages": "Linux", "tool-manpages": "Linux",
                 "python-pandas-api": "pandas", "python-sklearn-api": "scikit-learn", "python-astropy-api": "Astropy",
                 "python-statsmodels-api": "statsmodels", "python-dask-api": "Dask", "python-sympy-api": "SymPy",
                 "cmake-doc": "CMake", "sqlite3-doc": "SQLite", "erlang-doc": "Erlang", "apache2-doc": "Apache httpd",
                 "libssl-doc": "OpenSSL", "systemd-man": "systemd", "tcl8.6-doc": "Tcl"}
# manual pages: their pairs come from train.qa_pairs.man_pairs
MAN_SOURCES = {"perl-doc", "manpages", "tool-manpages", "libssl-doc", "systemd-man", "tcl8.6-doc"}
SKIP_PATHS = re.compile(r"(^|/)(whatsnew|changes|changelog)(/|\.|$)")  # change logs make poor answers
MAX_ANSWER_CHARS = 700
MIN_ANSWER_CHARS = 80

HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$")
SIGNATURE = re.compile(r"^`([A-Za-z_][\w.]*)(\(.*\))?`\s*$")  # `name(args)` alone on a line
MODULE_TITLE = re.compile(r"^`([A-Za-z_][\w.]*)`\s+(?:---|--|—|-)\s+(.+)$")

API_QUESTIONS = ("What does `{name}` do?", "Explain `{name}`.", "How is `{full}` used?",
                 "What is `{name}` for?")
MODULE_QUESTIONS = ("What is the `{module}` module for?", "What does the `{module}` module provide?",
                    "Give an overview of `{module}`.")
SECTION_QUESTIONS = ("Tell me about {title} in {project}.", "Explain {title} ({project}).",
                     "What does the {project} documentation say about {title}?",
                     "Describe {title} in {project}.")


def _pick(options: tuple[str, ...], *key: str) -> str:
    h = int.from_bytes(hashlib.sha256("\0".join(key).encode()).digest()[:4], "big")
    return options[h % len(options)]


def first_paragraphs(text: str, max_chars: int = MAX_ANSWER_CHARS) -> str:
    """Leading paragraphs of text (blank-line separated, ``` fences kept whole) within max_chars."""
    paras, cur, fenced = [], [], False
    for line in text.strip("\n").splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        if not line.strip() and not fenced:
            if cur:
                paras.append("\n".join(cur))
                cur = []
            continue
        cur.append(line)
    if cur and not fenced:
        paras.append("\n".join(cur))
    out = ""
    for p in paras:
        if out and len(out) + 2 + len(p) > max_chars:
            break
        if not out and len(p) > max_chars:  # a first paragraph that is too long: cut at a sentence end
            cut = p[:max_chars]
            end = max(cut.rfind(". "), cut.rfind(".\n"))
            return cut[:end + 1] if end > MIN_ANSWER_CHARS else ""
        out = f"{out}\n\n{p}" if out else p
    return out.strip()


def _prose_chars(text: str) -> int:
    return sum(len(line) for line in re.sub(r"```.*?```", "", text, flags=re.S).splitlines())


def _sections(text: str) -> Iterator[tuple[int, str, str]]:
    """(level, title, body) for each Markdown heading outside code fences."""
    level, title, body, fenced = 0, "", [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        m = None if fenced else HEADING.match(line)
        if m:
            if title:
                yield level, title, "\n".join(body)
            level, title, body = len(m.group(1)), m.group(2), []
        else:
            body.append(line)
    if title:
        yield level, title, "\n".join(body)


def _api_entries(body: str) -> Iterator[tuple[str, str, str]]:
    """(name, signature, description) for each top-level `name(args)` line + indented block."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        m = SIGNATURE.match(line)
        if not m:
            continue
        block = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and not nxt.startswith((" ", "\t")):
                break
            block.append(nxt)
        yield m.group(1), m.group(1) + (m.group(2) or ""), textwrap.dedent("\n".join(block))


def _clean_title(title: str) -> str:
    return title.replace("*", "").strip()


def qa_pairs(doc: dict, max_answer_chars: int = MAX_ANSWER_CHARS) -> Iterator[dict]:
    """Question/answer records of one corpus document {"text", "source", "path"}."""
    project = PROJECT_NAMES.get(doc.get("source", ""), "this project's")
    path = doc.get("path", "")
    if SKIP_PATHS.search(path):
        return
    module = ""
    for level, title, body in _sections(doc["text"]):
        mt = MODULE_TITLE.match(title) if level == 1 else None
        if mt:
            module = mt.group(1)
        intro = []  # the section's prose up to its first API entry
        for line in body.splitlines():
            if SIGNATURE.match(line):
                break
            if not line.startswith("**Source code:**"):
                intro.append(line)
        answer = first_paragraphs("\n".join(intro), max_answer_chars)
        if _prose_chars(answer) >= MIN_ANSWER_CHARS:
            if mt:
                q = _pick(MODULE_QUESTIONS, path, title).format(module=module)
            elif title.endswith("?"):  # FAQ headings are questions already
                q = _clean_title(title)
            else:
                q = _pick(SECTION_QUESTIONS, path, title).format(title=_clean_title(title), project=project)
            yield _chat(q, answer, doc, "section", f"section:{path}#{title}")
        for name, sig, desc in _api_entries(body):
            answer = first_paragraphs(desc, max_answer_chars)
            if _prose_chars(answer) < MIN_ANSWER_CHARS // 2:
                continue
            full = f"{module}.{name}" if module and not name.startswith(module + ".") else name
            q = _pick(API_QUESTIONS, path, sig).format(name=full + ("()" if "(" in sig else ""), full=full)
            yield _chat(q, answer, doc, "api", f"api:{full}")
    yield from api_reverse_pairs(doc, project)


def _chat(question: str, answer: str, doc: dict, kind: str, item: str) -> dict:
    """A chat record; its check: the answer's first sentence's content words (half of them must come back)."""
    first = re.split(r"(?<=[.!?])\s", re.sub(r"```.*?```", "", answer, flags=re.S).strip(), maxsplit=1)[0]
    words = content_words(first)[:8]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "check": {"words": words, "min_share": 0.5}, "kind": kind, "item": item,
            "source": doc.get("source", ""), "path": doc.get("path", "")}


def doc_pairs(doc: dict, max_answer_chars: int = MAX_ANSWER_CHARS) -> Iterator[dict]:
    """All question/answer records of one corpus document: man-page pairs for manual pages,
    section and API pairs (both directions) for the rest."""
    if doc.get("source") in MAN_SOURCES:
        yield from man_pairs(doc)
    else:
        yield from qa_pairs(doc, max_answer_chars)


def build_sft_data(corpus_dir, out_dir, max_answer_chars: int = MAX_ANSWER_CHARS,
                   qa_heldout_frac: float = QA_HELDOUT_FRAC) -> dict:
    """Write out_dir/{train,heldout,heldout_qa}.jsonl from corpus_dir/{train,heldout}.jsonl.

    train.jsonl      pairs of the corpus' train documents, less the held-out items;
    heldout_qa.jsonl pairs of ~qa_heldout_frac of the train documents' items (train.qa_pairs.qa_split):
                     documents seen in pre-training, questions never seen in SFT (the exact-answer test);
    heldout.jsonl    pairs of the corpus' held-out documents (never seen at all; SFT held-out loss).
    A question asked twice (same text) is kept once per split. Returns {split: count, "kinds": {...}}.
    """
    corpus_dir = Path(corpus_dir)
    for split in ("train", "heldout"):
        if not (corpus_dir / f"{split}.jsonl").is_file():
            raise FileNotFoundError(f"{corpus_dir / f'{split}.jsonl'}: corpus split not found "
                                    f"(build it: python -m train.corpus --out {corpus_dir})")
    counts: dict = {"train": 0, "heldout": 0, "heldout_qa": 0, "kinds": {}}

    def write(tmp: Path):
        outs = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8") for s in ("train", "heldout", "heldout_qa")}
        seen: dict[str, set] = {s: set() for s in outs}
        try:
            for corpus_split in ("train", "heldout"):
                with open(corpus_dir / f"{corpus_split}.jsonl", encoding="utf-8") as fin:
                    for line in fin:
                        if not line.strip():
                            continue
                        for rec in doc_pairs(json.loads(line), max_answer_chars):
                            split = "heldout" if corpus_split == "heldout" else \
                                qa_split(rec["source"], rec["item"], qa_heldout_frac)
                            q = rec["messages"][0]["content"]
                            if q in seen[split]:
                                continue
                            seen[split].add(q)
                            outs[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
                            counts[split] += 1
                            kinds = counts["kinds"].setdefault(split, {})
                            kinds[rec["kind"]] = kinds.get(rec["kind"], 0) + 1
        finally:
            for f in outs.values():
                f.close()
        for split in ("train", "heldout"):
            if counts[split] == 0:
                raise ValueError(f"{corpus_dir / f'{split}.jsonl'}: yields no question/answer pairs")
        (tmp / "SOURCES.json").write_text(json.dumps(
            {"built_with": "python -m train.sft_data", "corpus": str(corpus_dir), "pairs": counts,
             "qa_heldout_frac": qa_heldout_frac,
             "licence": "as the corpus documents they come from (see the corpus' SOURCES.json)"}, indent=2) + "\n")

    atomic_dir(Path(out_dir), write)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sft_data", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    p.add_argument("--out", type=Path, default=Path("data/sft"))
    p.add_argument("--max-answer-chars", type=int, default=MAX_ANSWER_CHARS)
    a = p.parse_args(argv)
    try:
        counts = build_sft_data(a.corpus, a.out, a.max_answer_chars)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {counts['train']} train + {counts['heldout_qa']} heldout_qa + {counts['heldout']} heldout "
          f"question/answer pairs to {a.out}; by kind: {json.dumps(counts['kinds'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
