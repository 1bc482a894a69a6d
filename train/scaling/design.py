"""Budget-driven architecture design: the predicted-best config under INT4 memory and decode compute.

    python -m train.scaling design --memory-mb 1024 --gflops-per-token 0.6 [--tokens 1e12]
        [--law train/runs/scaling/corpus50m-long/chinchilla/law.json] [--space paper|tiny] [--ctx 1024] [--out DIR] [--plot PNG]

Enumerates a search space of shapes (SPACES: hidden size x depth within an aspect-ratio range, then
dense FFN widths, or experts x top-k x granularity x shared expert), keeps those whose INT4 weight
MB and decode GFLOPs/token, counted by `arch.budget` (= `python -m mobilemoe.config list`), fit the
budgets, and ranks them by the fitted law's loss at --tokens. Writes DIR/config.json (the best; a
bare MobileMoEConfig that `train.pretrain --model DIR/config.json` and `compiler.build --preset
DIR/config.json` accept) and DIR/design.json (budgets, law, the best, its neighbours, and the best of
each class: dense, no shared expert, coarse experts, each sparsity band).

The law has no term for depth vs width at equal N (the sweep kept H/L fixed), so the space keeps the
presets' aspect ratios; nor for kernel efficiency, so experts narrower than H/4 (G > 16) are left out.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mobilemoe.config import PRESETS, MobileMoEConfig
from train.scaling.arch import DECODE_CTX, budget, law_vars, make_config, shape_name
from train.scaling.files import atomic_write_text
from train.scaling.law import features, ln_neff, predict_log


class DesignError(ValueError):
    """No architecture fits, or a bad budget / space argument; the message names which."""


@dataclass(frozen=True)
class SearchSpace:
    vocab: int
    max_seq_len: int
    tokens: float  # default --tokens
    hidden: tuple[int, ...]
    layers: tuple[int, ...]
    aspect: tuple[float, float]  # allowed hidden / layers
    head_dim: int = 64
    max_kv_heads: int = 4
    granularity: tuple[int, ...] = (1, 2, 4, 8, 16)  # expert width 4H / G
    top_k: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16)
    experts: tuple[int, ...] = (8, 16, 24, 32, 48, 64, 96, 128)
    shared: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # shared expert width / H
    dense_ffn: tuple[float, ...] = (2.0, 8 / 3, 3.0, 4.0, 5.0)  # dense FFN width / H (rounded to 64)


SPACES = {
    # the presets' scale: MobileLLM-Pro's 202k vocabulary, 4k context, H/L 24-64 (presets: 43-45)
    "paper": SearchSpace(vocab=PRESETS["mobilemoe-s"].vocab_size, max_seq_len=4096, tokens=1e12,
                         hidden=(512, 640, 768, 896, 1024, 1152, 1280, 1536, 1792, 2048),
                         layers=(8, 12, 16, 20, 24, 28, 32, 36, 40), aspect=(24, 64)),
    # the sweep's scale: the bundled 8192-token tokenizer and the project corpus (H/L 32-96; sweep: 64)
    "tiny": SearchSpace(vocab=8192, max_seq_len=1024, tokens=5.7e6, hidden=(128, 192, 256, 320, 384, 448, 512),
                        layers=(2, 3, 4, 5, 6, 8, 10, 12), aspect=(32, 96), max_kv_heads=4),
}


def candidates(space: SearchSpace) -> list[MobileMoEConfig]:
    """Every shape of the space (unfiltered by budgets)."""
    out = []
    for h in space.hidden:
        for n in space.layers:
            if not space.aspect[0] <= h / n <= space.aspect[1] or h % space.head_dim:
                continue
            kw = dict(vocab=space.vocab, head_dim=space.head_dim, max_kv_heads=space.max_kv_heads,
                      max_seq_len=space.max_seq_len)
            for m in space.dense_ffn:
                out.append(make_config("dense", h, n, ffn_hidden=int(round(m * h / 64)) * 64, **kw))
            for g in space.granularity:
                width = 4 * h // g
                if 4 * h % g or width % 16:
                    continue
                for k in space.top_k:
                    for e in space.experts:
                        if 2 * k > e:  # at most half the experts active: anything denser is a dense FFN
                            continue
                        for sh in space.shared:
                            out.append(make_config("moe", h, n, experts=e, top_k=k, expert_hidden=width,
                                                   shared_hidden=int(sh * h), **kw))
    return out


def _row(cfg: MobileMoEConfig, loss: float, n_eff: float, tokens: float, ctx: int) -> dict:
    v, b = law_vars(cfg, tokens), budget(cfg, ctx)
    return {"shape": shape_name(cfg), "predicted_loss": float(loss), "n_eff": float(n_eff), "int4_mb": b["int4_mb"],
            "decode_gflops": b["decode_gflops"], "n_active": v["n_active"], "n_total": v["n_total"],
            "expansion": v["expansion"], "sparsity": 1 - 1 / v["expansion"], "granularity": v["granularity"],
            "shared_frac": v["shared_frac"], "params_total": cfg.total_params(), "config": cfg.to_dict()}


CLASSES = {
    "dense": lambda r: r["config"]["num_experts"] == 0,
    "MoE, no shared expert": lambda r: r["config"]["num_experts"] > 0 and r["shared_frac"] == 0,
    "MoE, coarse experts (G <= 2)": lambda r: r["config"]["num_experts"] > 0 and r["granularity"] <= 2,
    "MoE, G >= 8, shared expert": lambda r: r["config"]["num_experts"] > 0 and r["granularity"] >= 8
    and r["shared_frac"] > 0,
    "MoE, R < 2 (sparsity < 50%)": lambda r: r["config"]["num_experts"] > 0 and r["expansion"] < 2,
    "MoE, 2 <= R < 4": lambda r: r["config"]["num_experts"] > 0 and 2 <= r["expansion"] < 4,
    "MoE, 4 <= R < 8": lambda r: r["config"]["num_experts"] > 0 and 4 <= r["expansion"] < 8,
    "MoE, R >= 8 (sparsity >= 87.5%)": lambda r: r["config"]["num_experts"] > 0 and r["expansion"] >= 8,
}


def design(params: dict, memory_mb: float, gflops_per_token: float, tokens: float | None = None,
           space: str | SearchSpace = "paper", ctx: int = DECODE_CTX, top: int = 10) -> dict:
    """Rank the space's configs that fit both budgets by predicted loss; raises DesignError if none fits."""
    for flag, v in (("--memory-mb", memory_mb), ("--gflops-per-token", gflops_per_token), ("--ctx", ctx)):
        if not isinstance(v, (int, float)) or not v > 0:
            raise DesignError(f"{flag} must be a number > 0, got {v!r}")
    if isinstance(space, str):
        if space not in SPACES:
            raise DesignError(f"--space must be one of {', '.join(SPACES)}, got {space!r}")
        space_name, space = space, SPACES[space]
    else:
        space_name = "custom"
    tokens = space.tokens if tokens is None else tokens
    if not tokens > 0:
        raise DesignError(f"--tokens must be > 0, got {tokens!r}")
    cands = candidates(space)
    budgets = [budget(c, ctx) for c in cands]
    fit = [c for c, b in zip(cands, budgets) if b["int4_mb"] <= memory_mb and b["decode_gflops"] <= gflops_per_token]
    if not fit:
        small = min(zip(budgets, cands), key=lambda x: x[0]["int4_mb"])
        cheap = min(zip(budgets, cands), key=lambda x: x[0]["decode_gflops"])
        raise DesignError(
            f"no architecture in the '{space_name}' space fits {memory_mb:g} MB of INT4 weights and "
            f"{gflops_per_token:g} decode GFLOPs/token (context {ctx}): the smallest needs "
            f"{small[0]['int4_mb']:.1f} MB ({shape_name(small[1])}), the cheapest "
            f"{cheap[0]['decode_gflops']:.3f} GFLOPs/token ({shape_name(cheap[1])}); raise a budget")
    X = features([law_vars(c, tokens) for c in fit])
    loss, n_eff = np.exp(predict_log(params, X)), np.exp(ln_neff(params, X))
    order = np.argsort(loss, kind="stable")
    rows = [_row(fit[i], loss[i], n_eff[i], tokens, ctx) for i in order]
    best = rows[0]
    classes = {}
    for name, pred in CLASSES.items():
        r = next((r for r in rows if pred(r)), None)
        classes[name] = None if r is None else {**r, "vs_best": r["predicted_loss"] - best["predicted_loss"]}
    cfg = MobileMoEConfig.from_dict({**best["config"], "name": f"design-{memory_mb:g}mb-{gflops_per_token:g}gf"})
    best["config"] = cfg.to_dict()
    return {"budgets": {"memory_mb": memory_mb, "gflops_per_token": gflops_per_token, "ctx": ctx},
            "tokens": tokens, "space": space_name, "search_space": asdict(space), "candidates": len(cands),
            "feasible": len(fit), "best": best, "neighbours": rows[1:top], "classes": classes,
            "all": rows}


