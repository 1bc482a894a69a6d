"""train.corpus / train.rst_clean on small fake Sphinx trees: no apt, dpkg or network needed."""
import json
import os
import random
from pathlib import Path

import pytest

from train import corpus
from train.corpus import CorpusError, build_corpus, extract_deb, fetch_deb, find_source_files, split_of
from train.rst_clean import clean_rst, collect_refs

RST = """\
.. _intro-label:

************
Introduction
************

.. index:: single: spam

.. highlight:: python

This is :func:`len` and :class:`~collections.abc.Sized`, a ``literal``,
see :ref:`intro-label` and `the site <https://example.org>`_. A role broken
over lines: :ref:`the docs
<intro-label>`.

Usage
=====

.. function:: spam(a, b=1, \\
              c=2)

   Return *a* plus *b*.

   .. versionadded:: 3.2

   .. note::
      :class: tight

      Keep prose.

Example::

    >>> spam(1)
    2

.. code-block:: python
   :linenos:

   def f():
       return ".. not a directive"

.. This comment is dropped
   and so is its continuation.

Last words.
"""


def test_clean_rst_keeps_prose_and_code_drops_noise():
    out = clean_rst(RST)
    assert out.startswith("# Introduction\n")
    assert "## Usage" in out
    for noise in (".. index", "single: spam", ".. highlight", ".. _intro-label", ":linenos:", ":class: tight",
                  "This comment", "its continuation", "*****", "====="):
        assert noise not in out, noise
    assert "This is `len()` and `Sized`, a `literal`," in out
    assert "see intro-label and the site." in out  # no refs collected: the label stays
    assert "over lines: the docs." in out
    assert "`spam(a, b=1, c=2)`" in out
    assert "   Return *a* plus *b*." in out
    assert "New in version 3.2." in out
    assert "Note:" in out and "Keep prose." in out
    assert "Example:\n\n```\n>>> spam(1)\n2\n```" in out
    assert '```python\ndef f():\n    return ".. not a directive"\n```' in out
    assert out.rstrip().endswith("Last words.")
    assert out.count("```") % 2 == 0


def test_collect_refs_resolves_ref_and_doc_roles():
    refs: dict[str, str] = {}
    collect_refs(RST, "tutorial/intro.rst", refs)
    assert refs["label:intro-label"] == "Introduction"
    assert refs["doc:tutorial/intro"] == "Introduction"
    out = clean_rst("See :ref:`intro-label` and :doc:`intro` and :doc:`/tutorial/intro`.\n", refs,
                    "tutorial/other.rst")
    assert out == "See Introduction and Introduction and Introduction.\n"


def test_clean_rst_edge_cases():
    assert clean_rst("") == ""
    assert clean_rst(".. toctree::\n   :maxdepth: 2\n\n   a\n   b\n") == ""
    assert clean_rst("Text::\n\n   code\n").endswith("```\ncode\n```\n")  # block at end of file
    assert clean_rst("Ends with colon ::\n\n  x = 1\n\nafter\n").startswith("Ends with colon\n\n```\nx = 1\n```")


def _fake_tree(root: Path, docs: dict[str, str]) -> Path:
    """A tree shaped like an extracted -doc package: .../html/_sources/*.rst.txt."""
    src = root / "usr/share/doc/pkg/html/_sources"
    for rel, text in docs.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text, encoding="utf-8")
    (src / "logo.png").write_bytes(b"\x89PNG")
    os.symlink(root / "usr/share/doc/pkg", root / "usr/share/doc/pkg-alias")  # Debian-style doc link
    licence = root / corpus.SOURCES["sphinx-doc"]["licence_file"]
    licence.parent.mkdir(parents=True, exist_ok=True)
    licence.write_text("License: BSD-2-clause\n")
    return root


