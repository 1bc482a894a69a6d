"""Rebuild the bundled multiple-choice tasks from the docstrings of CPython's standard library.

    python mobilemoe/assets/eval_tasks/make_tasks.py [--out mobilemoe/assets/eval_tasks]

Writes two JSONL files in the task format of mobilemoe.eval ({"context", "choices", "label"}):
    python_modules.jsonl     which module provides a function, given its docstring summary (4 choices)
    python_docstrings.jsonl  which docstring summary belongs to a function (4 choices)
The text is taken from the running Python's standard library (PSF-2.0, see README.md); the
selection is seeded, so one Python version always gives the same files.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import sys
from pathlib import Path

MODULES = ("base64 bisect calendar copy csv difflib fnmatch functools glob gzip hashlib heapq html json "
           "logging math operator os pickle random re secrets shlex shutil socket sqlite3 statistics "
           "struct subprocess tempfile textwrap threading urllib.parse uuid zipfile zlib").split()
PER_MODULE = 4  # at most this many functions of one module, so no module dominates
ITEMS = 100  # per task
SEED = 0


def summary(obj) -> str | None:
    """The docstring's first sentence, when it is a plain 20-90 character sentence."""
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
    if not 20 <= len(first) <= 90 or "(" in first[:20] or "->" in first or "==" in first:
        return None
    return first + "."


def functions() -> list[tuple[str, str, str]]:
    """(module, function name, summary) for public functions whose name only one module has."""
    found = []
    for m in MODULES:
        mod = importlib.import_module(m)
        own = []
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if (getattr(obj, "__module__", None) or "").lstrip("_") != m:
                continue  # re-exported from another module
            s = summary(obj)
            if s and name.lower() not in s.lower() and m.split(".")[-1] not in s.lower():  # no give-away
                own.append((m, name, s))
        found += random.Random(f"{SEED}:{m}").sample(own, min(PER_MODULE, len(own)))
    counts = {}
    for _, name, _ in found:
        counts[name] = counts.get(name, 0) + 1
    return [f for f in found if counts[f[1]] == 1]


def choices_with(answer: str, pool: list[str], rng: random.Random) -> tuple[list[str], int]:
    others = rng.sample(sorted(set(pool) - {answer}), 3)
    label = rng.randrange(4)
    return others[:label] + [answer] + others[label:], label


def build(out: Path) -> dict[str, int]:
    rng = random.Random(SEED)
    funcs = rng.sample(functions(), min(ITEMS, len(functions())))
    modules = sorted({m for m, _, _ in funcs})
    summaries = [s for _, _, s in funcs]
    tasks = {"python_modules": [], "python_docstrings": []}
    for m, name, s in funcs:
        choices, label = choices_with(m, modules, rng)
        tasks["python_modules"].append({
            "context": f"Question: Which Python standard library module provides the function {name}(), "
                       f"documented as \"{s}\"\nAnswer:", "choices": choices, "label": label})
        choices, label = choices_with(s, summaries, rng)
        tasks["python_docstrings"].append({
            "context": f"The Python function {m}.{name}() is documented as follows:", "choices": choices,
            "label": label})
    for task, rows in tasks.items():
        with open(out / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {task: len(rows) for task, rows in tasks.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent)
    a = p.parse_args(argv)
    counts = build(a.out)
    print(f"Python {sys.version.split()[0]}: wrote " + ", ".join(f"{t} ({n} items)" for t, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
