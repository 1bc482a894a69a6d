"""A small synthetic documentation corpus (train.corpus format) and a 512-token BPE trained on it.

The documents look like the cleaned Sphinx pages of the real corpus (a module title, prose, API
entries with indented descriptions, sections), from a small vocabulary so that a test-preset model
learns it within a few dozen steps.
"""
import json
import random
from pathlib import Path

import pytest
import torch

from mobilemoe.tokenizer import train_tokenizer

TOPICS = ["paths", "files", "numbers", "strings", "queues", "dates", "sockets", "threads"]
NOUNS = ["value", "list", "name", "result", "object", "buffer", "record", "table"]
VERBS = ["return", "read", "write", "build", "check", "convert", "sort", "split"]
ADJS = ["new", "empty", "sorted", "small", "valid", "default", "first", "last"]


def _sentence(r: random.Random) -> str:
    return (f"This function will {r.choice(VERBS)} the {r.choice(ADJS)} {r.choice(NOUNS)} and then "
            f"{r.choice(VERBS)} a {r.choice(ADJS)} {r.choice(NOUNS)} for the caller.")


def make_doc(i: int) -> dict:
    r = random.Random(i)
    topic = TOPICS[i % len(TOPICS)]
    lines = [f"# `mod{i}` --- Tools for {topic}", "",
             " ".join(_sentence(r) for _ in range(3)), ""]
    for j in range(4):
        lines += [f"`f{j}(x, y)`", "", "   " + _sentence(r), "   " + _sentence(r), ""]
    lines += [f"## Working with {topic}", ""]
    for _ in range(4):
        lines += [" ".join(_sentence(r) for _ in range(2)), ""]
    return {"text": "\n".join(lines), "source": "python3.11-doc", "path": f"library/mod{i}.rst"}


@pytest.fixture(autouse=True)
def one_thread():
    """Test-preset matmuls are tiny: a second thread only adds sync cost (a lot on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for split, ids in (("train", range(48)), ("heldout", range(100, 104))):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in ids:
                f.write(json.dumps(make_doc(i)) + "\n")
    train_tokenizer([d / "train.jsonl"], 512, d / "tokenizer.json", show_progress=False)
    return d


@pytest.fixture(scope="session")
def tokenizer_path(corpus_dir) -> Path:
    return corpus_dir / "tokenizer.json"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from mobilemoe.tokenizer import load_tokenizer
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def stage_kwargs(corpus_dir):
    """stage_kwargs(out_dir, **overrides): StageConfig fields for a seconds-long CPU run of test-moe."""
    return lambda out, **kw: _stage_kwargs(corpus_dir, Path(out), **kw)


def _stage_kwargs(corpus_dir: Path, out: Path, **kw) -> dict:
    base = dict(model="test-moe", tokenizer=str(corpus_dir / "tokenizer.json"), out_dir=str(out),
                train_data=[str(corpus_dir / "train.jsonl")], heldout_data=[str(corpus_dir / "heldout.jsonl")],
                cache_dir=str(out.parent / "cache"), seq_len=32, batch_size=4, max_steps=12, warmup_steps=2,
                lr=3e-3, eval_every=6, eval_tokens=256, log_every=1, ckpt_every=4, device="cpu",
                progress=False)
    base.update(kw)
    return base
