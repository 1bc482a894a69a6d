"""Offline, openly licensed English corpus from Debian documentation packages.

The corpus is built on demand and never committed. Each source is a Debian
``*-doc`` package whose Sphinx build ships the reStructuredText sources under
``.../html/_sources/`` (files like ``tutorial/controlflow.rst.txt``). The
package is fetched with ``apt-get download`` into a cache directory (nothing
is installed system-wide), unpacked with ``dpkg-deb -x``, and each source file
becomes one document after a light reStructuredText clean-up
(:func:`train.rst_clean.clean_rst`: headings become Markdown ``#`` headings,
literal blocks become fenced code, Sphinx roles become plain text or `code`,
index/toctree/comment noise is dropped; prose and code are kept).

Output layout (``--out``, default ``data/corpus``)::

    train.jsonl     one JSON object per line: {"text": str, "source": str, "path": str}
    heldout.jsonl   same format, ~2% of documents, chosen by a hash of source/path
    SOURCES.json    provenance: per source package, version, licence, counts;
                    written last, so its presence marks a complete build
    licences/       each package's Debian copyright file ({source}.copyright)

``source`` is a key of :data:`SOURCES`; ``path`` is the file's path relative
to ``_sources/`` without the ``.txt`` suffix Sphinx adds (``library/os.rst``).

Rebuild::

    apt-get update                      # once, as root, if apt's lists are stale
    python -m train.corpus --out data/corpus [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from train.rst_clean import clean_rst, collect_refs

# Each source: a Debian package with Sphinx `_sources`, and its licence (SPDX id).
SOURCES: dict[str, dict[str, str]] = {
    "python3.11-doc": {
        "package": "python3.11-doc",
        "licence": "PSF-2.0",  # code examples in the docs are additionally 0BSD
        "licence_file": "usr/share/doc/python3.11-doc/copyright",
        "description": "The Python 3.11 documentation (tutorial, library and language reference, HOWTOs).",
    },
    "sphinx-doc": {
        "package": "sphinx-doc",
        "licence": "BSD-2-Clause",
        "licence_file": "usr/share/doc/sphinx-doc/copyright",
        "description": "The Sphinx documentation generator's manual.",
    },
    "python-flask-doc": {
        "package": "python-flask-doc",
        "licence": "BSD-3-Clause",
        "licence_file": "usr/share/doc/python-flask-doc/copyright",
        "description": "The Flask web framework's documentation.",
    },
    "python-click-doc": {
        "package": "python-click-doc",
        "licence": "BSD-3-Clause",
        "licence_file": "usr/share/doc/python-click-doc/copyright",
        "description": "The Click command-line library's documentation.",
    },
}

SOURCE_SUFFIXES = (".rst.txt", ".rst", ".txt")
MIN_CHARS = 200  # documents shorter than this after clean-up (toctree-only pages) are dropped
HELDOUT_FRAC = 0.02
SPLITS = ("train", "heldout")


class CorpusError(RuntimeError):
    """A corpus build step failed; the message names the command or package needed."""


# --------------------------------------------------------------------------- fetching
def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise CorpusError(f"`{cmd[0]}` not found: {what} needs Debian's `{cmd[0]}` "
                          f"(a Debian/Ubuntu machine with apt and dpkg)")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-600:]
        raise CorpusError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}) during {what}:\n{tail}")
    return proc


def fetch_deb(package: str, cache_dir: Path) -> Path:
    """Return the cached ``{package}_*.deb`` in cache_dir, downloading it with apt-get if absent."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise CorpusError(f"`apt-get` not found: the corpus needs the Debian package `{package}`, fetched "
                          f"with `apt-get download {package}` (Debian/Ubuntu), or put {package}_*.deb "
                          f"into {cache_dir} by hand")
    tmp = cache_dir / f".download-{package}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            _run(["apt-get", "download", package], f"download of package {package}", cwd=tmp)
        except CorpusError as e:
            raise CorpusError(f"{e}\nThe corpus needs the Debian package `{package}`: run `apt-get update` "
                              f"(as root, with access to a Debian mirror) and retry, or put "
                              f"{package}_*.deb into {cache_dir}.") from None
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if not debs:
            raise CorpusError(f"`apt-get download {package}` wrote no {package}_*.deb into {tmp}")
        os.replace(debs[-1], cache_dir / debs[-1].name)
        return cache_dir / debs[-1].name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def deb_version(deb: Path) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"], f"reading {deb}").stdout.strip()


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack deb into dest with ``dpkg-deb -x`` (once; a ``.complete`` marker records success)."""
    dest = Path(dest)
    marker = dest / ".complete"
    if marker.exists() and marker.read_text() == Path(deb).name:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"extraction of {deb}")
    (tmp / ".complete").write_text(Path(deb).name)
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------- documents
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


def split_of(source: str, path: str, heldout_frac: float = HELDOUT_FRAC) -> str:
    """Deterministic split of a document: "heldout" for ~heldout_frac of (source, path) hashes."""
    h = int.from_bytes(hashlib.sha256(f"{source}/{path}".encode()).digest()[:8], "big")
    return "heldout" if h / 2**64 < heldout_frac else "train"


def iter_documents(source: str, root: Path, progress: bool = True) -> Iterator[dict[str, str]]:
    """Cleaned documents ``{"text", "source", "path"}`` of one extracted source tree.

    Two passes: the first collects section titles so that :ref:/:doc: roles render as titles.
    """
    raw = [(rel, f.read_text(encoding="utf-8", errors="replace")) for rel, f in find_source_files(root)]
    refs: dict[str, str] = {}
    for rel, text in raw:
        collect_refs(text, rel, refs)
    for rel, text in tqdm(raw, desc=source, unit="doc", disable=not progress):
        text = clean_rst(text, refs, rel)
        if len(text) >= MIN_CHARS:
            yield {"text": text, "source": source, "path": rel}


def is_built(out_dir: Path) -> bool:
    out_dir = Path(out_dir)
    return all((out_dir / n).exists() for n in ("train.jsonl", "heldout.jsonl", "SOURCES.json"))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_corpus(out_dir: Path, cache_dir: Path, sources: list[str] | None = None, force: bool = False,
                 heldout_frac: float = HELDOUT_FRAC, roots: dict[str, Path] | None = None,
                 progress: bool = True) -> dict:
    """Build the corpus into out_dir and return the SOURCES.json record.

    roots maps source names to already extracted trees (skips apt/dpkg; used by tests).
    Does nothing and returns the existing record when out_dir holds a complete build,
    unless force. Every output file is written to a temp file and renamed into place.
    """
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    if is_built(out_dir) and not force:
        return json.loads((out_dir / "SOURCES.json").read_text(encoding="utf-8"))
    names = list(roots) if roots is not None else list(sources or SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise CorpusError(f"unknown source(s) {unknown}; known: {sorted(SOURCES)}")
    record: dict = {"built_with": "python -m train.corpus", "heldout_frac": heldout_frac, "sources": {}}
    if roots is None:
        roots = {}
        for name in names:
            deb = fetch_deb(SOURCES[name]["package"], cache_dir / "debs")
            roots[name] = extract_deb(deb, cache_dir / "extract" / name)
            record["sources"][name] = {"version": deb_version(deb), "deb": deb.name}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "SOURCES.json").unlink(missing_ok=True)  # the completion marker goes first
    tmp = {s: out_dir / f"{s}.jsonl.tmp" for s in SPLITS}
    totals = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
    with open(tmp["train"], "w", encoding="utf-8") as ftr, open(tmp["heldout"], "w", encoding="utf-8") as fho:
        files = {"train": ftr, "heldout": fho}
        for name in names:
            stats = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
            for doc in iter_documents(name, Path(roots[name]), progress=progress):
                split = split_of(name, doc["path"], heldout_frac)
                files[split].write(json.dumps(doc, ensure_ascii=False) + "\n")
                for d in (stats[split], totals[split]):
                    d["documents"] += 1
                    d["bytes"] += len(doc["text"].encode("utf-8"))
            entry = record["sources"].setdefault(name, {})
            entry.update(SOURCES[name])
            entry.update(stats)
            licence = Path(roots[name]) / SOURCES[name]["licence_file"]
            if licence.is_file():  # keep the package's copyright file next to the corpus
                (out_dir / "licences").mkdir(exist_ok=True)
                shutil.copyfile(licence, out_dir / "licences" / f"{name}.copyright")
                entry["licence_copy"] = f"licences/{name}.copyright"
    for s in SPLITS:
        os.replace(tmp[s], out_dir / f"{s}.jsonl")
    record["totals"] = totals
    _write_json(out_dir / "SOURCES.json", record)
    return record


def iter_texts(path: Path) -> Iterator[str]:
    """The "text" field of every line of a corpus JSONL file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.corpus", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/corpus"), help="output dir (default data/corpus)")
    p.add_argument("--cache", type=Path, default=Path("data/cache"), help=".deb and extraction cache")
    p.add_argument("--sources", default=",".join(SOURCES), help="comma-separated subset of: " + ", ".join(SOURCES))
    p.add_argument("--heldout-frac", type=float, default=HELDOUT_FRAC)
    p.add_argument("--force", action="store_true", help="rebuild even if --out holds a complete corpus")
    p.add_argument("--apt-update", action="store_true", help="run `apt-get update` first (root)")
    args = p.parse_args(argv)
    if is_built(args.out) and not args.force:
        print(f"{args.out} already holds a complete corpus (SOURCES.json); use --force to rebuild")
        return 0
    try:
        if args.apt_update:
            _run(["apt-get", "update"], "apt-get update")
        rec = build_corpus(args.out, args.cache, [s for s in args.sources.split(",") if s],
                           force=args.force, heldout_frac=args.heldout_frac)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, s in rec["sources"].items():
        print(f"{name} {s.get('version', '')} ({s['licence']}): {s['train']['documents']} train + "
              f"{s['heldout']['documents']} heldout docs")
    t = rec["totals"]
    print(f"total: {t['train']['documents']} train docs ({t['train']['bytes'] / 1e6:.1f} MB), "
          f"{t['heldout']['documents']} heldout docs ({t['heldout']['bytes'] / 1e6:.2f} MB) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
