"""The corpus' non-Sphinx pieces on small fixtures: roff and HTML clean-up, dedup, quality filter,
multi-kind builds, nested tarballs and fetch errors. No apt, dpkg or network needed."""
import gzip
import json
import os
import random
import tarfile
from pathlib import Path

import pytest

from train import corpus
from train.corpus import CorpusError, build_corpus, fetch_deb
from train.corpus_docs import find_files
from train.corpus_fetch import extract_tarball
from train.dedup import Deduper, exact_key, minhash, quality_problem
from train.html_clean import clean_html
from train.man_clean import clean_man, unescape

MAN = r""".\" Comment line
.TH LS 1 "2023" "GNU coreutils" "User Commands"
.SH NAME
ls \- list directory contents
.SH SYNOPSIS
.B ls
[\fI\,OPTION\/\fR]... [\fI\,FILE\/\fR]...
.SH DESCRIPTION
.\" Add any additional description here
.PP
List information about the FILEs (the current directory by default).
.TP
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with .
.TP
.BR \-l
use a long listing format
.SS Examples
.nf
ls \-la /tmp
.fi
.IX Item "index noise"
Last \(aqwords\(aq \*(L"quoted\*(R".
"""

HTML = """<html><head><title>os.path — Common pathname manipulations</title><style>p{}</style></head>
<body><div class="related" role="navigation"><ul><li><a href="x">index</a></li></ul></div>
<div class="sphinxsidebar"><p>Sidebar text to drop.</p></div>
<div class="body" role="main">
<h1>os.path<a class="headerlink" href="#">¶</a></h1>
<p>This module implements some <em>useful</em> functions on <code>pathnames</code>.</p>
<dl class="py function"><dt id="os.path.join"><code>os.path.</code><code>join</code>(<em>path</em>, <em>*paths</em>)
<a class="reference internal" href="#"><span class="viewcode-link">[source]</span></a></dt>
<dd><p>Join one or more path segments intelligently.</p><p>Second paragraph.</p></dd></dl>
<pre>&gt;&gt;&gt; os.path.join("a", "b")
'a/b'</pre>
<ul><li>First item</li><li>Second item</li></ul>
</div>
<div class="footer">Copyright footer to drop.</div><script>var x = 1;</script></body></html>
"""


def test_unescape_roff():
    assert unescape(r"\fB\-a\fR, \(aqx\(aq \*(L\"q\*(R\" \e [\fI\,OPTION\/\fR]") == "-a, 'x' \"q\" \\ [OPTION]"


def test_clean_man_sections_options_code():
    out = clean_man(MAN)
    assert out.startswith("# NAME\n\nls - list directory contents\n")
    assert "# SYNOPSIS\n\nls\n[OPTION]... [FILE]..." in out
    assert "-a, --all\n    do not ignore entries starting with ." in out
    assert "-l\n    use a long listing format" in out
    assert "## Examples" in out and "```\nls -la /tmp\n```" in out
    assert "Last 'words' \"quoted\"." in out
    for noise in ("Comment line", "additional description", ".TH", "index noise", "\\f"):
        assert noise not in out, noise
    assert clean_man(".TH X 1\n.\\\" nothing else\n") == ""


def test_clean_html_main_content_and_api_entries():
    out = clean_html(HTML)
    assert out.startswith("# os.path\n")
    assert "This module implements some useful functions on `pathnames`." in out
    assert "`os.path.join(path, *paths)`\n\n    Join one or more path segments intelligently." in out
    assert "    Second paragraph." in out
    assert '```\n>>> os.path.join("a", "b")\n\'a/b\'\n```' in out
    assert "- First item\n- Second item" in out
    for noise in ("Sidebar", "footer", "var x", "index", "[source]", "¶", "p{}"):
        assert noise not in out, noise
    assert clean_html("<html><body><nav>only nav</nav></body></html>") == ""
    assert clean_html("<p>no main marker: <b>kept</b></p>") == "no main marker: kept\n"
    page = '<div id="page-header">Menu</div><div id="page-content"><p>Apache-style page text.</p></div>'
    assert clean_html(page) == "Apache-style page text.\n"  # "page-content" is not the marker id "content"


def _text(seed: int, n: int = 200) -> str:
    rng = random.Random(seed)
    words = [f"w{chr(97 + rng.randrange(26))}{chr(97 + rng.randrange(26))}" for _ in range(n)]
    return " ".join(words) + "."


def test_dedup_exact_near_and_distinct():
    a = _text(1)
    near = a.replace(a.split()[100], "changed", 1)  # one word of 200 differs
    d = Deduper()
    assert d.check(a) == ""
    assert d.check("  " + a.upper().replace(" ", "\n")) == "exact"  # case and whitespace only
    assert d.check(near) == "near"
    assert d.check(_text(2)) == ""
    assert d.counts == {"kept": 2, "exact": 1, "near": 1}
    assert exact_key("Version 3.11") == exact_key("version 2.10")  # digits are normalized
    sig = minhash(a)
    assert sig.shape == (32,) and (sig == minhash(a)).all()
    assert (minhash(a) == minhash(_text(3))).mean() < 0.2


