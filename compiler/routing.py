"""`python -m compiler.routing --checkpoint DIR --data FILE`: how a MoE routes real text.

Runs the PyTorch model over calibration text (a .txt file, or .jsonl rows {"text": ...}) in windows
of the model's context and records, for every MoE layer, which experts each token was sent to:

    counts[e]          tokens routed to expert e (each token counts once per chosen expert)
    frequency[e]       counts / (tokens * top_k)
    cooccurrence[i][j] tokens routed to both i and j (symmetric; the diagonal is counts)
    top25_share        share of routed tokens served by the 25% most used experts (uniform: 0.25)
    reuse_prev_token   share of a token's experts that the previous token also used (temporal
                       locality: what an expert cache under a memory budget can exploit)

Writes OUT/routing.json (read back with `load_stats`) and OUT/routing.png (a heat map of the
per-layer expert frequencies, experts sorted by use, and the co-occurrence of the most skewed layer)
and prints a per-layer summary. The statistics drive expert residency under a memory budget.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mobilemoe.checkpoint import CheckpointError, load_checkpoint
from mobilemoe.generate import DEFAULT_MODEL_DIR
from mobilemoe.tokenizer import load_tokenizer

STATS_FORMAT = "mobilemoe-routing/1"


class RoutingError(ValueError):
    """Bad calibration data or statistics file; the message names the file and what was expected."""


def read_texts(path: Path) -> list[str]:
    """The documents of a .txt file (one document) or a .jsonl file of {"text": str} rows."""
    path = Path(path)
    if not path.is_file():
        raise RoutingError(f"{path}: calibration data file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RoutingError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix != ".jsonl":
        texts = [raw]
    else:
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RoutingError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise RoutingError(f"{path}:{n}: expected {{\"text\": str}}, got {str(row)[:60]!r}")
            texts.append(row["text"])
    if not any(t.strip() for t in texts):
        raise RoutingError(f"{path}: no text to route")
    return texts


@torch.no_grad()
def collect(model, windows: list[list[int]], progress: bool = False) -> list[np.ndarray]:
    """Expert ids per MoE layer: a list of [N, k] int arrays over all windows' tokens, in order."""
    moes = [layer.moe for layer in model.layers if layer.moe is not None]
    if not moes:
        raise RoutingError("the model has no MoE layers (a dense model routes nothing)")
    seen: list[list[np.ndarray]] = [[] for _ in moes]
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: seen[i].append(out[2].reshape(-1, mod.top_k).cpu().numpy()))
             for i, m in enumerate(moes)]
    try:
        for w in tqdm(windows, desc="route", unit="window", disable=not progress):
            model(torch.tensor([w]))
    finally:
        for h in hooks:
            h.remove()
    return [np.concatenate(s) for s in seen]


def layer_stats(ids: np.ndarray, num_experts: int) -> dict:
    """Statistics of one layer's routing decisions ids [N, k]."""
    n, k = ids.shape
    onehot = np.zeros((n, num_experts), dtype=np.int64)
    np.put_along_axis(onehot, ids, 1, axis=1)
    counts = onehot.sum(0)
    co = onehot.T @ onehot  # [E, E]
    top = np.sort(counts)[::-1][:max(1, math.ceil(num_experts / 4))]
    reuse = float((onehot[1:] & onehot[:-1]).sum() / max((n - 1) * k, 1))
    return {"counts": counts.tolist(), "frequency": (counts / max(n * k, 1)).round(6).tolist(),
            "cooccurrence": co.tolist(), "top25_share": round(float(top.sum() / max(n * k, 1)), 4),
            "reuse_prev_token": round(reuse, 4)}