def evaluate(params: dict, cfgs: list[MobileMoEConfig], tokens: float, ctx: int = DECODE_CTX) -> list[dict]:
    """Rows (as design's) for given configs, e.g. presets to compare with the designed one."""
    X = features([law_vars(c, tokens) for c in cfgs])
    loss, n_eff = np.exp(predict_log(params, X)), np.exp(ln_neff(params, X))
    return [_row(c, lo, ne, tokens, ctx) | {"shape": c.name} for c, lo, ne in zip(cfgs, loss, n_eff)]


def table(rows: list[dict], best_loss: float, labels: list[str] | None = None) -> str:
    """N_eff: the law's effective parameter count (dense models: N), independent of D and of A, alpha, E."""
    head = ["", "shape", "N active", "N total", "R", "G", "s", "N_eff", "INT4 MB", "GFLOPs/tok", "pred. loss",
            "vs best"]
    lines = [head]
    for i, r in enumerate(rows):
        lines.append([labels[i] if labels else str(i + 1), r["shape"], f"{r['n_active'] / 1e6:.1f}M",
                      f"{r['n_total'] / 1e6:.1f}M", f"{r['expansion']:.2f}", f"{r['granularity']:.3g}",
                      f"{r['shared_frac']:.2f}", f"{r['n_eff'] / 1e6:.1f}M", f"{r['int4_mb']:.1f}",
                      f"{r['decode_gflops']:.4f}",
                      f"{r['predicted_loss']:.4f}", f"{r['predicted_loss'] - best_loss:+.4f}"])
    w = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(v.ljust(w[i]) if i < 2 else v.rjust(w[i]) for i, v in enumerate(line)) for line in lines]
    out.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(out)


