"""Exact-answer check: does a generated answer name the right thing?

Question/answer records (train.qa_pairs, train.sft_data) carry a ``check``:

  {"any_of": ["-a", "--all"]}                  the answer names one of these (options, commands,
                                               functions), as a whole token: "`ls -a`" and "-a," count,
                                               "-al" and "--almost-all" do not;
  {"words": ["ignore", "entries", ...], "min_share": 0.5}
                                               the answer contains at least that share of the
                                               reference description's content words.

    python -m mobilemoe.answer_check --checkpoint DIR --qa data/sft/heldout_qa.jsonl [--limit 300]

prints the exact-answer rate (overall and per kind) of greedy chat answers; the same numbers
come from :func:`exact_answer_rate` (train.pipeline's report uses it after sft and qat).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

STOPWORDS = frozenset("""
a an the and or but if then else of to in on at by for with from into onto over under as is are was
were be been being it its this that these those there their them they he she we you your our not no
nor so such than too very can could may might must shall should will would do does did done has have
had having which who whom whose what when where why how all any both each few more most other some
only own same also just about above after again against before below between during further here
once out off up down use used uses using given default value values set sets one two see e.g i.e etc
""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def content_words(text: str) -> list[str]:
    """Distinct lowercased content words (3+ characters, no stop words) of text, in order."""
    out: dict[str, None] = {}
    for w in _WORD.findall(text):
        w = w.lower()
        if len(w) >= 3 and w not in STOPWORDS:
            out.setdefault(w, None)
    return list(out)


def names(answer: str, key: str) -> bool:
    """Whether answer names key as a whole token (not inside a longer name or option)."""
    key = key.strip().strip("`")
    if not key:
        return False
    return re.search(r"(?<![\w.:-])" + re.escape(key) + r"(?![\w-]|::|\.\w)", answer) is not None


def check_answer(answer: str, check: dict) -> bool:
    """Whether answer passes a record's check (see the module docstring)."""
    if "any_of" in check:
        return any(names(answer, k) for k in check["any_of"])
    if "words" in check:
        words = check["words"]
        if not words:
            return False
        got = set(content_words(answer))
        need = max(1, math.ceil(check.get("min_share", 0.5) * len(words)))
        return sum(w in got for w in words) >= need
    raise ValueError(f"check must hold 'any_of' or 'words', got {sorted(check)}")


