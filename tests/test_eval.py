"""mobilemoe.scoring and mobilemoe.eval against direct PyTorch computations (test-moe, real tokenizer)."""
import json
import math

import numpy as np
import pytest
import torch

from mobilemoe.eval import (TaskError, bundled_tasks, choice_accuracy, compare, load_task, main, markdown,
                            perplexity, read_task_file)
from mobilemoe.generate import generate
from mobilemoe.generate import DEFAULT_MODEL_DIR
from mobilemoe.scoring import ArtifactLM, Scorer, kind_of, open_scorer, rolling_windows
from mobilemoe.tokenizer import BOS_ID
from tests.eval_helpers import MC_ROWS, SAMPLE, make_checkpoint, write_jsonl


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt", 0)


@pytest.fixture(scope="module")
def scorer(ckpt):
    return open_scorer(ckpt)


def direct_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 from one full forward (no KV cache, no windows)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0][0]  # [S - 1, V]: the last id is only predicted
    return torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def test_score_equals_one_full_forward(scorer):
    context, continuation = scorer.encode_pair("The asyncio event loop", " runs coroutines")
    assert context[0] == BOS_ID and scorer.encode("The asyncio event loop runs coroutines") == context + continuation
    logprobs, greedy = scorer.score(context, continuation)
    expected = direct_logprobs(scorer.lm.model, context + continuation)[len(context) - 1:]
    np.testing.assert_allclose(logprobs, expected, atol=1e-4)
    assert greedy is False  # a random model does not produce this text greedily
    # trailing context whitespace moves to the continuation, as in lm-eval
    assert scorer.encode_pair("a b ", "c") == scorer.encode_pair("a b", " c")


def test_long_sequences_keep_their_last_tokens(scorer):
    ids = scorer.encode(SAMPLE)
    assert len(ids) > 300
    context, continuation = ids[:-5], ids[-5:]
    logprobs, _ = scorer.score(context, continuation)
    window = ids[-257:]  # max_seq_len 256 inputs predicting the last 5 tokens
    np.testing.assert_allclose(logprobs, direct_logprobs(scorer.lm.model, window)[-5:], atol=1e-4)


