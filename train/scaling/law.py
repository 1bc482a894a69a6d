"""The on-device MoE loss law, its robust fit, leave-runs-out error, and the plots.

Form (Chinchilla's, Hoffmann et al. 2022, with an effective parameter count for routed models):

    L(N, D, R, G, s) = E + A / N_eff^alpha + B / D^beta
    ln N_eff = ln N + rho ln R + gamma ln G + sigma s   [+ gamma2 ln^2 G + mu m]

N active non-embedding params, D tokens, R = total / active params, G granularity, s shared share,
m = 1 for an MoE, 0 for a dense model (arch.py). The MoE terms follow the literature: Clark et al.
2022 ("Unified Scaling Laws for Routed Language Models") model a routed model as a dense one with
more effective parameters, log-linear in the expansion (rho); Krajewski et al. 2024 ("Scaling Laws
for Fine-Grained Mixture of Experts") add a granularity term to the N term (gamma, here log-linear;
gamma2 < 0 gives the optimum granularity exp(-gamma / (2 gamma2)) that their finite-compute
analysis finds) and fit it on MoE models alone, compared with dense ones apart: mu is that
separate offset of routed models at R = G = 1, s = 0; Abnar et al. 2025 ("Parameters vs FLOPs") and
Ludziejewski et al. 2025 ("Joint MoE Scaling Laws") vary sparsity at fixed active parameters and
under memory limits, as `design` does. The shared-expert term sigma (DeepSeekMoE, Dai et al. 2024,
motivates it) lets the data say whether always-on capacity is worth more than routed capacity.
Dense models sit at R = 1, G = 1, s = 0, m = 0, where every MoE term vanishes.

FORMS name which parameters are free: "chinchilla" (5, no MoE terms: the baseline), "moe" (8) and
"moe-full" (10); `fit --form all` keeps the one with the lowest held-out error.

The fit follows Chinchilla: minimise the Huber loss (delta 1e-3) of ln L_pred - ln L_obs, with
L_pred = exp(LSE(a - alpha ln N_eff, b - beta ln D, e)), A = e^a, B = e^b, E = e^e, by L-BFGS-B from
a grid of starting points (each run first on the squared loss, which is smooth, then on the Huber
loss), keeping the best. Internally ln N and ln D are centred and each MoE term k is fitted as
alpha * k, so every parameter but alpha and beta enters linearly. Held-out error: K-fold over runs
(default: leave one run out), each fold refit on its own runs alone (from the grid's starts and the
full fit's optimum).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.scaling.files import atomic_write_text, read_json

PARAMS = ("e", "a", "alpha", "b", "beta", "rho", "gamma", "sigma", "gamma2", "mu")
FORMS = {
    "chinchilla": ("e", "a", "alpha", "b", "beta"),
    "moe": ("e", "a", "alpha", "b", "beta", "rho", "gamma", "sigma"),
    "moe-full": PARAMS,
}
BOUNDS = {"e": (-3.0, 2.5), "alpha": (0.01, 2.5), "beta": (0.01, 2.5),
          **{k: (-10.0, 10.0) for k in ("rho", "gamma", "sigma", "gamma2", "mu")}}  # alpha * k, internally
CENTRED_BOUNDS = {"a": (-10.0, 10.0), "b": (-10.0, 10.0)}  # ln A, ln B at the data's mean ln N, ln D
HUBER_DELTA = 1e-3
COEF_NAME = {"e": "E", "a": "A", "b": "B"}  # coefficients() reports these as exp(param)
FEATURES = ("n_active", "tokens", "expansion", "granularity", "shared_frac")


class LawError(ValueError):
    """Bad fit input or coefficients file; the message names the field or file."""


def features(records: list[dict]) -> np.ndarray:
    """[n, 6] columns ln N, ln D, ln R, ln G, s, m from sweep records (or law_vars dicts)."""
    rows = []
    for i, r in enumerate(records):
        for k in FEATURES:
            v = r.get(k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise LawError(f"record {i} ({r.get('id', '?')}): field '{k}' must be a finite number, got {v!r}")
            if k != "shared_frac" and v <= 0:
                raise LawError(f"record {i} ({r.get('id', '?')}): field '{k}' must be > 0, got {v!r}")
        rows.append([math.log(r["n_active"]), math.log(r["tokens"]), math.log(r["expansion"]),
                     math.log(r["granularity"]), float(r["shared_frac"]), _is_moe(r, i)])
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES) + 1)


def _is_moe(r: dict, i: int) -> float:
    if "moe" in r:
        return float(bool(r["moe"]))
    if isinstance(r.get("model"), dict) and "num_experts" in r["model"]:  # sweep logs hold the model config
        return float(r["model"]["num_experts"] > 0)
    raise LawError(f"record {i} ({r.get('id', '?')}): needs field 'moe' (or 'model' with 'num_experts')")


MOE_TERMS = ("rho", "gamma", "sigma", "gamma2", "mu")  # ln N_eff = ln N + sum_k k * f_k
_COLUMN = {"rho": 2, "gamma": 3, "sigma": 4, "gamma2": 3, "mu": 5}  # feature column of f_k (gamma2: squared)


def _full(theta: np.ndarray, free: tuple[str, ...]) -> dict:
    """Internal vector -> parameters. Internally each MoE term k is fitted as c_k = alpha * k, so that
    every parameter but the exponents enters the LSE's arguments linearly (far better conditioned)."""
    p = dict.fromkeys(PARAMS, 0.0)
    p.update(zip(free, map(float, theta)))
    for k in MOE_TERMS:
        p[k] /= p["alpha"]
    return p


