"""Fast evaluation of checkpoints and compiled artifacts: held-out perplexity and multiple choice.

    python -m mobilemoe.eval --checkpoint DIR | --artifact DIR [--tasks heldout python_modules ...]
        [--limit N] [--json OUT]
    python -m mobilemoe.eval compare A B ... [--tasks ...] [--limit N] [--json OUT] [--markdown OUT]

compare scores every model (each a checkpoint or artifact directory; `int4:DIR` scores a checkpoint
with INT4 weights simulated; a .json written by --json brings in earlier results without recomputing
them) on the same tasks and prints one Markdown table with each model's delta against the first.

Tasks (--tasks; default: heldout, when the corpus is built, and every bundled task):
    heldout      perplexity on data/corpus/heldout.jsonl (python -m train.corpus --out data/corpus)
    NAME         a bundled task: mobilemoe/assets/eval_tasks/NAME.jsonl (README.md there)
    FILE.jsonl   a local file: a perplexity task when its rows are {"text": str}, a multiple-choice
                 task when they are {"context": str, "choices": [str, ...], "label": int}

Multiple choice: each choice is scored as the continuation " " + choice after the context (the
log-likelihood summed over its tokens); acc counts the argmax, acc_norm the argmax of log-likelihood
per character of the choice (lm-eval's acc_norm). Perplexity: every token of BOS + text is predicted
once (rolling windows of max_seq_len), ppl = exp(NLL / tokens); bits_per_byte and word_perplexity
are lm-eval's definitions, so they compare across tokenizers. mobilemoe.lm_eval_adapter runs the
same scores through lm-eval's own evaluator.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .scoring import Scorer, open_scorer

TASKS_DIR = Path(__file__).parent / "assets" / "eval_tasks"
HELDOUT = Path("data/corpus/heldout.jsonl")
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "ppl": False, "bits_per_byte": False, "word_perplexity": False}


class TaskError(ValueError):
    """A task name or file that cannot be used (the message names the file, line or field)."""


@dataclass
class Task:
    name: str
    kind: str  # "perplexity" | "choice"
    path: Path
    docs: list[dict]


def read_task_file(path: Path, name: str | None = None) -> Task:
    """Read and validate a task JSONL: all rows perplexity-shaped or all multiple-choice-shaped."""
    if not path.is_file():
        raise TaskError(f"{path}: task file not found")
    docs, kinds = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not valid JSON ({e})") from None
        if isinstance(doc, dict) and isinstance(doc.get("text"), str):
            kinds.add("perplexity")
        elif isinstance(doc, dict) and {"context", "choices", "label"} <= doc.keys():
            choices, label = doc["choices"], doc["label"]
            if not isinstance(doc["context"], str):
                raise TaskError(f"{where}: 'context' must be a string")
            if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
                raise TaskError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
            if not (isinstance(label, int) and 0 <= label < len(choices)):
                raise TaskError(f"{where}: 'label' must be an index into 'choices' "
                                f"(0..{len(choices) - 1}), got {label!r}")
            kinds.add("choice")
        else:
            got = f"keys {sorted(doc)}" if isinstance(doc, dict) else repr(doc)
            raise TaskError(f"{where}: expected {{\"text\"}} (perplexity) or {{\"context\", \"choices\", "
                            f"\"label\"}} (multiple choice), got {got}")
        docs.append(doc)
    if len(kinds) != 1:
        raise TaskError(f"{path}: " + ("no rows" if not kinds else "mixes perplexity and multiple-choice rows"))
    return Task(name or path.stem, kinds.pop(), path, docs)


def bundled_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.jsonl"))


def default_tasks() -> list[str]:
    return (["heldout"] if HELDOUT.is_file() else []) + bundled_tasks()


def load_task(spec: str) -> Task:
    if spec == "heldout":
        if not HELDOUT.is_file():
            raise TaskError(f"{HELDOUT}: not found; build the corpus: python -m train.corpus --out data/corpus")
        return read_task_file(HELDOUT, "heldout")
    if spec in bundled_tasks():
        return read_task_file(TASKS_DIR / f"{spec}.jsonl")
    if spec.endswith(".jsonl"):
        return read_task_file(Path(spec))
    raise TaskError(f"unknown task {spec!r}: use 'heldout', a bundled task ({', '.join(bundled_tasks())}) "
                    f"or a .jsonl file")


# ---------------------------------------------------------------------------- metrics
def perplexity(scorer: Scorer, docs: list[dict]) -> dict:
    logprob = tokens = nbytes = words = 0
    for doc in docs:
        lp, n = scorer.rolling_logprob(doc["text"])
        logprob, tokens = logprob + lp, tokens + n
        nbytes += len(doc["text"].encode("utf-8"))
        words += len(re.split(r"\s+", doc["text"]))
    return {"ppl": math.exp(-logprob / tokens), "bits_per_byte": -logprob / nbytes / math.log(2),
            "word_perplexity": math.exp(-logprob / words), "tokens": tokens, "docs": len(docs)}


def choice_accuracy(scorer: Scorer, docs: list[dict]) -> dict:
    hits = hits_norm = 0
    for doc in docs:
        lls = np.array([scorer.loglikelihood(doc["context"], " " + c)[0] for c in doc["choices"]])
        hits += int(np.argmax(lls) == doc["label"])
        hits_norm += int(np.argmax(lls / np.array([len(c) for c in doc["choices"]])) == doc["label"])
    return {"acc": hits / len(docs), "acc_norm": hits_norm / len(docs), "docs": len(docs)}


def evaluate(scorer: Scorer, tasks: list[Task], limit: int = 0, path: str = "") -> dict:
    """{"model", "kind", "path", "tasks": {name: metrics + "seconds"}} for one model."""
    out = {"model": scorer.label, "kind": scorer.kind, "path": path, "tasks": {}}
    for task in tasks:
        docs = task.docs[:limit] if limit else task.docs
        t0 = time.perf_counter()
        metrics = perplexity(scorer, docs) if task.kind == "perplexity" else choice_accuracy(scorer, docs)
        out["tasks"][task.name] = {**metrics, "seconds": round(time.perf_counter() - t0, 2)}
    return out


# ---------------------------------------------------------------------------- compare
PRIMARY = {"perplexity": ("ppl", "bits_per_byte"), "choice": ("acc", "acc_norm")}


def compare(results: list[dict]) -> dict:
    """Rows of (task, metric, value per model, delta vs the first model); JSON-ready."""
    rows = []
    for task, first in results[0]["tasks"].items():
        for metric in PRIMARY["perplexity" if "ppl" in first else "choice"]:
            values = [r["tasks"].get(task, {}).get(metric) for r in results]
            deltas = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
            rows.append({"task": task, "metric": metric, "higher_is_better": HIGHER_IS_BETTER[metric],
                         "values": values, "deltas": deltas})
    models = [{"model": r["model"], "kind": r["kind"], "path": r["path"]} for r in results]
    return {"models": models, "rows": rows}


def markdown(table: dict) -> str:
    names = [f"{m['model']} ({m['kind']})" for m in table["models"]]
    head = ["task", "metric", names[0]] + [x for n in names[1:] for x in (n, "Δ")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    for row in table["rows"]:
        arrow = "↑" if row["higher_is_better"] else "↓"
        cells = [row["task"], f"{row['metric']} {arrow}", fmt(row["values"][0])]
        for v, d in zip(row["values"][1:], row["deltas"]):
            cells += [fmt(v), "—" if d is None else f"{d:+.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def open_spec(spec: str, threads: int | None = None, device: str = "cpu") -> Scorer:
    """`DIR` (checkpoint or artifact) or `int4:DIR` (checkpoint with INT4 weights simulated)."""
    int4 = spec.startswith("int4:")
    return open_scorer(spec.removeprefix("int4:"), int4=int4, num_threads=threads, device=device)


def saved_results(path: Path) -> list[dict]:
    """The results in a file written by --json: one model's, or every model's of a compare."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TaskError(f"{path}: cannot read saved results ({e})") from None
    results = data.get("results", [data]) if isinstance(data, dict) else None
    if not results or not all(isinstance(r, dict) and {"model", "kind", "tasks"} <= r.keys() for r in results):
        raise TaskError(f"{path}: not a result written by python -m mobilemoe.eval --json")
    return results


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", default=None, help="task names or .jsonl files (default: all)")
    p.add_argument("--limit", type=int, default=0, help="first N documents of each task (0: all)")
    p.add_argument("--threads", type=int, default=None, help="torch / runtime threads")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    p.add_argument("--device", default="cpu", help="where checkpoints run: cpu | cuda (artifacts: their runtime)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        p = argparse.ArgumentParser(prog="python -m mobilemoe.eval compare", description="one table, many models")
        p.add_argument("models", nargs="+", help="checkpoint or artifact dirs, int4:DIR (simulated INT4), "
                                                 "or saved --json results")
        p.add_argument("--markdown", type=Path, help="also write the Markdown table here")
        _common(p)
        a = p.parse_args(argv[1:])
        specs = a.models
    else:
        p = argparse.ArgumentParser(prog="python -m mobilemoe.eval", description=__doc__.split("\n")[0])
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--checkpoint", type=Path)
        which.add_argument("--artifact", type=Path)
        p.add_argument("--int4", action="store_true", help="checkpoint: simulate INT4 weights")
        _common(p)
        a = p.parse_args(argv)
        specs = [("int4:" if a.int4 else "") + str(a.checkpoint or a.artifact)]
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.tasks and not HELDOUT.is_file():
        print(f"note: held-out perplexity left out: {HELDOUT} not found (build the corpus with: "
              f"python -m train.corpus --out data/corpus)", file=sys.stderr)
    try:
        tasks = [load_task(t) for t in (a.tasks or default_tasks())]
        results = []
        for spec in specs:
            if spec.endswith(".json"):  # results saved earlier with --json: not recomputed
                results += saved_results(Path(spec))
                continue
            results.append(evaluate(open_spec(spec, a.threads, a.device), tasks, a.limit, path=spec))
            print(f"{spec}: " + json.dumps(results[-1]["tasks"]), file=sys.stderr)
    except (TaskError, FileNotFoundError, ValueError, RuntimeError) as e:  # Checkpoint-/ArtifactError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {**compare(results), "results": results} if argv[:1] == ["compare"] else results[0]
    if argv[:1] == ["compare"]:
        print(markdown(out))
        if a.markdown:
            a.markdown.write_text(markdown(out) + "\n")
    else:
        print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
