"""Question/answer pairs with checkable answers (train.qa_pairs, train.sft_data) and the
exact-answer check (mobilemoe.answer_check), on small fixtures."""
import json

import pytest

from mobilemoe.answer_check import check_answer, content_words, exact_answer_rate, names, read_qa
from train.man_clean import clean_man
from train.qa_pairs import api_reverse_pairs, man_items, man_pairs, qa_split
from train.sft_data import build_sft_data, doc_pairs

MAN = r""".TH LS 1
.SH NAME
ls \- list directory contents
.SH DESCRIPTION
List information about the FILEs.
.TP
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with .
.TP
\fB\-l\fR
use a long listing format
.TP
\fB\-\-color\fR[=\fI\,WHEN\/\fR]
color the output WHEN; more info below
"""
MAN3 = """.TH PRINTF 3
.SH NAME
printf, fprintf,
sprintf \\- formatted output conversion
.SH DESCRIPTION
The functions produce output according to a format.
"""
API_DOC = """# `os.path` --- Common pathname manipulations

This module implements some useful functions on pathnames, for reading and writing files.

`join(path, *paths)`

    Join one or more path segments intelligently. The return value is the concatenation.

`sep`

    See os.sep.
"""


def _doc(text, source="tool-manpages", path="man1/ls.1"):
    return {"text": text, "source": source, "path": path}


def test_man_items_names_summary_options():
    names_, summary, options = man_items(clean_man(MAN))
    assert names_ == ["ls"] and summary == "list directory contents"
    assert options == [(["-a", "--all"], "do not ignore entries starting with ."),
                       (["-l"], "use a long listing format"),
                       (["--color"], "color the output WHEN; more info below")]
    assert man_items(clean_man(MAN3))[:2] == (["printf", "fprintf", "sprintf"], "formatted output conversion")


def test_man_pairs_both_directions_with_checks():
    recs = list(man_pairs(_doc(clean_man(MAN))))
    by_q = {r["messages"][0]["content"]: r for r in recs}
    fwd = by_q["What does the `ls` command do?"]
    assert fwd["messages"][1]["content"] == "`ls`: list directory contents."
    assert fwd["check"] == {"words": ["list", "directory", "contents"], "min_share": 0.5}
    rev = by_q["Which command does this: list directory contents?"]
    assert rev["messages"][1]["content"] == "`ls`." and rev["check"] == {"any_of": ["ls"]}
    a_pairs = [r for r in recs if r["item"] == "option:ls -a"]
    assert len(a_pairs) == 2 and {r["kind"] for r in a_pairs} == {"option"}
    answers = {r["messages"][1]["content"] for r in a_pairs}
    assert "`-a`, `--all`: do not ignore entries starting with ." in answers and "`-a` (`--all`)." in answers
    assert any("`ls -a`" in r["messages"][0]["content"] or "`-a` option of `ls`" in r["messages"][0]["content"]
               for r in a_pairs)
    # section 3: functions, and no option questions
    recs3 = list(man_pairs(_doc(clean_man(MAN3), "manpages", "man3/printf.3")))
    assert [r["messages"][0]["content"] for r in recs3] == [
        "What does the C function `printf()` do?", "Which C library function does this: formatted output conversion?"]
    assert recs3[1]["check"] == {"any_of": ["printf", "fprintf", "sprintf"]}


def test_api_pairs_and_doc_pairs():
    rev = list(api_reverse_pairs(_doc(API_DOC, "python3.11-doc", "library/os.path.rst"), "Python"))
    assert len(rev) == 1  # "See os.sep." is too short to ask about
    assert rev[0]["messages"][1]["content"] == "`os.path.join()`."
    assert rev[0]["check"] == {"any_of": ["os.path.join", "join"]} and rev[0]["item"] == "api:os.path.join"
    assert "Join one or more path segments intelligently?" in rev[0]["messages"][0]["content"]
    recs = list(doc_pairs(_doc(API_DOC, "python3.11-doc", "library/os.path.rst")))
    kinds = sorted(r["kind"] for r in recs)
    assert kinds == ["api", "api", "section"]
    fwd = next(r for r in recs if r["kind"] == "api" and "os.path.join" in r["messages"][0]["content"]
               and r["messages"][1]["content"].startswith("Join"))
    assert fwd["item"] == rev[0]["item"]  # both directions share the item, hence the split
    assert all(set(r) == {"messages", "check", "kind", "item", "source", "path"} for r in recs)