def write_design(result: dict, out: Path, law_path: str) -> Path:
    out = Path(out)
    atomic_write_text(out / "config.json", json.dumps(result["best"]["config"], indent=2) + "\n")
    doc = {k: v for k, v in result.items() if k != "all"}
    doc["law"] = str(law_path)
    doc["usage"] = {"train": f"python -m train.pretrain --model {out / 'config.json'}",
                    "compile (shapes, random weights)": f"python -m compiler.build --target host --preset {out / 'config.json'}"}
    atomic_write_text(out / "design.json", json.dumps(doc, indent=1) + "\n")
    return out / "config.json"


def plot_design(result: dict, png) -> bool:
    """Predicted loss of every feasible config against its expansion R, coloured by granularity."""
    try:  # optional: the plot is skipped without matplotlib
        import matplotlib  # deferred: optional, only the plot needs it
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred with matplotlib, after use("Agg")
    except ImportError:
        return False
    rows = result["all"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100)
    s_bins = [(0.0, 0.0, "s = 0"), (1e-9, 0.3, "0 < s <= 0.3"), (0.3, 0.6, "0.3 < s <= 0.6"), (0.6, 1.0, "s > 0.6")]
    groups = ([(f"G = {g:g}", [r for r in rows if r["granularity"] == g]) for g in sorted({r["granularity"] for r in rows})],
              [(name, [r for r in rows if lo <= r["shared_frac"] <= hi and (r["shared_frac"] > 0) == (hi > 0)])
               for lo, hi, name in s_bins])
    edges = np.geomspace(1, max(r["expansion"] for r in rows) * 1.01, 25)
    env = [min((r["predicted_loss"] for r in rows if a <= r["expansion"] < b), default=np.nan)
           for a, b in zip(edges[:-1], edges[1:])]
    for ax, group in zip(axes, groups):
        for i, (name, sel) in enumerate(group):
            ax.scatter([r["expansion"] for r in sel], [r["predicted_loss"] for r in sel], s=8, alpha=0.6,
                       color=plt.cm.viridis(i / max(1, len(group) - 1)), label=name)
        ax.step(edges[:-1], env, where="post", color="k", lw=1, label="best in each R bin")
        b = result["best"]
        ax.scatter([b["expansion"]], [b["predicted_loss"]], marker="*", s=220, color="red", label="best", zorder=5)
        ax.set(xscale="log", xlabel="R = total / active (sparsity 1 - 1/R)", ylabel="predicted loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    bd = result["budgets"]
    fig.suptitle(f"Configs within {bd['memory_mb']:g} MB INT4 and {bd['gflops_per_token']:g} GFLOPs/token "
                 f"({result['feasible']} of {result['candidates']}), loss at {result['tokens']:.3g} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True
