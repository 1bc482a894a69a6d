"""`python -m bench.residency --policies`: which expert cache policy, measured on routing traces.

Routes real text through the PyTorch model (compiler.routing.collect) and replays each token's
expert requests, layer after layer, through a cache of S slots shared by all MoE layers (as the
runtime's, mobilemoe/runtimes/expert_cache.py), at 25%, 50% and 75% of all experts:
    lru          least recently used
    pin P% + lru P% of the slots hold the experts most used on --cal (compiler.routing statistics'
                 counts), the rest LRU
    lfu          least frequently used so far (ties: least recent)
A request that misses loads the expert, evicting a slot the same layer's call does not need. The
hit rate is over (token, layer, expert) requests of --text. compiler/residency.py quotes the result.
"""
from __future__ import annotations

from collections import Counter, OrderedDict

import numpy as np
from tabulate import tabulate

from bench.common import log
from compiler.routing import collect, read_texts
from mobilemoe.checkpoint import load_checkpoint
from mobilemoe.tokenizer import load_tokenizer


def traces(model, tok, path, max_tokens: int) -> list[np.ndarray]:
    """Per MoE layer, the expert ids [N, k] of the first max_tokens tokens of the text at `path`."""
    cfg = model.config
    ids = ([cfg.bos_token_id] + tok.encode("\n".join(read_texts(path))).ids)[:max_tokens]
    windows = [ids[i:i + cfg.max_seq_len] for i in range(0, len(ids), cfg.max_seq_len)]
    return collect(model.eval(), windows)


def hit_rate(trace: list[np.ndarray], slots: int, pinned: set, policy: str = "lru") -> float:
    cached, freq, hits, misses = OrderedDict(), Counter(), 0, 0
    cap = slots - len(pinned)
    for t in range(len(trace[0])):
        for layer, ids in enumerate(trace):
            need = {(layer, int(e)) for e in ids[t]}
            for key in need:
                freq[key] += 1
                if key in pinned or key in cached:
                    hits += 1
                    if key in cached:
                        cached.move_to_end(key)
                    continue
                misses += 1
                if len(cached) >= cap:
                    free = [k for k in cached if k not in need]
                    del cached[free[0] if policy == "lru" else min(free, key=lambda k: freq[k])]
                cached[key] = None
    return hits / (hits + misses)


def main(a) -> None:
    model = load_checkpoint(a.checkpoint)
    tok = load_tokenizer(a.checkpoint / "tokenizer.json")
    cfg = model.config
    log(f"routing {a.cal} (statistics) and {a.text} (replayed)")
    cal, trace = traces(model, tok, a.cal or a.text, a.policy_tokens * 2), traces(model, tok, a.text, a.policy_tokens)
    counts = np.stack([np.bincount(x.ravel(), minlength=cfg.num_experts) for x in cal])  # [L, E]
    order = [divmod(int(i), cfg.num_experts) for i in np.argsort(-counts, axis=None, kind="stable")]
    total = len(trace) * cfg.num_experts
    rows = []
    for share in (0.25, 0.5, 0.75):
        s = int(share * total)
        row = [f"{share:.0%} ({s} slots)", f"{hit_rate(trace, s, set()):.1%}"]
        for pin in (0.25, 0.5):
            row.append(f"{hit_rate(trace, s, set(order[:int(pin * s)])):.1%}")
        rows.append(row + [f"{hit_rate(trace, s, set(), 'lfu'):.1%}"])
    print(f"{cfg.name}: hit rates over {len(trace[0])} tokens of {a.text.name}, statistics from "
          f"{(a.cal or a.text).name} ({len(cal[0])} tokens)")
    print(tabulate(rows, headers=["cache", "lru", "pin 25% + lru", "pin 50% + lru", "lfu"]))