def _internal(p: dict, free: tuple[str, ...]) -> np.ndarray:
    return np.array([p[k] * p["alpha"] if k in MOE_TERMS else p[k] for k in free])


def _feature(X: np.ndarray, k: str) -> np.ndarray:
    col = X[:, _COLUMN[k]]
    return col**2 if k == "gamma2" else col


def ln_neff(p: dict, X: np.ndarray) -> np.ndarray:
    """ln N_eff of every row of X (features()) under parameters p: ln N + rho ln R + gamma ln G + sigma s
    + gamma2 ln^2 G + mu m (ln N for a dense model; design reports exp of it as N_eff)."""
    return X[:, 0] + sum(p[k] * _feature(X, k) for k in MOE_TERMS)


def predict_log(p: dict, X: np.ndarray) -> np.ndarray:
    """ln L of every row of X (features()) under parameters p."""
    z = np.stack([p["a"] - p["alpha"] * ln_neff(p, X), p["b"] - p["beta"] * X[:, 1], np.full(len(X), p["e"])])
    top = z.max(0)
    return top + np.log(np.exp(z - top).sum(0))


def _objective(theta: np.ndarray, free: tuple[str, ...], X: np.ndarray, y: np.ndarray, delta: float = HUBER_DELTA):
    """Huber loss of log residuals and its gradient with respect to the internal free parameters."""
    q = dict.fromkeys(PARAMS, 0.0)
    q.update(zip(free, theta))  # internal: q[k] = alpha * k for the MoE terms
    lnN, lnD = X[:, 0], X[:, 1]
    u = q["a"] - q["alpha"] * lnN - sum(q[k] * _feature(X, k) for k in MOE_TERMS)
    z = np.stack([u, q["b"] - q["beta"] * lnD, np.full(len(X), q["e"])])
    top = z.max(0)
    w = np.exp(z - top)
    lse = top + np.log(w.sum(0))
    w /= w.sum(0)  # softmax weights: d LSE / d z
    r = lse - y
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))
    wu, wv, we = dr * w[0], dr * w[1], dr * w[2]
    grads = {"e": we.sum(), "a": wu.sum(), "alpha": -(wu * lnN).sum(), "b": wv.sum(), "beta": -(wv * lnD).sum(),
             **{k: -(wu * _feature(X, k)).sum() for k in MOE_TERMS}}
    return loss, np.array([grads[k] for k in free])


def start_grid(free: tuple[str, ...]) -> list[np.ndarray]:
    """Chinchilla-style grid of starting points in centred units (MoE terms start at 0)."""
    grid = {"e": (-1.0, 0.0, 0.5, 1.0), "a": (-2.0, -0.5, 0.5, 1.5), "alpha": (0.1, 0.3, 0.7),
            "b": (-2.0, -0.5, 0.5, 1.5), "beta": (0.1, 0.3, 0.7)}
    keys = [k for k in free if k in grid]
    starts = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        d = dict(zip(keys, combo))
        starts.append(np.array([d.get(k, 0.0) for k in free]))
    return starts


