"""Offline, openly licensed English corpus from Debian documentation packages.

The corpus is built on demand and never committed. Each source (train.corpus_sources) is one or
more Debian packages of documentation: Sphinx builds (their reStructuredText ``_sources``), the
Linux kernel's Documentation/ tree, HTML manuals (Django, SciPy, PostgreSQL, javadoc, ...) and
manual pages (perl-doc, man-pages, common tools). Packages are fetched with ``apt-get download``
into a cache directory (nothing is installed system-wide) and unpacked once (train.corpus_fetch);
a rebuild with the cache in place needs no network. Each file becomes one document after a light
clean-up to Markdown-ish text (train.corpus_docs: headings ``#``, fenced code, prose kept).

Then, in source order: a quality filter (train.dedup.quality_problem), exact and near-duplicate
removal across all sources (train.dedup.Deduper: the first copy seen is kept), and a held-out
split by document (a hash of source/path, ~2%). Dedup runs before the split, so no held-out
document is a near copy of a training one. Tokens are counted with the bundled tokenizer.

Output layout (``--out``, default ``data/corpus``)::

    train.jsonl     one JSON object per line: {"text": str, "source": str, "path": str}
    heldout.jsonl   same format, ~2% of documents, chosen by a hash of source/path
    SOURCES.json    provenance: per source packages, versions, licence, counts (documents, bytes,
                    tokens per split; documents dropped and why); written last, so its presence
                    marks a complete build
    licences/       each package's Debian copyright file ({source}.copyright, and
                    {source}--{package}.copyright for a source of several packages)

Rebuild::

    apt-get update                      # once, as root, if apt's lists are stale
    python -m train.corpus --out data/corpus [--force] [--sources a,b]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from mobilemoe.tokenizer import load_tokenizer
from train.corpus_docs import MIN_CHARS, find_source_files, iter_documents  # noqa: F401 (re-exported)
from train.corpus_fetch import CorpusError, deb_version, extract_deb, extract_tarball, fetch_deb, run_tool  # noqa: F401
from train.corpus_sources import SOURCES
from train.dedup import Deduper, quality_problem

HELDOUT_FRAC = 0.02
SPLITS = ("train", "heldout")


def split_of(source: str, path: str, heldout_frac: float = HELDOUT_FRAC) -> str:
    """Deterministic split of a document: "heldout" for ~heldout_frac of (source, path) hashes."""
    h = int.from_bytes(hashlib.sha256(f"{source}/{path}".encode()).digest()[:8], "big")
    return "heldout" if h / 2**64 < heldout_frac else "train"


def is_built(out_dir: Path) -> bool:
    out_dir = Path(out_dir)
    return all((out_dir / n).exists() for n in ("train.jsonl", "heldout.jsonl", "SOURCES.json"))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare_source(name: str, cache_dir: Path) -> tuple[list[Path], dict]:
    """Fetch + unpack a source's packages (cached); returns its trees and {package: version}."""
    spec = SOURCES[name]
    roots, versions = [], {}
    for pkg in spec["packages"]:
        deb = fetch_deb(pkg, cache_dir / "debs")
        root = extract_deb(deb, cache_dir / "extract" / pkg)
        versions[pkg] = deb_version(deb)
        if spec.get("tarball"):
            root = extract_tarball(root / spec["tarball"], spec["tar_member"], cache_dir / "extract" / f"{name}-tree")
        roots.append(root)
    return roots, versions


def _token_counter(tokenizer):
    if tokenizer is None:
        return lambda texts: 0
    return lambda texts: sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))


def _copy_licences(name: str, roots: list[Path], versions: dict, out_dir: Path) -> list[str]:
    spec, copies = SOURCES[name], []
    pkgs = list(versions) or [spec["package"]]
    for pkg, root in zip(pkgs, [Path(r) for r in roots]):
        cands = [root / spec["licence_file"], root / f"usr/share/doc/{pkg}/copyright"]
        if spec.get("tarball"):  # the tree is the tarball's; the copyright file is in the package
            cands.insert(0, root.parent / pkg / spec["licence_file"])
        src = next((c for c in cands if c.is_file()), None)
        if src is not None:
            dest = f"licences/{name}.copyright" if len(pkgs) == 1 else f"licences/{name}--{pkg}.copyright"
            (out_dir / "licences").mkdir(exist_ok=True)
            shutil.copyfile(src, out_dir / dest)
            copies.append(dest)
    return copies


