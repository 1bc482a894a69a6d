"""Held-out loss of a checkpoint, as float or as the INT4 model the compiler builds.

    python -m train.evaluate --checkpoint DIR --data data/corpus/heldout.jsonl [--int4]
        [--packing stream|examples] [--seq-len 512] [--dtype float32|bfloat16]

Prints one JSON object: {"checkpoint", "data", "int4", "loss", "target_tokens"}. --int4 evaluates
mobilemoe.quant.simulate_int4(model): every INT4 weight replaced by dequant(quantize(w)).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mobilemoe.checkpoint import CheckpointError, load_checkpoint
from mobilemoe.quant import simulate_int4
from mobilemoe.text_format import load_text_format
from train.data import DataError, DataSpec, build_rows, split_for_eval
from train.loop import DTYPES, Dist, heldout_loss


def evaluate_checkpoint(checkpoint, data, packing: str = "stream", seq_len: int = 512, int4: bool = False,
                        dtype: str = "float32", device: str = "cpu", batch_size: int = 8,
                        max_tokens: int = 0, cache_dir="data/cache/tokens", model=None) -> dict:
    """Held-out loss of `checkpoint` (or of an already loaded `model`) on `data` files."""
    model = model if model is not None else load_checkpoint(checkpoint, dtype=torch.float32)
    if int4:
        model = simulate_int4(model)
    tok, fmt = load_text_format(checkpoint, model.config)
    files = [data] if isinstance(data, (str, Path)) else list(data)
    rows = build_rows(DataSpec(tuple(map(str, files)), min(seq_len, model.config.max_seq_len), packing),
                      tok, cache_dir, fmt)
    ids = split_for_eval(rows, max_tokens)
    d = Dist(device=torch.device(device))
    model = model.to(d.device)
    loss = heldout_loss(model, rows, ids, batch_size, d, DTYPES[dtype])
    targets = len(ids) * rows.seq_len if rows.mask is None else int(np.asarray(rows.mask[ids][:, 1:]).sum())
    return {"checkpoint": str(checkpoint), "data": [str(f) for f in files], "int4": int4,
            "loss": round(loss, 5), "target_tokens": targets}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", nargs="+", default=["data/corpus/heldout.jsonl"])
    p.add_argument("--packing", choices=("stream", "examples"), default="stream")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--int4", action="store_true", help="evaluate the INT4 (dequant(quantize(w))) model")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=int, default=0, help="held-out target tokens (0: all)")
    p.add_argument("--cache-dir", default="data/cache/tokens")
    a = p.parse_args(argv)
    try:
        r = evaluate_checkpoint(a.checkpoint, a.data, a.packing, a.seq_len, a.int4, a.dtype, a.device,
                                max_tokens=a.max_tokens, cache_dir=a.cache_dir)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
