"""Run logs: metrics as JSON lines (one object per log/eval event) and the loss-curve PNG.

metrics.jsonl lines:
    {"step", "tokens", "loss", "lr", "grad_norm", "tok_s", ["load_balance", "z_loss", "expert_share"]}
    {"step", "tokens", "eval_loss"}                     held-out loss
`expert_share` is [layers][experts]: the share of routed assignments each expert got over the log
interval (1 / num_experts each when balanced).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path


class MetricsLog:
    def __init__(self, path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records logged after `step` (a run resumed from the checkpoint at `step`)."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)


def read_metrics(path) -> list[dict]:
    """Records of a metrics file; a last line cut short by a kill is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_losses(runs: dict[str, list[dict]], png, title: str = "") -> bool:
    """Train (line) and held-out (markers) loss against tokens for one or more runs; False without matplotlib."""
    try:
        import matplotlib  # deferred: optional and heavy, only the plot needs it
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred with matplotlib, after use("Agg")
    except ImportError:
        warnings.warn(f"matplotlib is not installed: no loss curve written to {png}", stacklevel=2)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["tokens"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, lw=1, alpha=0.8, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), "o--", color=color, ms=4, label=f"{name} held-out")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(png).with_name(Path(png).name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
    return True


def main(argv=None) -> int:
    """Redraw loss.png of every stage dir (a dir holding metrics.jsonl) under the given dirs."""
    p = argparse.ArgumentParser(prog="python -m train.logs", description=main.__doc__)
    p.add_argument("dirs", nargs="+", type=Path)
    a = p.parse_args(argv)
    for root in a.dirs:
        for m in sorted(root.rglob("metrics.jsonl")):
            summary = m.parent / "summary.json"
            title = m.parent.name
            if summary.is_file():
                s = json.loads(summary.read_text())
                title = f"{s['stage']}: {s['model']}"
            if plot_losses({title.split(": ")[-1]: read_metrics(m)}, m.parent / "loss.png", title):
                print(m.parent / "loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
