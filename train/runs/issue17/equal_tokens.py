"""Equal pre-training tokens for runs trained side by side (train/runs/issue17/gpu_pairs.sh).

    python train/runs/issue17/equal_tokens.py CAL_DIR SECONDS STEP_TOKENS GROUP/RUN ...

CAL_DIR/RUN/pretrain/metrics.jsonl: a short calibration run of each RUN, all of them at once on the
GPU (as the real runs will share it). Each group's token budget is what its slowest run trains in
SECONDS at its lowest logged rate (the first H100 call took the last one, which the calibration's dense runs
inflate by finishing first: the MoE then ran 3x slower than calibrated), rounded down to whole steps of STEP_TOKENS; every run of the group
then gets that budget, so the MoE and its dense twin see the same tokens. Prints "GROUP TOKENS RATE"
lines (RATE: the slowest run's tokens/s); exits 1 naming a run without a logged rate.
"""
import json
import sys
from pathlib import Path


def lowest_rate(metrics: Path) -> float:
    rates = [r["tok_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "tok_s" in r] \
        if metrics.is_file() else []
    if not rates:
        raise SystemExit(f"error: {metrics}: no training rate logged (did the calibration run fail?)")
    return min(rates)


def main(argv: list[str]) -> None:
    cal, seconds, step = Path(argv[0]), float(argv[1]), int(argv[2])
    slowest: dict[str, float] = {}
    for item in argv[3:]:
        group, run = item.split("/", 1)
        rate = lowest_rate(cal / run / "pretrain" / "metrics.jsonl")
        slowest[group] = min(rate, slowest.get(group, rate))
    for group, rate in slowest.items():
        print(group, max(1, int(rate * seconds) // step) * step, round(rate))


if __name__ == "__main__":
    main(sys.argv[1:])
