"""train.data: reading, packing (stream / examples), the cache, deterministic order, bad inputs."""
import json

import numpy as np
import pytest

from mobilemoe.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode_chat
from train.data import (IGNORE_INDEX, DataError, DataSpec, RowOrder, build_rows, in_split, iter_records,
                        resolve_files)


def _stream_ids(tokenizer, path):
    ids = []
    for rec in iter_records(path):
        ids += [BOS_ID, *tokenizer.encode(rec["text"], add_special_tokens=False).ids, EOS_ID]
    return ids


def test_stream_packing_covers_every_token_once(corpus_dir, tokenizer, tmp_path):
    rows = build_rows(DataSpec((str(corpus_dir / "heldout.jsonl"),), seq_len=16), tokenizer, tmp_path)
    stream = _stream_ids(tokenizer, corpus_dir / "heldout.jsonl")
    assert len(rows) == (len(stream) - 1) // 16
    x, y = rows.batch(np.arange(len(rows)))
    assert x.shape == y.shape == (len(rows), 16)
    # inputs concatenated are the stream; targets are the stream shifted by one
    assert x.flatten().tolist() == stream[:len(rows) * 16]
    assert y.flatten().tolist() == stream[1:len(rows) * 16 + 1]
    assert rows.target_tokens() == len(rows) * 16


def test_packing_is_deterministic_and_cached(corpus_dir, tokenizer, tmp_path):
    spec = DataSpec((str(corpus_dir / "train.jsonl"),), seq_len=32)
    a = build_rows(spec, tokenizer, tmp_path / "a")
    b = build_rows(spec, tokenizer, tmp_path / "b")
    assert a.dir.name == b.dir.name  # same key: contents + tokenizer + settings
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    again = build_rows(spec, tokenizer, tmp_path / "a")
    assert again.dir == a.dir
    other = build_rows(DataSpec(spec.files, seq_len=24), tokenizer, tmp_path / "a")
    assert other.dir != a.dir


def test_cache_key_follows_file_contents(corpus_dir, tokenizer, tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text((corpus_dir / "heldout.jsonl").read_text())
    first = build_rows(DataSpec((str(f),), seq_len=16), tokenizer, tmp_path / "cache")
    with open(f, "a") as fh:
        fh.write(json.dumps({"text": "one more document about paths and files " * 5}) + "\n")
    second = build_rows(DataSpec((str(f),), seq_len=16), tokenizer, tmp_path / "cache")
    assert second.dir != first.dir and len(second) > len(first)


def test_examples_packing_masks_answers_only(tokenizer, tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"What does f{i} do?"},
                           {"role": "assistant", "content": f"It returns the value {i} twice."}]} for i in range(6)]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in chats))
    rows = build_rows(DataSpec((str(f),), seq_len=64, packing="examples"), tokenizer, tmp_path / "cache")
    ids0, mask0 = encode_chat(tokenizer, chats[0]["messages"])
    assert rows.tokens[0, :len(ids0)].tolist() == ids0 and rows.mask[0, :len(ids0)].tolist() == mask0
    # every example sits whole in one row; the rest of a row is masked padding
    flat = [t for r in range(len(rows)) for t in rows.tokens[r].tolist()]
    assert flat.count(BOS_ID) == len(chats)
    x, y = rows.batch(np.arange(len(rows)))
    pad_targets = y[x == PAD_ID]
    assert (pad_targets == IGNORE_INDEX).all()
    trained = sum(sum(encode_chat(tokenizer, c["messages"])[1]) for c in chats)
    assert int((y != IGNORE_INDEX).sum()) == trained == rows.target_tokens()


def test_text_records_in_examples_packing_are_split(corpus_dir, tokenizer, tmp_path):
    rows = build_rows(DataSpec((str(corpus_dir / "heldout.jsonl"),), seq_len=32, packing="examples"),
                      tokenizer, tmp_path)
    stream = _stream_ids(tokenizer, corpus_dir / "heldout.jsonl")
    assert rows.target_tokens() == len(stream) - 4  # every token but each document's BOS


def test_row_order_is_a_permutation_per_epoch_and_resumable():
    order = RowOrder(10, seed=3)
    epoch0, epoch1 = order.rows(0, 10), order.rows(10, 10)
    assert sorted(epoch0.tolist()) == list(range(10)) == sorted(epoch1.tolist())
    assert epoch0.tolist() != epoch1.tolist()
    whole = order.rows(0, 27)
    fresh = RowOrder(10, seed=3)  # a resumed run: a new object, same answers
    assert np.array_equal(np.concatenate([fresh.rows(0, 7), fresh.rows(7, 13), fresh.rows(20, 7)]), whole)
    assert not np.array_equal(RowOrder(10, seed=4).rows(0, 10), epoch0)


def test_heldout_frac_split_is_disjoint_and_complete(corpus_dir):
    f = corpus_dir / "train.jsonl"
    recs = list(iter_records(f))
    train = [i for i, r in enumerate(recs) if in_split(r, i, f, "train", 0.25)]
    held = [i for i, r in enumerate(recs) if in_split(r, i, f, "heldout", 0.25)]
    assert sorted(train + held) == list(range(len(recs))) and held and train


def test_plain_text_and_directories(tmp_path, tokenizer):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second file about sockets and threads. " * 20)
    (tmp_path / "docs" / "a.md").write_text("first file about paths and files. " * 20)
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\0\1")
    files = resolve_files([tmp_path / "docs"])
    assert [f.name for f in files] == ["a.md", "b.txt"]
    rows = build_rows(DataSpec((str(tmp_path / "docs"),), seq_len=16), tokenizer, tmp_path / "cache")
    assert len(rows) > 4


def test_parquet_when_pyarrow_is_installed(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["parquet rows about dates and queues. " * 10] * 3}), tmp_path / "d.parquet")
    assert len(build_rows(DataSpec((str(tmp_path / "d.parquet"),), seq_len=16), tokenizer, tmp_path / "c")) > 0


# ---------------------------------------------------------------------------- bad inputs
def test_missing_file_is_named(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file or directory not found"):
        build_rows(DataSpec((str(tmp_path / "nope.jsonl"),), seq_len=16), tokenizer, tmp_path)


def test_empty_corpus(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty corpus"):
        build_rows(DataSpec((str(tmp_path / "empty.jsonl"),), seq_len=16), tokenizer, tmp_path / "c")
    assert not list((tmp_path / "c").glob("*"))  # nothing half-written is left in the cache


def test_too_few_tokens_for_one_row(tmp_path, tokenizer):
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(DataError, match=r"fewer than one row of seq_len \+ 1 = 129"):
        build_rows(DataSpec((str(tmp_path / "short.jsonl"),), seq_len=128), tokenizer, tmp_path / "c")


def test_malformed_records_name_the_line(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        build_rows(DataSpec((str(tmp_path / "bad.jsonl"),), seq_len=4), tokenizer, tmp_path / "c")
    (tmp_path / "field.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"field\.jsonl:1: expected a JSON object with a 'text' string"):
        build_rows(DataSpec((str(tmp_path / "field.jsonl"),), seq_len=4), tokenizer, tmp_path / "c")


def test_chat_records_need_examples_packing(tmp_path, tokenizer):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="use packing 'examples'"):
        build_rows(DataSpec((str(tmp_path / "chat.jsonl"),), seq_len=4), tokenizer, tmp_path / "c")