def routing_stats(model, tokenizer, texts: list[str], max_tokens: int = 65536, progress: bool = False) -> dict:
    cfg = model.config
    ids = []
    for t in texts:
        ids += [cfg.bos_token_id] + tokenizer.encode(t).ids
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise RoutingError("calibration data: fewer than 2 tokens")
    windows = [ids[i:i + cfg.max_seq_len] for i in range(0, len(ids), cfg.max_seq_len)]
    per_layer = collect(model.eval(), windows, progress)
    layers = [layer_stats(x, cfg.num_experts) for x in per_layer]
    return {"format": STATS_FORMAT, "model": cfg.name, "tokens": len(ids), "num_experts": cfg.num_experts,
            "top_k": cfg.top_k, "layers": layers,
            "summary": {"top25_share_mean": round(float(np.mean([x["top25_share"] for x in layers])), 4),
                        "reuse_prev_token_mean": round(float(np.mean([x["reuse_prev_token"] for x in layers])), 4),
                        "uniform_top25_share": round(math.ceil(cfg.num_experts / 4) / cfg.num_experts, 4),
                        "uniform_reuse": round(cfg.top_k / cfg.num_experts, 4)}}


def load_stats(path) -> dict:
    """Read and check a routing.json written by this module."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RoutingError(f"{path}: cannot read routing statistics ({e})") from None
    if stats.get("format") != STATS_FORMAT:
        raise RoutingError(f"{path}: format {stats.get('format')!r}, expected {STATS_FORMAT!r}")
    e = stats["num_experts"]
    for i, layer in enumerate(stats["layers"]):
        if len(layer["counts"]) != e or np.asarray(layer["cooccurrence"]).shape != (e, e):
            raise RoutingError(f"{path}: layers[{i}]: expected {e} experts in counts and an {e}x{e} cooccurrence")
    return stats


def write_outputs(stats: dict, out: Path) -> tuple[Path, Path]:
    """routing.json (atomically) and routing.png under `out`."""
    import matplotlib  # deferred on purpose: the plot is the only use, and the backend must be set first
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred with matplotlib, after use("Agg")

    out.mkdir(parents=True, exist_ok=True)
    js = out / "routing.json"
    tmp = js.with_suffix(f".json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(stats) + "\n")
    os.replace(tmp, js)
    freq = np.array([sorted(x["frequency"], reverse=True) for x in stats["layers"]])
    worst = int(np.argmax([x["top25_share"] for x in stats["layers"]]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    im = a.imshow(freq, aspect="auto", cmap="viridis")
    a.set(xlabel="expert (sorted by use)", ylabel="layer", title=f"expert frequency ({stats['tokens']} tokens)",
          yticks=range(len(freq)))
    fig.colorbar(im, ax=a)
    co = np.asarray(stats["layers"][worst]["cooccurrence"])
    np.fill_diagonal(co, 0)  # the diagonal is each expert's own count (left panel)
    im = b.imshow(co, cmap="magma")
    b.set(xlabel="expert", ylabel="expert", title=f"tokens routed to both, layer {worst} (most skewed)")
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    png = out / "routing.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return js, png


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m compiler.routing", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--data", type=Path, required=True, help=".txt, or .jsonl with {\"text\": ...} rows")
    p.add_argument("--out", type=Path, default=Path("dist/routing"))
    p.add_argument("--max-tokens", type=int, default=65536)
    a = p.parse_args(argv)
    try:
        model = load_checkpoint(a.checkpoint)
        tok = load_tokenizer(a.checkpoint / "tokenizer.json")
        stats = routing_stats(model, tok, read_texts(a.data), a.max_tokens, progress=True)
    except (CheckpointError, RoutingError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    js, png = write_outputs(stats, a.out)
    s = stats["summary"]
    for i, x in enumerate(stats["layers"]):
        print(f"layer {i:2d}: top 25% of experts serve {x['top25_share']:.1%} of routed tokens, "
              f"{x['reuse_prev_token']:.1%} of experts reused from the previous token")
    print(f"mean: top-25% share {s['top25_share_mean']:.1%} (uniform {s['uniform_top25_share']:.1%}), "
          f"reuse {s['reuse_prev_token_mean']:.1%} (uniform {s['uniform_reuse']:.1%}); wrote {js} and {png}")


if __name__ == "__main__":
    main()