def test_qa_split_deterministic_fraction():
    items = [f"option:cmd{i} -x" for i in range(20000)]
    splits = [qa_split("s", it) for it in items]
    assert splits == [qa_split("s", it) for it in items]
    assert 0.04 < splits.count("heldout_qa") / len(splits) < 0.06


def test_names_is_whole_token():
    assert names("Use `ls -a` here", "-a") and names("-a, --all: do", "--all")
    assert not names("use -al", "-a") and not names("--almost-all", "--all") and not names("-A", "-a")
    assert names("`os.path.join()`.", "os.path.join") and not names("os.path.joinall", "os.path.join")
    assert names("call join(x).", "join") and not names("os.path.join", "path")


def test_check_answer():
    assert check_answer("It is `-a`.", {"any_of": ["-a", "--all"]})
    assert not check_answer("It is `-l`.", {"any_of": ["-a", "--all"]})
    words = content_words("do not ignore entries starting with .")
    assert words == ["ignore", "entries", "starting"]
    assert check_answer("It shows entries starting with a dot.", {"words": words, "min_share": 0.5})
    assert not check_answer("It lists files.", {"words": words, "min_share": 0.5})
    assert not check_answer("anything", {"words": [], "min_share": 0.5})
    with pytest.raises(ValueError, match="any_of"):
        check_answer("x", {})


def test_exact_answer_rate_and_build_sft_data(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    man_docs = [_doc(clean_man(MAN.replace("ls", f"ls{c}")), path=f"man1/ls{c}.1") for c in "abcdefghijklmnopqrst"]
    (corpus / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in man_docs + [
        _doc(API_DOC, "python3.11-doc", "library/os.path.rst")]))
    (corpus / "heldout.jsonl").write_text(json.dumps(_doc(clean_man(MAN3), "manpages", "man3/printf.3")) + "\n")
    counts = build_sft_data(corpus, tmp_path / "sft", qa_heldout_frac=0.3)
    assert counts["heldout"] == 2 and counts["train"] > 0 and counts["heldout_qa"] > 0
    recs = {s: [json.loads(x) for x in (tmp_path / "sft" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "heldout_qa", "heldout")}
    # 8 pairs a man page, 3 of the API doc; "Which command does this: list directory contents?" is
    # the same question for all 20 pages: kept once per split
    same = "Which command does this: list directory contents?"
    n_same = [sum(r["messages"][0]["content"] == same for r in recs[s]) for s in ("train", "heldout_qa")]
    assert all(n <= 1 for n in n_same) and sum(n_same) >= 1
    assert counts["train"] + counts["heldout_qa"] == 20 * 7 + 3 + sum(n_same)
    assert not {r["item"] for r in recs["train"]} & {r["item"] for r in recs["heldout_qa"]}
    qa = read_qa(tmp_path / "sft" / "heldout_qa.jsonl")
    oracle = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in qa}
    res = exact_answer_rate(lambda qs: [oracle[q] for q in qs], qa)
    assert res["rate"] == 1.0 and res["n"] == len(qa) and len(res["samples"]) == min(5, len(qa))
    assert exact_answer_rate(lambda qs: ["no idea"] * len(qs), qa)["rate"] == 0.0
    two = read_qa(tmp_path / "sft" / "heldout_qa.jsonl", limit=2)  # spread over the file, in order
    assert len(two) == 2 and two[0] == qa[0] and two[1] == qa[len(qa) // 2]
    with pytest.raises(ValueError, match="'check'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"messages": []}) + "\n")
        read_qa(bad)
