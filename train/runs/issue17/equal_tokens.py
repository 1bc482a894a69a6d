"""Equal pre-training tokens for runs trained side by side on one GPU (train/runs/issue17/gpu_pairs.sh).

    python train/runs/issue17/equal_tokens.py watch BUDGET_FILE DEADLINE STEP_TOKENS RUN_DIR ... [--at 15] [--safety 0.9]
    python train/runs/issue17/equal_tokens.py CAL_DIR SECONDS STEP_TOKENS GROUP/RUN ...     (the old way)

watch (the way gpu_pairs.sh works now): the real runs are started together with
`pretrain.budget_file=BUDGET_FILE` and stop at the end of their warmup until that file exists
(train/loop.py). This watcher reads each RUN_DIR/pretrain/metrics.jsonl until every run has logged its
training rate up to step AT, takes each run's lowest rate over the logged intervals after the first
(which holds start-up) and up to AT, all measured while every run was training, and writes the tokens
the slowest run trains in what is left until DEADLINE (a Unix time) at that rate, rounded down to whole
steps of STEP_TOKENS, times --safety (the faster runs go on to their later stages and evaluations
beside the slowest one, which can slow it further). Every run then trains exactly that many tokens on
the same schedule. A run that never logs a rate within --wait seconds is left out
(named on stderr); none at all: exit 1, and the runs fail on their own budget_wait_s.

The old way (a separate 30-step calibration of every run at once, then the budget per group) cost a
process start and 30 steps of every run, and its rates were skewed by runs that finished their
calibration first (the first H100 call took the last rate: the MoE then ran 3x slower than
calibrated); it is kept for the calibration logs of h100-call3.
"""
import json
import os
import sys
import time
from pathlib import Path


def rates(metrics: Path, at: int) -> list[float]:
    """Logged training rates (tok/s) of the intervals ending after the first log and at or before step `at`."""
    if not metrics.is_file():
        return []
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    logged = [r for r in recs if "tok_s" in r]
    return [r["tok_s"] for r in logged[1:] if r["step"] <= at]


def ready(metrics: Path, at: int) -> bool:
    if not metrics.is_file():
        return False
    return any("tok_s" in r and r["step"] >= at
               for r in map(json.loads, filter(str.strip, metrics.read_text().splitlines())))


def watch(budget_file: Path, deadline: float, step: int, runs: list[Path], at: int = 15, safety: float = 0.9,
          wait_s: float = 240.0, poll_s: float = 0.5) -> int:
    t0 = time.time()
    paths = {r: r / "pretrain" / "metrics.jsonl" for r in runs}
    while not all(ready(p, at) for p in paths.values()) and time.time() - t0 < wait_s:
        time.sleep(poll_s)
    measured = {r: min(rs) for r, p in paths.items() if ready(p, at) and (rs := rates(p, at))}
    for r in runs:
        if r not in measured:
            print(f"equal_tokens: {r}: no training rate by step {at} within {wait_s:g} s: left out", file=sys.stderr)
    if not measured:
        return 1
    slowest = min(measured.values())
    left = deadline - time.time()
    tokens = max(1, int(safety * slowest * max(left, 0.0)) // step) * step
    tmp = budget_file.with_name(budget_file.name + ".tmp")
    tmp.write_text(f"{tokens}\n")
    os.replace(tmp, budget_file)  # the runs poll for the file: it appears whole
    print(f"equal_tokens: {tokens} tokens ({tokens / 1e6:.2f}M) = {safety:g} x {slowest:.0f} tok/s (slowest) x {left:.0f} s; "
          + ", ".join(f"{r.name} {v:.0f}" for r, v in measured.items()), file=sys.stderr)
    return 0


def lowest_rate(metrics: Path) -> float:
    found = [r["tok_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "tok_s" in r] \
        if metrics.is_file() else []
    if not found:
        raise SystemExit(f"error: {metrics}: no training rate logged (did the calibration run fail?)")
    return min(found)


def calibrated(argv: list[str]) -> None:
    cal, seconds, step = Path(argv[0]), float(argv[1]), int(argv[2])
    slowest: dict[str, float] = {}
    for item in argv[3:]:
        group, run = item.split("/", 1)
        rate = lowest_rate(cal / run / "pretrain" / "metrics.jsonl")
        slowest[group] = min(rate, slowest.get(group, rate))
    for group, rate in slowest.items():
        print(group, max(1, int(rate * seconds) // step) * step, round(rate))


def main(argv: list[str]) -> int:
    if argv[:1] == ["watch"]:
        opts = {"--at": 15.0, "--safety": 0.9}
        for k in opts:
            if k in argv:
                i = argv.index(k)
                opts[k], argv = float(argv[i + 1]), argv[:i] + argv[i + 2:]
        return watch(Path(argv[1]), float(argv[2]), int(argv[3]), [Path(a) for a in argv[4:]],
                     int(opts["--at"]), opts["--safety"])
    calibrated(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