def _one_blas_thread():
    """L-BFGS-B's tiny BLAS calls run ~40x slower with a threaded BLAS on a busy machine."""
    try:  # optional: present with a threaded BLAS
        from threadpoolctl import threadpool_limits  # deferred: optional (see the line above)
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _centre(X: np.ndarray) -> tuple[np.ndarray, float, float]:
    """ln N and ln D minus their means: a and b then stay O(1) and decouple from alpha and beta."""
    cn, cd = float(X[:, 0].mean()), float(X[:, 1].mean())
    Xc = X.copy()
    Xc[:, 0] -= cn
    Xc[:, 1] -= cd
    return Xc, cn, cd


def fit_params(X: np.ndarray, y_loss: np.ndarray, form: str = "moe", starts: list[dict] | None = None,
               top: int = 8) -> dict:
    """Fit `form` to losses; returns the full parameter dict (fixed ones 0) and the objective value.

    The fit runs on centred ln N, ln D; every grid start is scored and L-BFGS-B runs from the `top`
    best ones, plus any given `starts` (parameter dicts in raw units, e.g. a previous fit)."""
    from scipy.optimize import minimize  # deferred: only the fit needs scipy (slow to import)
    if form not in FORMS:
        raise LawError(f"unknown law form {form!r}; known: {', '.join(FORMS)}")
    free = FORMS[form]
    y = np.log(np.asarray(y_loss, dtype=np.float64))
    if len(y) < len(free) + 1:
        raise LawError(f"form '{form}' has {len(free)} free parameters: need at least {len(free) + 1} runs, "
                       f"got {len(y)}")
    Xc, cn, cd = _centre(X)
    grid = start_grid(free)
    scores = [_objective(t, free, Xc, y)[0] for t in grid]
    inits = [grid[i] for i in np.argsort(scores)[:top]]
    for p in starts or []:  # raw -> centred, internal units
        q = {**p, "a": p["a"] - p["alpha"] * cn, "b": p["b"] - p["beta"] * cd}
        inits.insert(0, _internal(q, free))
    bounds = [{**BOUNDS, **CENTRED_BOUNDS}[k] for k in free]
    lo, hi = np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])
    best = None
    opts = {"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-10}
    with _one_blas_thread():
        for t0 in inits:
            # least squares first (smooth: L-BFGS converges), then the robust Huber loss from there
            res = minimize(_objective, np.clip(t0, lo, hi), args=(free, Xc, y, 1.0), jac=True, method="L-BFGS-B",
                           bounds=bounds, options=opts)
            res = minimize(_objective, res.x, args=(free, Xc, y), jac=True, method="L-BFGS-B", bounds=bounds,
                           options=opts)
            if best is None or res.fun < best.fun:
                best = res
    p = _full(best.x, free)
    p["a"] += p["alpha"] * cn  # back to raw units: A / N^alpha with N in parameters
    p["b"] += p["beta"] * cd
    return {"form": form, "params": p, "objective": float(best.fun)}


def coefficients(p: dict) -> dict:
    """The law in readable units: E, A, B (not their logs) and the exponents."""
    out = {"E": math.exp(p["e"]), "A": math.exp(p["a"]), "alpha": p["alpha"], "B": math.exp(p["b"]),
           "beta": p["beta"]}
    out.update({k: p[k] for k in ("rho", "gamma", "sigma", "gamma2", "mu")})
    return out


def predict(p: dict, records: list[dict]) -> np.ndarray:
    """Predicted loss for sweep records or law_vars dicts."""
    return np.exp(predict_log(p, features(records)))


def cross_validate(X: np.ndarray, y: np.ndarray, form: str, folds: int = 0, seed: int = 0,
                   full: dict | None = None) -> np.ndarray:
    """Held-out predictions: K folds over runs (0: leave one out), each refit without its fold."""
    n = len(y)
    k = n if folds <= 0 else min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    pred = np.empty(n)
    for f in range(k):
        test = order[f::k]
        train = np.setdiff1d(np.arange(n), test)
        starts = [full] if full is not None else None  # the full fit's optimum seeds every fold
        fp = fit_params(X[train], y[train], form, starts=starts)
        pred[test] = np.exp(predict_log(fp["params"], X[test]))
    return pred


def error_stats(obs: np.ndarray, pred: np.ndarray) -> dict:
    err = pred - obs
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))),
            "max_abs": float(np.max(np.abs(err))), "mape_pct": float(100 * np.mean(np.abs(err) / obs))}