def read_qa(path, limit: int = 0) -> list[dict]:
    """Records with a "check" from a JSONL file; with limit > 0, `limit` of them spread evenly over the
    file (the file is ordered by source: the first records alone would all come from one source)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "check" not in rec or "messages" not in rec:
                raise ValueError(f"{path}:{n}: expected a record with 'messages' and 'check' (train.sft_data output)")
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no question/answer records")
    if 0 < limit < len(out):
        out = [out[i * len(out) // limit] for i in range(limit)]
    return out


def exact_answer_rate(answers_fn: Callable[[list[str]], list[str]], records: list[dict], samples: int = 5) -> dict:
    """answers_fn(questions) -> answers, one per question, over records:
    {"rate", "n", "by_kind": {kind: rate}, "samples"}."""
    questions = [next(m["content"] for m in rec["messages"] if m["role"] == "user") for rec in records]
    answers = answers_fn(questions)
    if len(answers) != len(questions):
        raise ValueError(f"exact_answer_rate: {len(answers)} answers for {len(questions)} questions")
    hits: dict[str, list[int]] = {}
    shown = []
    for rec, question, answer in zip(records, questions, answers):
        ok = check_answer(answer, rec["check"])
        hits.setdefault(rec.get("kind", "other"), []).append(int(ok))
        if len(shown) < samples:
            shown.append({"question": question, "answer": answer, "ok": ok,
                          "reference": rec["messages"][-1]["content"]})
    n = sum(len(v) for v in hits.values())
    return {"rate": sum(map(sum, hits.values())) / max(n, 1), "n": n,
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(hits.items())}, "samples": shown}


def torch_answerer(model, tokenizer, max_new_tokens: int = 48, batch: int = 1) -> Callable[[list[str]], list[str]]:
    """Greedy chat answers from a MobileMoE model (each stops at <|end|> or <|eos|>). batch 1: one
    question at a time with the KV cache (mobilemoe.generate); batch > 1: `batch` questions at once,
    right-padded, the whole sequence recomputed at each new token (no cache; causal attention keeps
    the padding out of every real position): the same answers, far faster on a GPU."""
    # deferred on purpose here and below: train's corpus tools import the answer matching above,
    # which needs neither torch nor the model
    from .generate import generate, prompt_ids
    from .tokenizer import BOS_ID, STOP_TOKEN_IDS  # deferred: as above

    def one(ids: list[int]) -> list[int]:
        out, _ = generate(model, ids, min(max_new_tokens, model.config.max_seq_len - len(ids)),
                          eos_id=STOP_TOKEN_IDS)
        return out

    def answers(questions: list[str]) -> list[str]:
        prompts = [prompt_ids(tokenizer, q, chat=True, bos_id=BOS_ID) for q in questions]
        fits = [i for i, ids in enumerate(prompts) if len(ids) < model.config.max_seq_len]
        fits.sort(key=lambda i: len(prompts[i]))  # similar lengths together: less padding
        new: dict[int, list[int]] = {}
        for c in range(0, len(fits), max(1, batch)):
            idx = fits[c:c + max(1, batch)]
            outs = [one(prompts[i]) for i in idx] if batch <= 1 else \
                greedy_batch(model, [prompts[i] for i in idx], max_new_tokens, STOP_TOKEN_IDS)
            new.update(zip(idx, outs))
        return [tokenizer.decode([t for t in new[i] if t not in STOP_TOKEN_IDS]) if i in new else ""
                for i in range(len(prompts))]

    return answers


def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids) -> list[list[int]]:
    """Greedy continuations of several prompts at once (see torch_answerer): each row's new tokens,
    up to max_new_tokens (and the model's max_seq_len), the first stop id included."""
    import torch  # deferred: see torch_answerer

    device = model.embed.weight.device
    max_len = model.config.max_seq_len
    lens = torch.tensor([len(p) for p in prompts], device=device)
    limit = torch.clamp(lens + max_new_tokens, max=max_len)
    buf = torch.zeros(len(prompts), int(limit.max()), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        buf[r, :len(p)] = torch.tensor(p, device=device)
    stop = torch.tensor(sorted(stop_ids), device=device)
    cur, rows = lens.clone(), torch.arange(len(prompts), device=device)
    active = cur < limit
    with torch.no_grad():
        while bool(active.any()):
            logits, _ = model(buf[:, :int(cur.max())])
            nxt = logits[rows, cur - 1].argmax(-1)
            a = rows[active]
            buf[a, cur[a]] = nxt[a]
            cur = cur + active.long()
            active = active & ~torch.isin(nxt, stop) & (cur < limit)
    return [buf[r, len(p):int(cur[r])].tolist() for r, p in enumerate(prompts)]


def evaluate_checkpoint(ckpt_dir, qa_path, limit: int = 0, device: str = "cpu", int4: bool = False,
                        max_new_tokens: int = 48, batch: int = 0) -> dict:
    """exact_answer_rate of a checkpoint's greedy answers on a QA file (float, or INT4 weights).
    batch: questions answered at once (0: 64 on a GPU, 1 on the CPU; see torch_answerer)."""
    import torch  # deferred: see torch_answerer (the answer matching needs no torch)

    from .checkpoint import load_checkpoint  # deferred: imports torch
    from .quant import simulate_int4  # deferred: imports torch
    from .tokenizer import load_tokenizer  # deferred: see torch_answerer
    model = load_checkpoint(ckpt_dir)
    if int4:  # every INT4 weight replaced by dequant(quantize(w)), as train.evaluate does
        model = simulate_int4(model)
    model = model.to(device).eval()
    with torch.no_grad():
        batch = batch or (64 if str(device).startswith("cuda") else 1)
        return exact_answer_rate(torch_answerer(model, load_tokenizer(ckpt_dir), max_new_tokens, batch),
                                 read_qa(qa_path, limit))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mobilemoe.answer_check", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--qa", type=Path, default=Path("data/sft/heldout_qa.jsonl"))
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--int4", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=0, help="questions at once (0: 64 on a GPU, 1 on the CPU)")
    a = p.parse_args(argv)
    try:
        res = evaluate_checkpoint(a.checkpoint, a.qa, a.limit, a.device, a.int4, batch=a.batch)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
