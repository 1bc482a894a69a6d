"""mobilemoe.answer_check's batched greedy answers against one-at-a-time generation with the KV cache."""
import pytest

from mobilemoe.answer_check import evaluate_checkpoint, exact_answer_rate, greedy_batch, read_qa, torch_answerer
from mobilemoe.checkpoint import load_checkpoint
from mobilemoe.generate import generate
from mobilemoe.tokenizer import load_tokenizer
from tests.eval_helpers import make_checkpoint, write_jsonl

QUESTIONS = ["What does `ls -a` do?", "Which option of `csplit` does this: do not remove output files on errors?",
             "What does os.path.join() do?", "What is it?"]


def test_greedy_batch_equals_serial_generation(tmp_path):
    model = load_checkpoint(make_checkpoint(tmp_path / "ckpt", 0)).eval()
    prompts = [[1] + list(range(5 + 7 * i, 5 + 7 * i + 3 + 4 * i)) for i in range(4)]  # lengths 4 .. 16
    serial = [generate(model, p, 8)[0] for p in prompts]
    assert greedy_batch(model, prompts, 8, ()) == serial
    # a stop id that the greedy continuation of prompt 2 reaches at its 4th token: that row ends there
    stop = serial[2][3]
    stopped = [generate(model, p, 8, eos_id=stop)[0] for p in prompts]
    got = greedy_batch(model, prompts, 8, (stop,))
    assert got == stopped and len(got[2]) <= 4 and got[2][-1] == stop
    # the model's max_seq_len (256) caps a long prompt's continuation
    long = [1] + [7] * 250
    assert greedy_batch(model, [long, prompts[0]], 8, ()) == [generate(model, long, 5)[0], serial[0]]


@pytest.mark.slow  # ~20 s on a loaded 2-core machine
def test_batched_answers_and_exact_rate_match_serial(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", 1)
    model, tok = load_checkpoint(ckpt).eval(), load_tokenizer(ckpt)
    serial = torch_answerer(model, tok, 8, batch=1)(QUESTIONS)
    assert torch_answerer(model, tok, 8, batch=3)(QUESTIONS) == serial
    assert all(isinstance(a, str) for a in serial) and len(serial) == len(QUESTIONS)
    qa = write_jsonl(tmp_path / "qa.jsonl", [
        {"kind": "api", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}],
         "check": {"any_of": [serial[i].split()[0] if serial[i].split() else "zzz"]}}
        for i, q in enumerate(QUESTIONS)])
    many = evaluate_checkpoint(ckpt, qa, max_new_tokens=8, batch=3)
    assert many == exact_answer_rate(lambda qs: serial, read_qa(qa)) and many["n"] == len(QUESTIONS)
    assert many["rate"] == sum(bool(a.split()) for a in serial) / len(QUESTIONS)  # each names its own first word