@dataclass
class FitResult:
    form: str
    params: dict
    in_sample: dict
    cv: dict
    cv_pred: np.ndarray
    pred: np.ndarray


def fit_law(records: list[dict], form: str = "moe", folds: int = 0, seed: int = 0) -> FitResult:
    X = features(records)
    y = np.array([r["eval_loss"] for r in records], dtype=np.float64)
    full = fit_params(X, y, form)
    pred = np.exp(predict_log(full["params"], X))
    cv_pred = cross_validate(X, y, form, folds, seed, full=full["params"])
    return FitResult(form, full["params"], error_stats(y, pred), error_stats(y, cv_pred), cv_pred, pred)


def bootstrap(records: list[dict], form: str, params: dict, n: int = 100, seed: int = 0) -> dict:
    """Percentile intervals (5%, 95%) of every free coefficient over runs resampled with replacement."""
    X = features(records)
    y = np.array([r["eval_loss"] for r in records], dtype=np.float64)
    free = FORMS[form]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(idx)) <= len(free):
            continue
        fp = fit_params(X[idx], y[idx], form, starts=[params], top=2)
        draws.append(coefficients(fp["params"]))
    out = {}
    for k in (COEF_NAME.get(k, k) for k in free):
        v = np.array([d[k] for d in draws])
        out[k] = [float(np.percentile(v, 5)), float(np.percentile(v, 95))]
    return out


# ---------------------------------------------------------------------------- coefficients file
def save_law(path, result: FitResult, extra: dict) -> None:
    """The coefficients file `design --law` reads (written atomically)."""
    doc = {"form": result.form,
           "law": "L = E + A / N_eff^alpha + B / D^beta; ln N_eff = ln N + rho ln R + gamma ln G + sigma s "
                  "+ gamma2 ln^2 G + mu m",
           "variables": {"N": "active non-embedding params", "D": "training tokens",
                         "R": "total / active non-embedding params", "G": "4 x hidden / expert width (dense: 1)",
                         "s": "shared width / (shared + top_k x expert width) (dense: 0)",
                         "m": "1 for an MoE, 0 for a dense model"},
           "coefficients": coefficients(result.params), "params": result.params,
           "fit_error": {"in_sample": result.in_sample, "held_out": result.cv}, **extra}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def load_law(path) -> dict:
    """Parameters (PARAMS) of a coefficients file written by `fit`."""
    path = Path(path)
    doc = read_json(path, LawError, "coefficients file", " (run `python -m train.scaling fit` first)")
    p = doc.get("params") if isinstance(doc, dict) else None
    if not isinstance(p, dict):
        raise LawError(f"{path}: missing the 'params' object")
    missing = [k for k in PARAMS if not isinstance(p.get(k), (int, float))]
    if missing:
        raise LawError(f"{path}: field 'params' lacks numeric {missing}")
    return {k: float(p[k]) for k in PARAMS}


def law_info(path) -> dict:
    """What a coefficients file says about its own fit, for `design` to print: form, runs, sweep log,
    leave-one-out RMSE, and which of the form's MoE terms its 90% bootstrap intervals pin down
    ("identified": the interval excludes zero) and which not (absent keys: not recorded in the file)."""
    doc = read_json(Path(path), LawError, "coefficients file", " (run `python -m train.scaling fit` first)")
    form = doc.get("form")
    free = FORMS.get(form, PARAMS)
    ci = doc.get("bootstrap_90") or {}
    terms = [k for k in MOE_TERMS if k in free]
    held = (doc.get("fit_error") or {}).get("held_out") or {}
    return {"form": form, "runs": doc.get("runs"), "log": doc.get("log"), "min_tokens": doc.get("min_tokens"),
            "loo_rmse": held.get("rmse"), "loo_mape_pct": held.get("mape_pct"), "moe_terms": terms,
            "identified": [k for k in terms if k in ci and (ci[k][0] > 0 or ci[k][1] < 0)],
            "not_identified": [k for k in terms if k in ci and ci[k][0] <= 0 <= ci[k][1]],
            "intervals": {k: ci[k] for k in terms if k in ci}}


