"""A multiple-choice task (mobilemoe.eval's format) from the held-out questions of train.sft_data.

    python train/runs/issue17/qa_mc.py data/sft/heldout_qa.jsonl OUT.jsonl [--n 300] [--seed 0]

The "which one does this" questions of heldout_qa.jsonl (kinds api, command, option: the answer names a
thing, check {"any_of": [...]}) become {"context": "Question: Q\\nAnswer:", "choices": [4 answers],
"label": i}: the right answer and three answers to other questions of the same kind, from the same
source where it has enough (so the choices look alike: four SciPy functions, four options of
commands). Questions about items never seen in SFT, on documents read in pre-training: the corpus'
own domain, where the bundled python_* tasks test only the Python library (5% of the corpus).
Seeded: one heldout_qa.jsonl always gives the same task.
"""
import json
import random
import sys
from pathlib import Path


def build(qa: list[dict], n: int, seed: int = 0) -> list[dict]:
    rev = [r for r in qa if r.get("kind") in ("api", "command", "option") and "any_of" in r.get("check", {})]
    pools: dict[tuple, list[str]] = {}
    for r in rev:
        pools.setdefault((r["kind"], r.get("source", "")), []).append(r["messages"][-1]["content"])
        pools.setdefault((r["kind"], ""), []).append(r["messages"][-1]["content"])
    rnd = random.Random(seed)
    order = list(range(len(rev)))
    rnd.shuffle(order)
    out = []
    for i in order:
        r = rev[i]
        right = r["messages"][-1]["content"]
        pool = sorted(set(pools[(r["kind"], r.get("source", ""))]) - {right})
        if len(pool) < 3:
            pool = sorted(set(pools[(r["kind"], "")]) - {right})
        if len(pool) < 3:
            continue
        choices = rnd.sample(pool, 3) + [right]
        rnd.shuffle(choices)
        out.append({"context": f"Question: {r['messages'][0]['content']}\nAnswer:", "choices": choices,
                    "label": choices.index(right), "kind": r["kind"]})
        if len(out) == n:
            break
    return out


def main(argv: list[str]) -> int:
    n = int(argv[argv.index("--n") + 1]) if "--n" in argv else 300
    seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0
    qa = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    rows = build(qa, n, seed)
    Path(argv[1]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("api", "command", "option")}
    print(f"qa_mc: {len(rows)} questions ({kinds}) -> {argv[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
