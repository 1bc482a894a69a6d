"""Documents of one unpacked source tree: find its files by kind and clean each into text.

Kinds (train.corpus_sources): "sphinx" (``_sources/*.rst.txt``; train.rst_clean, with :ref:
titles collected over the whole tree first), "rst" (``include`` globs; train.rst_clean),
"html" (train.html_clean), "man" (roff, ``.gz`` or plain; train.man_clean). Each document is
``{"text", "source", "path"}``; ``path`` is relative to the glob's directory (sphinx: to
``_sources/``, without Sphinx's extra ``.txt``; man: ``man1/ls.1``).
"""
from __future__ import annotations

import glob
import gzip
import os
import re
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from train.html_clean import clean_html
from train.man_clean import clean_man
from train.rst_clean import clean_rst, collect_refs

SOURCE_SUFFIXES = (".rst.txt", ".rst", ".txt")
MIN_CHARS = 200  # documents shorter than this after clean-up (toctree-only pages) are dropped


def find_source_files(root: Path) -> list[tuple[str, Path]]:
    """All Sphinx source files under every ``_sources`` dir in root, as sorted (relpath, file).

    relpath is relative to ``_sources`` with Sphinx's extra ``.txt`` removed from ``*.rst.txt``.
    Symlinked directories are not followed (Debian links doc dirs), so nothing is read twice.
    """
    found: dict[str, Path] = {}
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        if os.path.basename(dirpath) != "_sources":
            continue
        dirnames.clear()  # walked below with rglob
        base = Path(dirpath)
        for f in sorted(base.rglob("*")):
            if f.is_file() and f.name.endswith(SOURCE_SUFFIXES):
                rel = f.relative_to(base).as_posix()
                rel = rel[:-4] if rel.endswith(".rst.txt") else rel
                found.setdefault(rel, f)
    return sorted(found.items())


def find_files(root: Path, include: list[str], exclude: str = "") -> list[tuple[str, Path]]:
    """Files matching the include globs under root (sorted, symlinks to files followed once),
    as (path relative to the glob's fixed directory, file); paths matching exclude are skipped."""
    found: dict[str, Path] = {}
    skip = re.compile(exclude) if exclude else None
    for pattern in include:
        head = re.split(r"[*?\[]", pattern)[0]  # the pattern's directory before any glob character
        fixed = head.rsplit("/", 1)[0] if "/" in head else ""
        base = Path(root) / fixed
        for name in sorted(glob.glob(str(Path(root) / pattern), recursive=True)):
            f = Path(name)
            if not f.is_file():
                continue
            rel = f.relative_to(base).as_posix()
            if skip is not None and skip.search(rel):
                continue
            if rel.endswith(".gz"):
                rel = rel[:-3]
            found.setdefault(rel, f)
    return sorted(found.items())


def read_text(f: Path) -> str:
    data = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
    return data.decode("utf-8", errors="replace")


def source_files(spec: dict, roots: list[Path]) -> list[tuple[str, Path]]:
    """(path, file) of every document file of a source spread over its packages' trees."""
    found: dict[str, Path] = {}
    for root in roots:
        files = find_source_files(root) if spec["kind"] == "sphinx" else \
            find_files(root, spec["include"], spec.get("exclude", ""))
        for rel, f in files:
            found.setdefault(rel, f)
    return sorted(found.items())


def iter_documents(source: str, spec: dict, roots: list[Path], progress: bool = True,
                   min_chars: int = MIN_CHARS) -> Iterator[dict[str, str]]:
    """Cleaned documents ``{"text", "source", "path"}`` of one source (see the module docstring)."""
    kind = spec["kind"]
    files = source_files(spec, [Path(r) for r in roots])
    refs: dict[str, str] = {}
    if kind in ("sphinx", "rst"):  # first pass: section titles, so that :ref:/:doc: render as titles
        for rel, f in files:
            collect_refs(read_text(f), rel, refs)
    for rel, f in tqdm(files, desc=source, unit="doc", disable=not progress, mininterval=5):
        raw = read_text(f)
        if kind in ("sphinx", "rst"):
            text = clean_rst(raw, refs, rel)
        elif kind == "html":
            text = clean_html(raw)
        elif kind == "man":
            if raw.lstrip().startswith(".so "):  # a link to another page
                continue
            text = clean_man(raw)
        else:
            raise ValueError(f"source {source}: unknown kind {kind!r} (sphinx, rst, html, man)")
        if len(text) >= min_chars:
            yield {"text": text, "source": source, "path": rel}
