"""The MoE-vs-dense tables of train/runs/issue17/gpu_pairs.sh: one row per run, then mean +- sd over seeds;
and the pre-training curves: held-out loss at every evaluated step, mean +- sd over seeds per model (twins
share the token budget, so equal steps are equal tokens at the same point of the same cosine schedule).

    python train/runs/issue17/pairs_table.py RUNS_DIR

RUNS_DIR/NAME/report.json (train.pipeline) and RUNS_DIR/NAME/mc.json (mobilemoe.eval compare of the
pretrain, midtrain, sft, qat and INT4 qat models); NAME is MODEL-sSEED. Losses: nats/token on the
held-out documents (text) and the held-out SFT pairs (chat); exact: exact-answer rate on held-out
questions (greedy); MC: accuracy on the bundled multiple-choice tasks.
"""
import json
import math
import sys
from pathlib import Path

STAGES = ("pretrain", "midtrain", "sft", "qat", "qat_int4")
MC_TASKS = ("python_modules", "python_docstrings")
MC_AT = {"pretrain": 0, "qat": 3}  # mc.json results: pretrain, midtrain, sft, qat, int4 qat


def row(run_dir: Path) -> dict | None:
    rep_path = run_dir / "report.json"
    if not rep_path.is_file():
        return None
    rep = json.loads(rep_path.read_text())
    r = {"run": run_dir.name, "model": run_dir.name.rsplit("-s", 1)[0],
         "moe": rep["stages"]["pretrain"].get("is_moe", False), "tokens": rep["tokens"]["pretrain"]}
    r.update({f"text {s}": rep["heldout_text"][s] for s in STAGES})
    r["chat qat_int4"] = rep["heldout_chat"]["qat_int4"]
    ex = rep.get("exact_answers", {})
    for k in ("sft", "qat", "qat_int4"):
        r[f"exact {k}"] = ex[k]["rate"] if k in ex else float("nan")
    r["exact n"] = ex.get("qat", {}).get("n", 0)
    mc = run_dir / "mc.json"
    results = json.loads(mc.read_text())["results"] if mc.is_file() else []
    for stage, i in MC_AT.items():
        for task in MC_TASKS:
            r[f"{task} {stage}"] = results[i]["tasks"][task]["acc"] if len(results) > i else float("nan")
    return r


def cols(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k not in ("run", "model", "moe", "exact n")]


def fmt(k: str, v: float) -> str:
    if k == "tokens":
        return f"{v / 1e6:.2f}M"
    return f"{v:.3f}" if k.startswith("text") or k.startswith("chat") else f"{v:.3f}"


def tables(runs_dir: Path) -> str:
    rows = [r for r in map(row, sorted(p for p in runs_dir.iterdir() if p.is_dir())) if r]
    if not rows:
        return f"{runs_dir}: no finished run (no */report.json)"
    keys = cols(rows)
    out = ["| run | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|"]
    out += ["| " + r["run"] + " | " + " | ".join(fmt(k, r[k]) for k in keys) + " |" for r in rows]
    out += ["", f"mean +- sd over seeds (exact answers: {rows[0]['exact n']} questions a model)", "",
            "| model | seeds | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 2) + "|"]
    for model in sorted({r["model"] for r in rows}):
        group = [r for r in rows if r["model"] == model]
        cells = []
        for k in keys:
            vals = [r[k] for r in group if not math.isnan(r[k])]
            if not vals:
                cells.append("-")
                continue
            mean = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            cells.append(fmt(k, mean) + ("" if k == "tokens" else f" +- {sd:.3f}"))
        out.append(f"| {model} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def mean_sd(vals: list[float]) -> str:
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return f"{mean:.3f} +- {sd:.3f}"


def curves(runs_dir: Path) -> str:
    """Held-out loss (pre-training's own evaluation) at each evaluated step, mean +- sd over seeds."""
    by_model: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for m in sorted(runs_dir.glob("*/pretrain/metrics.jsonl")):
        model = m.parent.parent.name.rsplit("-s", 1)[0]
        for r in map(json.loads, m.read_text().splitlines()):
            if "eval_loss" in r and r["step"] > 0:
                by_model.setdefault(model, {}).setdefault(r["step"], []).append((r["tokens"], r["eval_loss"]))
    out = ["| model | step | tokens | seeds | held-out loss |", "| --- | --- | --- | --- | --- |"]
    for model, steps in by_model.items():
        for step, pts in sorted(steps.items()):
            out.append(f"| {model} | {step} | {pts[0][0] / 1e6:.2f}M | {len(pts)} | {mean_sd([v for _, v in pts])} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(Path(sys.argv[1])) + "\n\npre-training curves\n\n" + curves(Path(sys.argv[1])))