def _docs(n: int) -> dict[str, str]:
    """n distinct pages (the corpus drops exact and near duplicates, so each page has its own words)."""
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()

    def body(i: int) -> str:
        rng = random.Random(i)
        return " ".join(rng.choice(words) + rng.choice(words) for _ in range(60)) + "."

    docs = {f"sec{i % 3}/page{i}.rst.txt": f"Page {i}\n=======\n\n{body(i)}\n" for i in range(n)}
    docs["tiny.rst.txt"] = ".. toctree::\n\n   a\n"  # empty after clean-up: dropped
    return docs


def test_find_source_files(tmp_path):
    root = _fake_tree(tmp_path, _docs(5))
    files = find_source_files(root)
    rels = [r for r, _ in files]
    assert rels == sorted(rels) and len(rels) == 6  # symlinked alias not walked twice; png skipped
    assert "sec0/page0.rst" in rels and "tiny.rst" in rels


def test_split_is_deterministic_and_about_two_percent():
    paths = [f"lib/mod{i}.rst" for i in range(20000)]
    splits = [split_of("src", p) for p in paths]
    assert splits == [split_of("src", p) for p in paths]
    frac = splits.count("heldout") / len(splits)
    assert 0.015 < frac < 0.025
    assert split_of("src", "x.rst", heldout_frac=0.0) == "train"
    assert split_of("src", "x.rst", heldout_frac=1.0) == "heldout"


def test_build_corpus_outputs_and_idempotence(tmp_path):
    root = _fake_tree(tmp_path / "tree", _docs(60))
    out = tmp_path / "corpus"
    rec = build_corpus(out, tmp_path / "cache", roots={"sphinx-doc": root}, heldout_frac=0.2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["SOURCES.json", "heldout.jsonl", "licences", "train.jsonl"]
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in corpus.SPLITS}
    all_rows = rows["train"] + rows["heldout"]
    assert len(all_rows) == 60 and rows["heldout"] and rows["train"]
    assert all(set(r) == {"text", "source", "path"} and r["source"] == "sphinx-doc" for r in all_rows)
    assert all(split_of("sphinx-doc", r["path"], 0.2) == s for s in corpus.SPLITS for r in rows[s])
    assert rows["train"][0]["text"].startswith("# Page")
    on_disk = json.loads((out / "SOURCES.json").read_text())
    assert on_disk == rec
    src = rec["sources"]["sphinx-doc"]
    assert src["licence"] == "BSD-2-Clause" and src["licence_copy"] == "licences/sphinx-doc.copyright"
    assert src["train"]["documents"] + src["heldout"]["documents"] == 60
    assert rec["totals"]["train"]["bytes"] == sum(len(r["text"].encode()) for r in rows["train"])

    (out / "train.jsonl").write_text("sentinel\n")  # a second run without force leaves it alone
    assert build_corpus(out, tmp_path / "cache", roots={"sphinx-doc": root}, progress=False) == rec
    assert (out / "train.jsonl").read_text() == "sentinel\n"
    assert corpus.main(["--out", str(out)]) == 0
    build_corpus(out, tmp_path / "cache", roots={"sphinx-doc": root}, heldout_frac=0.2, force=True, progress=False)
    assert len((out / "train.jsonl").read_text().splitlines()) == len(rows["train"])
    assert not list(out.glob("*.tmp"))


def test_unknown_source_is_rejected(tmp_path):
    with pytest.raises(CorpusError, match="unknown source"):
        build_corpus(tmp_path / "c", tmp_path / "cache", sources=["no-such-doc"])


def test_fetch_deb_uses_cache_without_apt(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    cached = tmp_path / "pkg-doc_1.0-1_all.deb"
    cached.write_bytes(b"!<arch>\n")
    assert fetch_deb("pkg-doc", tmp_path) == cached


def test_missing_apt_and_dpkg_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(CorpusError, match=r"`apt-get` not found.*apt-get download python3.11-doc"):
        fetch_deb("python3.11-doc", tmp_path / "cache")
    deb = tmp_path / "x_1_all.deb"
    deb.write_bytes(b"")
    with pytest.raises(CorpusError, match="`dpkg-deb` not found"):
        extract_deb(deb, tmp_path / "extract" / "x")