# ---------------------------------------------------------------------------- plots
def plot_fit(records: list[dict], result: FitResult, png, reference: dict) -> bool:
    """Observed vs predicted, and the loss against N, D, R, G and s (partial residuals at `reference`)."""
    try:  # optional: the plot is skipped without matplotlib
        import matplotlib  # deferred: optional, only the plot needs it
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred with matplotlib, after use("Agg")
        import matplotlib.ticker  # deferred with matplotlib
    except ImportError:
        return False
    obs = np.array([r["eval_loss"] for r in records])
    fams = [r["families"][0] if r.get("families") else "runs" for r in records]
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(dict.fromkeys(fams))}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), dpi=100)
    ax = axes[0, 0]
    for f in colors:
        m = np.array([x == f for x in fams])
        ax.scatter(result.pred[m], obs[m], color=colors[f], label=f, s=28)
        ax.scatter(result.cv_pred[m], obs[m], color=colors[f], marker="x", s=24)
    lo, hi = min(obs.min(), result.cv_pred.min()), max(obs.max(), result.cv_pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlabel="predicted loss (o: full fit, x: held out)", ylabel="observed held-out loss",
           title=f"form '{result.form}': held-out RMSE {result.cv['rmse']:.4f}, in-sample {result.in_sample['rmse']:.4f}")
    ax.legend(fontsize=7)
    # partial residuals: each run moved to the reference point in every variable but the plotted one
    panels = [("n_active", "active non-embedding params N", True), ("tokens", "training tokens D", True),
              ("expansion", "R = total / active (sparsity 1 - 1/R)", True), ("granularity", "granularity G", True),
              ("shared_frac", "shared share s", False)]
    is_moe = features(records)[:, 5] == 1
    dense_ref = {**reference, "expansion": 1.0, "granularity": 1.0, "shared_frac": 0.0, "moe": 0.0}
    for ax, (key, label, log) in zip(axes.flat[1:], panels):
        moe_axis = key in ("expansion", "granularity", "shared_frac")  # dense runs have no such axis
        keep = is_moe if moe_axis else np.ones(len(records), bool)
        moved = [{**reference, key: r[key]} for r in records]
        adj = obs - result.pred + predict(result.params, moved)
        for f in colors:
            m = np.array([x == f for x in fams]) & keep
            ax.scatter([r[key] for r, k in zip(records, m) if k], adj[m], color=colors[f], s=24)
        xs = np.array(sorted({r[key] for r, k in zip(records, keep) if k}))
        grid = np.geomspace(xs.min(), xs.max(), 60) if log and xs.min() > 0 else np.linspace(xs.min(), xs.max(), 60)
        ax.plot(grid, predict(result.params, [{**reference, key: v} for v in grid]), "k-", lw=1)
        if moe_axis:
            ax.axhline(float(predict(result.params, [dense_ref])[0]), color="tab:blue", ls="--", lw=1,
                       label="dense model, same N and D")
            ax.legend(fontsize=7, title="MoE runs only", title_fontsize=7)
        ax.set(xlabel=label, ylabel="loss at the reference point", xscale="log" if log else "linear")
        if log:  # ticks at the swept values, at least 20% apart
            ticks = []
            for v in sorted({float(f"{v:.2g}") for v in xs}):
                if not ticks or v > 1.2 * ticks[-1]:
                    ticks.append(v)
            ax.set_xticks(ticks, [f"{v / 1e6:.2g}M" if v >= 1e5 else f"{v:.3g}" for v in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    ref = ", ".join(f"{k}={reference[k]:.3g}" for k in FEATURES) + f", moe={reference.get('moe', 1):g}"
    fig.suptitle(f"Sweep vs the fitted law (partial residuals at {ref})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True