def test_quality_problem():
    assert quality_problem("short") == "too short"
    assert quality_problem("0x1f 0x2e 0x3d 12 34 56 " * 40) == "few letters"
    assert quality_problem("same line here\n" * 50) == "repetitive"
    assert quality_problem("".join(f"QUJD{i:03d}" * 16 + " and\n" for i in range(10))) == "long words"
    assert quality_problem("word " * 200 + "\n") == ""  # one long line of prose (an HTML paragraph) is fine
    assert quality_problem(_text(5, 60).replace(" ", "\n", 30)) == ""


def _man_tree(root: Path) -> Path:
    d = root / "usr/share/man/man1"
    d.mkdir(parents=True)
    (d / "ls.1.gz").write_bytes(gzip.compress(MAN.encode()))
    (d / "dir.1.gz").write_bytes(gzip.compress(MAN.encode()))  # an exact duplicate: dropped
    (d / "vdir.1").write_text(".so man1/ls.1\n")  # a link page: skipped
    (d / "other.1").write_text(".TH O 1\n.SH NAME\nother \\- a different page\n.SH DESCRIPTION\n"
                               + _text(7) + "\n")
    lic = root / "usr/share/doc/manpages/copyright"
    lic.parent.mkdir(parents=True)
    lic.write_text("License: GPL-2+\n")
    return root


def test_build_corpus_man_and_html_kinds(tmp_path):
    man = _man_tree(tmp_path / "man")
    html = tmp_path / "html" / "usr/share/doc/postgresql-doc-15/html"
    html.mkdir(parents=True)
    (html / "os.html").write_text(HTML)
    (html / "bookindex.html").write_text(HTML.replace("os.path", "index page"))  # excluded by name
    assert [r for r, _ in find_files(tmp_path / "html", corpus.SOURCES["postgresql-doc-15"]["include"],
                                     corpus.SOURCES["postgresql-doc-15"]["exclude"])] == ["os.html"]
    out = tmp_path / "corpus"
    rec = build_corpus(out, tmp_path / "cache", roots={"manpages": [man], "postgresql-doc-15": tmp_path / "html"},
                       heldout_frac=0.0, progress=False)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [(r["source"], r["path"]) for r in rows] == [
        ("manpages", "man1/dir.1"), ("manpages", "man1/other.1"), ("postgresql-doc-15", "os.html")]
    m = rec["sources"]["manpages"]
    assert m["dropped"] == {"exact": 1} and m["train"]["documents"] == 2
    assert m["licence_copy"] == "licences/manpages.copyright" and (out / m["licence_copy"]).is_file()
    assert rec["dedup"] == {"kept": 3, "exact": 1, "near": 0}


class _FakeTokenizer:
    def encode_batch(self, texts, add_special_tokens=False):
        return [type("E", (), {"ids": t.split()})() for t in texts]


def test_build_corpus_counts_tokens(tmp_path):
    man = _man_tree(tmp_path / "man")
    rec = build_corpus(tmp_path / "c", tmp_path / "cache", roots={"manpages": man}, heldout_frac=0.0,
                       progress=False, tokenizer=_FakeTokenizer())
    rows = [json.loads(line) for line in (tmp_path / "c" / "train.jsonl").read_text().splitlines()]
    assert rec["totals"]["train"]["tokens"] == sum(len(r["text"].split()) for r in rows) > 0


def test_extract_tarball_member(tmp_path):
    src = tmp_path / "src" / "linux-source-6.1" / "Documentation"
    src.mkdir(parents=True)
    (src / "index.rst").write_text("Title\n=====\n\nText.\n")
    (tmp_path / "src" / "linux-source-6.1" / "Makefile").write_text("all:\n")
    tarball = tmp_path / "linux.tar.xz"
    with tarfile.open(tarball, "w:xz") as tf:
        tf.add(tmp_path / "src" / "linux-source-6.1", arcname="linux-source-6.1")
    dest = extract_tarball(tarball, "linux-source-6.1/Documentation", tmp_path / "tree")
    assert (dest / "linux-source-6.1/Documentation/index.rst").is_file()
    assert not (dest / "linux-source-6.1/Makefile").exists()
    assert extract_tarball(tarball, "linux-source-6.1/Documentation", tmp_path / "tree") == dest  # cached
    with pytest.raises(CorpusError, match="tarball not found"):
        extract_tarball(tmp_path / "missing.tar.xz", "x", tmp_path / "t2")


def test_fetch_error_is_one_line_naming_the_package(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text("#!/bin/sh\necho 'Reading package lists...'\necho 'E: Unable to locate package no-such-doc' >&2\n"
                   "exit 100\n")
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(CorpusError) as e:
        fetch_deb("no-such-doc", tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "cannot fetch Debian package `no-such-doc`" in msg
    assert "Unable to locate package no-such-doc" in msg and "apt-get update" in msg
