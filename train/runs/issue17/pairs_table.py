"""The MoE-vs-dense tables of train/runs/issue17/gpu_pairs.sh: every measure after every stage, one row
per run and stage, then mean +- sd over seeds per model and stage; and the pre-training curves (held-out
loss at every evaluated step, mean +- sd over seeds: twins share the token budget, so equal steps are
equal tokens at the same point of the same cosine schedule).

    python train/runs/issue17/pairs_table.py RUNS_DIR [RUNS_DIR ...]

RUNS_DIR/NAME (NAME = MODEL-sSEED) holds, as gpu_pairs.sh leaves them:
  report.json            train.pipeline's report: held-out text loss of every stage's model (the whole
                         held-out split) and chat loss (held-out SFT pairs) of sft and qat, float and INT4
  STAGE/summary.json     the stage's own evaluation (first 200k held-out tokens: text for pretrain and
                         midtrain, chat for sft and qat; qat also INT4): there even when the report is not
  exact_STAGE.json       mobilemoe.answer_check: exact-answer rate on held-out questions (greedy)
  mc_STAGE.json          mobilemoe.eval: multiple-choice accuracy (python_modules, python_docstrings, docs_qa)
Losses in nats/token. A measure a run did not reach is "-".
"""
import json
import math
import sys
from pathlib import Path

STAGES = ("pretrain", "midtrain", "sft", "qat", "qat_int4")
MC_TASKS = ("python_modules", "python_docstrings", "docs_qa")
COLS = ("text", "chat", "stage eval", "exact", *MC_TASKS)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or cut while being written
        return None


def rows(run_dir: Path) -> list[dict]:
    """One dict per stage of one run: the measures of COLS that exist (float), plus run/model/stage."""
    rep = _json(run_dir / "report.json") or {}
    out = []
    for st in STAGES:
        base = st.removesuffix("_int4")
        r = {"run": run_dir.name, "model": run_dir.name.rsplit("-s", 1)[0], "stage": st}
        if st in rep.get("heldout_text", {}):
            r["text"] = rep["heldout_text"][st]
        if st in rep.get("heldout_chat", {}):
            r["chat"] = rep["heldout_chat"][st]
        summ = _json(run_dir / base / "summary.json") or {}
        key = "eval_loss_int4" if st.endswith("_int4") else "eval_loss"
        if key in summ:
            r["stage eval"] = summ[key]
        ex = _json(run_dir / f"exact_{st}.json") or {}
        if "rate" in ex:
            r["exact"], r["exact n"] = ex["rate"], ex.get("n", 0)
        mc = (_json(run_dir / f"mc_{st}.json") or {}).get("tasks", {})
        for task in MC_TASKS:
            if task in mc and "acc" in mc[task]:
                r[task] = mc[task]["acc"]
        if summ or len(r) > 3:
            out.append(r)
    return out


def mean_sd(vals: list[float]) -> str:
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return f"{mean:.3f} +- {sd:.3f}" if len(vals) > 1 else f"{mean:.3f}"


def tables(run_dirs: list[Path]) -> str:
    all_rows = [r for d in run_dirs for r in rows(d)]
    if not all_rows:
        return "no run reached the end of a stage (no */STAGE/summary.json)"
    head = "| {} | stage | " + " | ".join(COLS) + " |"
    rule = "| --- " * (len(COLS) + 2) + "|"
    out = [head.format("run"), rule]
    for r in all_rows:
        out.append(f"| {r['run']} | {r['stage']} | " + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in COLS) + " |")
    ns = sorted({r["exact n"] for r in all_rows if "exact n" in r})
    out += ["", f"mean +- sd over seeds (seeds: those that reached the measure; exact answers: {ns} questions a model)",
            "", "| model | stage | seeds | " + " | ".join(COLS) + " |", "| --- " * (len(COLS) + 3) + "|"]
    for model in sorted({r["model"] for r in all_rows}):
        for st in STAGES:
            group = [r for r in all_rows if r["model"] == model and r["stage"] == st]
            if group:
                out.append(f"| {model} | {st} | {len(group)} | "
                           + " | ".join(mean_sd([r[c] for r in group if c in r]) for c in COLS) + " |")
    return "\n".join(out)


def paired(run_dirs: list[Path]) -> str:
    """MoE minus its dense twin of the same seed (same data order, same token budget), per stage and
    measure: one value per seed, then their mean (where each seed has one MoE and one dense run)."""
    by_seed: dict[str, dict[bool, list[dict]]] = {}
    for d in run_dirs:
        summ = _json(d / "pretrain" / "summary.json")
        if summ is not None:
            by_seed.setdefault(d.name.rsplit("-s", 1)[1], {}).setdefault(bool(summ.get("is_moe")), []).append(
                {r["stage"]: r for r in rows(d)})
    pairs = sorted((seed, g[True][0], g[False][0]) for seed, g in by_seed.items()
                   if len(g.get(True, [])) == 1 and len(g.get(False, [])) == 1)
    if not pairs:
        return "no seed with one MoE and one dense run"
    keys = ("text", "chat", "exact", *MC_TASKS)
    out = ["| stage | " + " | ".join(f"{k}: per seed; mean" for k in keys) + " |", "| --- " * (len(keys) + 1) + "|"]
    for st in STAGES:
        cells = []
        for k in keys:
            diffs = [moe[st][k] - dense[st][k] for _, moe, dense in pairs
                     if st in moe and st in dense and k in moe[st] and k in dense[st]]
            cells.append(" / ".join(f"{v:+.3f}" for v in diffs) + (f"; {sum(diffs) / len(diffs):+.3f}" if diffs else "-"))
        out.append(f"| {st} | " + " | ".join(cells) + " |")
    return f"seeds {', '.join(seed for seed, _, _ in pairs)}\n\n" + "\n".join(out)


def curves(run_dirs: list[Path]) -> str:
    """Held-out loss (pre-training's own evaluation) at each evaluated step, mean +- sd over seeds."""
    by_model: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for d in run_dirs:
        m = d / "pretrain" / "metrics.jsonl"
        if not m.is_file():
            continue
        model = d.name.rsplit("-s", 1)[0]
        for r in map(json.loads, filter(str.strip, m.read_text().splitlines())):
            if "eval_loss" in r and r["step"] > 0:
                by_model.setdefault(model, {}).setdefault(r["step"], []).append((r["tokens"], r["eval_loss"]))
    out = ["| model | step | tokens | seeds | held-out loss |", "| --- | --- | --- | --- | --- |"]
    for model, steps in sorted(by_model.items()):
        for step, pts in sorted(steps.items()):
            out.append(f"| {model} | {step} | {pts[0][0] / 1e6:.2f}M | {len(pts)} | {mean_sd([v for _, v in pts])} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    run_dirs = sorted(p for a in argv for p in Path(a).iterdir() if p.is_dir())
    print(tables(run_dirs) + "\n\nMoE - dense twin, seed-matched\n\n" + paired(run_dirs)
          + "\n\npre-training curves (stage's own evaluation, first 200k held-out tokens)\n\n"
          + curves(run_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