def build_corpus(out_dir: Path, cache_dir: Path, sources: list[str] | None = None, force: bool = False,
                 heldout_frac: float = HELDOUT_FRAC, roots: dict[str, Path] | None = None,
                 progress: bool = True, tokenizer=None, dedup: bool = True, quality: bool = True) -> dict:
    """Build the corpus into out_dir and return the SOURCES.json record.

    roots maps source names to already unpacked trees (a path or a list of paths; skips apt/dpkg;
    used by tests). tokenizer (a tokenizers.Tokenizer) counts tokens per source and split.
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
    trees: dict[str, list[Path]] = {}
    versions: dict[str, dict] = {}
    for name in names:  # fetch everything first: a missing package fails before any long work
        if roots is not None:
            r = roots[name]
            trees[name], versions[name] = ([Path(p) for p in r] if isinstance(r, (list, tuple)) else [Path(r)]), {}
        else:
            trees[name], versions[name] = prepare_source(name, cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "SOURCES.json").unlink(missing_ok=True)  # the completion marker goes first
    count_tokens = _token_counter(tokenizer)
    deduper = Deduper()
    zero = lambda: {"documents": 0, "bytes": 0, "tokens": 0}  # noqa: E731
    totals = {s: zero() for s in SPLITS}
    tmp = {s: out_dir / f"{s}.jsonl.tmp" for s in SPLITS}
    with open(tmp["train"], "w", encoding="utf-8") as ftr, open(tmp["heldout"], "w", encoding="utf-8") as fho:
        files = {"train": ftr, "heldout": fho}
        for name in names:
            stats, dropped = {s: zero() for s in SPLITS}, {}
            batch: dict[str, list[str]] = {s: [] for s in SPLITS}

            def flush(split):
                n = count_tokens(batch[split])
                stats[split]["tokens"] += n
                totals[split]["tokens"] += n
                batch[split].clear()

            for doc in iter_documents(name, SOURCES[name], trees[name], progress=progress):
                why = (quality_problem(doc["text"]) if quality else "") or (deduper.check(doc["text"]) if dedup else "")
                if why:
                    dropped[why] = dropped.get(why, 0) + 1
                    continue
                split = split_of(name, doc["path"], heldout_frac)
                files[split].write(json.dumps(doc, ensure_ascii=False) + "\n")
                for d in (stats[split], totals[split]):
                    d["documents"] += 1
                    d["bytes"] += len(doc["text"].encode("utf-8"))
                batch[split].append(doc["text"])
                if len(batch[split]) >= 256:
                    flush(split)
            for s in SPLITS:
                flush(s)
            entry = {"versions": versions[name]} if versions[name] else {}
            entry.update({k: v for k, v in SOURCES[name].items()})
            entry.update(stats)
            entry["dropped"] = dropped
            copies = _copy_licences(name, trees[name], versions[name], out_dir)
            if copies:
                entry["licence_copy"] = copies[0] if len(copies) == 1 else copies
            record["sources"][name] = entry
            if progress:
                print(_summary_line(name, entry), file=sys.stderr, flush=True)
    for s in SPLITS:
        os.replace(tmp[s], out_dir / f"{s}.jsonl")
    record["totals"] = totals
    record["dedup"] = deduper.counts if dedup else None
    _write_json(out_dir / "SOURCES.json", record)
    return record


def _summary_line(name: str, s: dict) -> str:
    tr, ho = s["train"], s["heldout"]
    drop = ", ".join(f"{k} {v}" for k, v in sorted(s.get("dropped", {}).items())) or "none"
    return (f"{name} ({s['licence']}): {tr['tokens'] + ho['tokens']:,} tokens, {tr['documents']} train + "
            f"{ho['documents']} heldout docs, {(tr['bytes'] + ho['bytes']) / 1e6:.1f} MB; dropped: {drop}")


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
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json that counts tokens (default: the bundled one)")
    p.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    p.add_argument("--force", action="store_true", help="rebuild even if --out holds a complete corpus")
    p.add_argument("--apt-update", action="store_true", help="run `apt-get update` first (root)")
    args = p.parse_args(argv)
    if is_built(args.out) and not args.force:
        print(f"{args.out} already holds a complete corpus (SOURCES.json); use --force to rebuild")
        return 0
    try:
        tok = load_tokenizer(args.tokenizer)
        if args.apt_update:
            run_tool(["apt-get", "update"], "apt-get update")
        rec = build_corpus(args.out, args.cache, [s for s in args.sources.split(",") if s],
                           force=args.force, heldout_frac=args.heldout_frac, tokenizer=tok,
                           dedup=not args.no_dedup)
    except (CorpusError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, s in rec["sources"].items():
        print(_summary_line(name, s))
    t = rec["totals"]
    print(f"total: {t['train']['tokens']:,} train tokens in {t['train']['documents']} docs "
          f"({t['train']['bytes'] / 1e6:.1f} MB), {t['heldout']['tokens']:,} heldout tokens in "
          f"{t['heldout']['documents']} docs ({t['heldout']['bytes'] / 1e6:.2f} MB); "
          f"dedup {rec.get('dedup')} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
