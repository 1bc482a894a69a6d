"""`python -m train.scaling {sweep,fit,design}`: see train/scaling/__init__.py."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from mobilemoe.config import ConfigError, MobileMoEConfig
from train.scaling.design import DesignError, design, evaluate, plot_design, table, write_design
from train.scaling.grid import SweepError, load_grid
from train.scaling.law import (FORMS, LawError, bootstrap, coefficients, fit_law, law_info, load_law, plot_fit,
                                save_law)

DEFAULT_DIR = Path("train/runs/scaling")
# design's default law: the fit on the ~50M-token corpus (issue 17; train/runs/scaling/README.md says which form
# and what it can rank). `fit` still writes DEFAULT_DIR / "law.json" unless told otherwise (the first sweep's law).
DEFAULT_LAW = DEFAULT_DIR / "corpus50m-long" / "chinchilla" / "law.json"


def _sweep(a) -> int:
    # deferred on purpose: each subcommand imports only what it runs (sweep brings torch and training)
    from train.scaling.sweep import SweepOptions, run_sweep
    grid = load_grid(a.grid, vocab=a.vocab)
    if a.only:
        want = set(a.only.split(","))
        unknown = sorted(want - {r["id"] for r in grid})
        if unknown:
            raise ValueError(f"--only: no run(s) {unknown} in grid '{a.grid}'")
        grid = [r for r in grid if r["id"] in want]
    if a.list:
        for r in grid:
            print(f"{r['id']:48s} {','.join(r['families']):24s} {r['tokens']:>11,} tokens")
        return 0
    opts = SweepOptions(log=a.log, work_dir=a.work_dir, corpus=a.corpus, tokenizer=a.tokenizer, workers=a.workers,
                        device=a.device, deadline=a.deadline, keep_checkpoints=a.keep_checkpoints, threads=a.threads,
                        order=a.order)
    res = run_sweep(grid, opts)
    print(f"sweep: {len(res['done'])} run(s) done, {len(res['skipped'])} already in {a.log}, "
          f"{len(res['failed'])} failed, {len(res['left'])} left", file=sys.stderr)
    return 1 if res["failed"] else 0


def _fit(a) -> int:
    # deferred on purpose: each subcommand imports only what it runs (sweep brings torch and training)
    from train.scaling.sweep import read_log, sweep_table
    logged = read_log(a.log)
    records = [r for r in logged if r["tokens"] >= a.min_tokens]
    if not records:
        raise ValueError(f"{a.log}: no runs logged with >= {a.min_tokens:g} tokens "
                         f"(run `python -m train.scaling sweep` first)")
    forms = list(FORMS) if a.form == "all" else [a.form]
    results = {f: fit_law(records, f, folds=a.folds, seed=a.seed) for f in forms}
    chosen = results[a.form] if a.form != "all" else min(results.values(), key=lambda r: r.cv["rmse"])
    obs = np.array([r["eval_loss"] for r in records])
    const = float(np.sqrt(np.mean((obs - obs.mean()) ** 2)))
    print(sweep_table(logged, fitted={r["id"] for r in records}))
    print(f"\n{len(records)} of {len(logged)} runs (tokens >= {a.min_tokens:g}); held-out error ({'leave-one-out' if a.folds <= 0 else f'{a.folds}-fold'}):")
    for f, r in results.items():
        print(f"  form {f:10s} held-out RMSE {r.cv['rmse']:.4f} MAE {r.cv['mae']:.4f} max {r.cv['max_abs']:.4f} "
              f"({r.cv['mape_pct']:.2f}%), in-sample RMSE {r.in_sample['rmse']:.4f}")
    print(f"  (predicting the mean loss: RMSE {const:.4f})")
    print(f"chosen form '{chosen.form}': " + ", ".join(f"{k}={v:.4g}" for k, v in coefficients(chosen.params).items()))
    ci = bootstrap(records, chosen.form, chosen.params, n=a.bootstrap, seed=a.seed) if a.bootstrap else {}
    for k, (lo, hi) in ci.items():
        print(f"  {k}: 90% bootstrap interval [{lo:.4g}, {hi:.4g}]")
    ref = _reference(records)
    extra = {"log": str(a.log), "runs": len(records), "min_tokens": a.min_tokens, "cv": "leave-one-out" if a.folds <= 0 else f"{a.folds}-fold",
             "forms": {f: {"held_out": r.cv, "in_sample": r.in_sample, "coefficients": coefficients(r.params)}
                       for f, r in results.items()},
             "mean_predictor_rmse": const, "bootstrap_90": ci, "reference_point": ref,
             "predictions": [{"id": rec["id"], "observed": rec["eval_loss"], "fit": float(p), "held_out": float(c)}
                             for rec, p, c in zip(records, chosen.pred, chosen.cv_pred)]}
    save_law(a.out, chosen, extra)
    print(f"coefficients -> {a.out}")
    if a.plot and plot_fit(records, chosen, a.plot, ref):
        print(f"plot -> {a.plot}")
    return 0


def _reference(records: list[dict]) -> dict:
    """The partial-residual plots' reference point: the most common MoE shape (the sweep's reference
    MoE) at the most common token count."""
    keys = ("n_active", "expansion", "granularity", "shared_frac")
    moe = [r for r in records if r["model"]["num_experts"] > 0] or records
    common = Counter(tuple(r[k] for k in keys) for r in moe).most_common(1)[0][0]
    tokens = Counter(r["tokens"] for r in records).most_common(1)[0][0]
    return {**dict(zip(keys, common)), "moe": float(bool(moe[0]["model"]["num_experts"])), "tokens": tokens}


TERM_VARIABLE = {"rho": "R", "gamma": "G", "gamma2": "G", "sigma": "s", "mu": "MoE vs dense"}


def _law_lines(path, info: dict) -> list[str]:
    """What design's law is and what it can rank (law_info), for the top of design's output."""
    rmse = f"{info['loo_rmse']:.4f} nats" if isinstance(info["loo_rmse"], float) else "not recorded"
    pct = f" ({info['loo_mape_pct']:.1f}%)" if isinstance(info["loo_mape_pct"], float) else ""
    runs = f"{info['runs']} runs" if info["runs"] else "? runs"
    lines = [f"law {path}: form '{info['form']}', {runs} of {info['log'] or '?'}; leave-one-out RMSE {rmse}{pct}"]
    if not info["moe_terms"]:
        lines.append("  no MoE terms: the ranking is by active params N alone (and the tokens); R, G, s and MoE vs "
                     "dense do not enter it, so among configs of about the best's N the pick says nothing about them")
    elif not info["intervals"]:
        lines.append(f"  MoE terms {', '.join(info['moe_terms'])}: no bootstrap intervals recorded (fit --bootstrap)")
    else:
        ok, no = info["identified"], info["not_identified"]
        lines.append(f"  MoE terms, 90% bootstrap interval excludes 0: {', '.join(ok) or 'none'}; "
                     f"straddles 0: {', '.join(no) or 'none'}")
        if no:
            lines.append("  so the ranking by " + ", ".join(f"{TERM_VARIABLE[k]} ({k})" for k in no)
                         + " is not supported by the fit")
    return lines


def _design(a) -> int:
    params = load_law(a.law)
    info = law_info(a.law)
    res = design(params, a.memory_mb, a.gflops_per_token, a.tokens, a.space, a.ctx, a.top)
    res["law_info"] = info
    print("\n".join(_law_lines(a.law, info)) + "\n")
    b = res["best"]
    print(f"{res['feasible']} of {res['candidates']} '{res['space']}' configs fit {a.memory_mb:g} MB INT4 and "
          f"{a.gflops_per_token:g} GFLOPs/token (decode, context {a.ctx}); loss predicted at {res['tokens']:.3g} tokens\n")
    print("best and its neighbours:")
    print(table([b, *res["neighbours"]], b["predicted_loss"]))
    named = [(k, v) for k, v in res["classes"].items() if v is not None]
    print("\nbest of each class:")
    print(table([v for _, v in named], b["predicted_loss"], labels=[k for k, _ in named]))
    if a.compare:
        cfgs = [MobileMoEConfig.from_name(n) for n in a.compare.split(",")]
        rows = evaluate(params, cfgs, res["tokens"], a.ctx)
        print("\ncompared (as budgeted by `mobilemoe.config list`):")
        print(table(rows, b["predicted_loss"], labels=[r["shape"] for r in rows]))
        res["compared"] = rows
    path = write_design(res, a.out, a.law)
    print(f"\nbest config -> {path} (details: {a.out / 'design.json'})")
    print(f"  train:   python -m train.pretrain --model {path}\n  compile: python -m compiler.build --target host "
          f"--preset {path}")
    if a.plot and plot_design(res, a.plot):
        print(f"plot -> {a.plot}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.scaling", description=__doc__.split(":")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="grid of short training runs -> JSONL (resumable)")
    s.add_argument("--grid", default="default", help="default | smoke | GRID.json")
    s.add_argument("--log", type=Path, default=DEFAULT_DIR / "sweep.jsonl")
    s.add_argument("--work-dir", type=Path, default=Path("runs/scaling"))
    s.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    s.add_argument("--tokenizer", default="", help="tokenizer.json (default: the bundled one)")
    s.add_argument("--vocab", type=int, default=8192, help="vocab_size of the named grids' models")
    s.add_argument("--workers", type=int, default=1, help="runs at once (subprocesses); 0: in this process")
    s.add_argument("--threads", type=int, default=0, help="OMP threads per worker (0: cores / workers)")
    s.add_argument("--device", default="auto")
    s.add_argument("--deadline", type=float, default=0.0, help="seconds: stop (resumably) by then")
    s.add_argument("--keep-checkpoints", action="store_true")
    s.add_argument("--order", default="grid", help="grid | longest (longest first)")
    s.add_argument("--only", default="", help="comma-separated run ids")
    s.add_argument("--list", action="store_true", help="print the grid and exit")
    f = sub.add_parser("fit", help="fit the loss law to a sweep log")
    f.add_argument("--log", type=Path, default=DEFAULT_DIR / "sweep.jsonl")
    f.add_argument("--form", default="all", help="chinchilla | moe | moe-full | all (the lowest held-out RMSE)")
    f.add_argument("--min-tokens", type=float, default=0.0, help="fit only runs trained on at least this many tokens")
    f.add_argument("--folds", type=int, default=0, help="K-fold over runs (0: leave one out)")
    f.add_argument("--bootstrap", type=int, default=200, help="resamples for coefficient intervals (0: none)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", type=Path, default=DEFAULT_DIR / "law.json")
    f.add_argument("--plot", type=Path, default=DEFAULT_DIR / "fit.png")
    d = sub.add_parser("design", help="predicted-best config within INT4 memory and compute budgets")
    d.add_argument("--memory-mb", type=float, required=True, help="INT4 weight MB (as `mobilemoe.config list`)")
    d.add_argument("--gflops-per-token", type=float, required=True, help="decode GFLOPs/token at --ctx")
    d.add_argument("--tokens", type=float, default=None, help="training tokens (default: the space's)")
    d.add_argument("--law", type=Path, default=DEFAULT_LAW, help=f"coefficients file of `fit` (default: {DEFAULT_LAW})")
    d.add_argument("--space", default="paper", help="paper | tiny")
    d.add_argument("--ctx", type=int, default=1024)
    d.add_argument("--top", type=int, default=10)
    d.add_argument("--out", type=Path, default=Path("runs/design"))
    d.add_argument("--plot", type=Path, default=None)
    d.add_argument("--compare", default="", help="comma-separated presets or config.json paths to score alongside")
    a = p.parse_args(argv)
    try:
        return {"sweep": _sweep, "fit": _fit, "design": _design}[a.cmd](a)
    except (SweepError, LawError, DesignError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