def test_rolling_windows_predict_each_token_once():
    ids = list(range(11))
    windows = rolling_windows(ids, 4)
    assert [c for _, c in windows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert windows[-1][0] == [6, 7, 8]  # the last window sees as much context as fits
    assert all(len(c) + len(t) - 1 <= 4 for c, t in windows)


def test_perplexity_equals_direct_torch(scorer):
    short = "The json module encodes Python objects."
    long = SAMPLE[:1500]  # two max_seq_len windows
    m = perplexity(scorer, [{"text": short}, {"text": long}])
    model, L = scorer.lm.model, scorer.max_len
    total, n = direct_logprobs(model, scorer.encode(short)).sum(), len(scorer.encode(short)) - 1
    ids = scorer.encode(long)
    assert len(ids) > L + 1
    for start in range(1, len(ids), L):  # non-overlapping targets; each window with the most context
        end = min(start + L, len(ids))
        window = ids[max(0, end - 1 - L):end]
        total += direct_logprobs(model, window)[-(end - start):].sum()
    n += len(ids) - 1
    assert m["tokens"] == n and m["docs"] == 2
    assert m["ppl"] == pytest.approx(math.exp(-total / n), rel=1e-5)
    nbytes = len(short.encode()) + len(long.encode())
    assert m["bits_per_byte"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-5)


class LastOnlyRuntime:
    """mobilemoe.runtimes' API (step -> last-position logits as numpy) over a torch model."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    def step(self, ids, kv):
        self.calls.append(len(ids))
        with torch.no_grad():
            logits, kv = self.model(torch.tensor([ids]), kv=kv, last_only=True)
        return logits[0, -1].numpy(), kv


def test_artifact_teacher_forcing_equals_torch(scorer):
    runtime = LastOnlyRuntime(scorer.lm.model)
    artifact = Scorer(ArtifactLM(runtime), scorer.tokenizer)
    context, continuation = scorer.encode_pair("Question: which module parses JSON?\nAnswer:", " the json module")
    a, greedy_a = artifact.score(context, continuation)
    t, greedy_t = scorer.score(context, continuation)
    np.testing.assert_allclose(a, t, atol=1e-4)
    assert greedy_a == greedy_t
    assert runtime.calls == [len(context)] + [1] * (len(continuation) - 1)  # one prefill, then decode steps
    assert artifact.rolling_logprob(SAMPLE[:200]) == pytest.approx(scorer.rolling_logprob(SAMPLE[:200]), rel=1e-5)


def test_generate_is_greedy_decoding(scorer):
    ids = scorer.encode("import json\n")
    new, _ = generate(scorer.lm.model, ids, 8)
    assert scorer.generate("import json\n", [], 8) == scorer.decode(new)
    text = scorer.decode(new)
    stop = text[-1]
    assert scorer.generate("import json\n", [stop], 8) == text.split(stop)[0]


def test_choice_accuracy_counts_argmax(scorer):
    m = choice_accuracy(scorer, MC_ROWS)
    hits = hits_norm = 0
    for row in MC_ROWS:
        lls = [scorer.loglikelihood(row["context"], " " + c)[0] for c in row["choices"]]
        hits += int(np.argmax(lls) == row["label"])
        hits_norm += int(np.argmax([ll / len(c) for ll, c in zip(lls, row["choices"])]) == row["label"])
    assert m == {"acc": hits / 4, "acc_norm": hits_norm / 4, "docs": 4}


def test_bundled_tasks_are_valid():
    assert {"python_modules", "python_docstrings"} <= set(bundled_tasks())
    for name in bundled_tasks():
        task = load_task(name)
        assert task.kind == "choice" and len(task.docs) == 100
        assert all(len(d["choices"]) == 4 and len(set(d["choices"])) == 4 for d in task.docs)


@pytest.mark.parametrize("row, message", [
    ({"context": "a", "choices": ["x", "y"], "label": 2}, r"bad.jsonl:2: 'label' must be an index"),
    ({"context": "a", "choices": ["x"], "label": 0}, r"bad.jsonl:2: 'choices' must be a list of at least 2"),
    ({"question": "a"}, r"bad.jsonl:2: expected .*got keys \['question'\]"),
    ({"text": "a"}, r"bad.jsonl: mixes perplexity and multiple-choice rows"),
])
def test_task_file_errors_name_the_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["x", "y"], "label": 0}, row])
    with pytest.raises(TaskError, match=message):
        read_task_file(path)
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        load_task("nope")


def test_kind_of(ckpt, tmp_path):
    assert kind_of(ckpt) == "checkpoint"
    (tmp_path / "manifest.json").write_text("{}")
    assert kind_of(tmp_path) == "artifact"
    with pytest.raises(FileNotFoundError, match="neither an artifact"):
        kind_of(tmp_path / "missing")
    sharded = tmp_path / "sharded"  # config.json + model.safetensors.index.json (the bundled model's form)
    sharded.mkdir()
    (sharded / "config.json").write_text("{}")
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert kind_of(sharded) == "checkpoint"
    assert kind_of(DEFAULT_MODEL_DIR) == "checkpoint"


def test_compare_table_and_cli(ckpt, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other", 1)
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS[:2])
    ppl = write_jsonl(tmp_path / "ppl.jsonl", [{"text": SAMPLE[:600]}])
    assert main(["compare", str(ckpt), str(other), "--tasks", str(mc), str(ppl),
                 "--json", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md")]) == 0
    table = json.loads((tmp_path / "c.json").read_text())
    assert [m["model"] for m in table["models"]] == ["ckpt", "other"]
    assert [(r["task"], r["metric"]) for r in table["rows"]] == [
        ("mc", "acc"), ("mc", "acc_norm"), ("ppl", "ppl"), ("ppl", "bits_per_byte")]
    first, second = (r["tasks"] for r in table["results"])
    assert table["rows"][2]["values"] == [first["ppl"]["ppl"], second["ppl"]["ppl"]]
    assert table["rows"][2]["deltas"] == [pytest.approx(second["ppl"]["ppl"] - first["ppl"]["ppl"])]
    assert second["ppl"]["ppl"] == pytest.approx(perplexity(open_scorer(other), [{"text": SAMPLE[:600]}])["ppl"])
    md = (tmp_path / "c.md").read_text()
    assert md.startswith("| task | metric | ckpt (checkpoint) | other (checkpoint) | Δ |")
    assert "| ppl | ppl ↓ |" in md and capsys.readouterr().out.strip() == md.strip()
    assert markdown(compare(table["results"][:1])).count("\n") == 5  # header, rule, 4 rows
    # saved results join a later compare without being recomputed
    assert main(["compare", str(tmp_path / "c.json"), "--tasks", str(mc), "--json", str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["rows"] == table["rows"]
    (tmp_path / "bad.json").write_text("[1]")
    assert main(["compare", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not a result written by python -m mobilemoe.eval --json" in capsys.readouterr().err


def test_cli_single_model_and_errors(ckpt, tmp_path, capsys):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS[:1])
    assert main(["--checkpoint", str(ckpt), "--tasks", str(mc)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "checkpoint" and out["tasks"]["mc"]["docs"] == 1
    assert main(["--artifact", str(tmp_path / "none"), "--tasks", str(mc)]) == 2
    assert "neither an artifact" in capsys.readouterr().err
