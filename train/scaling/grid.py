"""Sweep grids: the run specs `python -m train.scaling sweep --grid NAME|GRID.json` trains.

A run spec is {"id", "families", "model" (a MobileMoEConfig dict), "tokens", "seed", "train"
(train.pretrain fields)}; the id names the shape, tokens and seed, and a log line is matched to
its spec by id.

Grid "default" (60 runs; vocab 8192, the bundled tokenizer; ~0.3-19M active non-embedding params
on 0.5-4 passes over the 2.87M-token corpus, at most 4, which Muennighoff et al. 2023 found worth
nearly as much as unique data). Heads of 64 (KV heads: H / 128, at least 1; at most 4); batch
32 x 512 tokens; LR 2e-3 at width 256, scaled by sqrt(256 / H) above it; warmup 5% of steps
(>= 10); cosine to 10%; MoE layers run every expert on every token (moe_impl "dense": the same
results, faster for such small experts). First round, 2 passes (5.73M tokens):
    size-dense   dense FFN 2H at (H, L) = (128, 2), (192, 3), (256, 4), (384, 6), (512, 8)
    size-moe     the same widths and depths with the reference MoE: 16 experts of H/2 (G = 8), top-2,
                 a shared expert of H (s = 1/2): as many active params as the dense FFN of 2H
    sparsity     (256, 4) reference with 4, 8, 16, 32, 64 experts (R 1.3 to 11); 4 and 64 at widths 128, 384
    granularity  (256, 4), no shared expert, active width 2H, total 8H, G = 2, 4, 8, 16, 32
    shared       (256, 4), G = 8, active width 2H, total 9H, s = 0, 1/4, 1/2, 3/4
    tokens       (256, 4) dense and reference MoE on 0.5, 1 and 4 passes; (128, 2) and (384, 6) MoE on 1
    seed         (256, 4) dense and reference MoE again with seed 1 (the noise floor)
Grid "corpus50m": the refit on the larger corpus (corpus50m_grid).
Grid "corpus50m-long": corpus50m and the longer runs that identify its size and shape terms
(corpus50m_long_grid).
Grid "corpus50m-shapes": corpus50m-long and more MoE shape levels and seeds on 12.6M tokens
(corpus50m_shapes_grid).
Second round: every size / sparsity / granularity / shared config again on 4 passes (11.47M tokens),
since 2 passes left the larger models far from converged.
"""
from __future__ import annotations

import math
from pathlib import Path

from mobilemoe.config import MobileMoEConfig
from train.scaling.arch import make_config, shape_name
from train.scaling.files import read_json

SEQ_LEN, BATCH = 512, 32
STEP_TOKENS = SEQ_LEN * BATCH  # 16,384
EPOCH_STEPS = 175  # 175 x 16,384 = 2.87M tokens: one pass over data/corpus
SPEC_KEYS = ("model", "tokens", "seed", "train")


class SweepError(ValueError):
    """A grid or log is invalid or inconsistent; the message names the file, run and field."""


def _train(hidden: int, steps: int) -> dict:
    lr = 2e-3 * min(1.0, math.sqrt(256 / hidden))
    return {"seq_len": SEQ_LEN, "batch_size": BATCH, "lr": round(lr, 6), "warmup_steps": max(10, steps // 20),
            "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.1, "moe_impl": "dense"}


def run_spec(cfg: MobileMoEConfig, steps: int, family: str, seed: int = 0, train: dict | None = None) -> dict:
    tokens = steps * STEP_TOKENS if train is None else steps * train["seq_len"] * train["batch_size"]
    size = f"{tokens / 1e6:.2f}M" if tokens >= 1e6 else f"{tokens / 1e3:.1f}K"
    rid = f"{shape_name(cfg)}-t{size}" + (f"-seed{seed}" if seed else "")
    return {"id": rid, "families": [family], "model": cfg.to_dict(), "tokens": tokens, "seed": seed,
            "train": train or _train(cfg.hidden_size, steps)}


def _dense(h: int, layers: int, vocab: int) -> MobileMoEConfig:
    return make_config(f"dense-{h}x{layers}", h, layers, vocab=vocab, ffn_hidden=2 * h, max_kv_heads=max(1, h // 128))


def _moe(h: int, layers: int, vocab: int, experts: int = 16, top_k: int = 2, width: int | None = None,
         shared: int | None = None) -> MobileMoEConfig:
    width = h // 2 if width is None else width
    shared = h if shared is None else shared
    return make_config(f"moe-{h}x{layers}", h, layers, vocab=vocab, experts=experts, top_k=top_k,
                       expert_hidden=width, shared_hidden=shared, max_kv_heads=max(1, h // 128))


def default_grid(vocab: int = 8192) -> list[dict]:
    """The committed sweep (module docstring), in launch order: the core runs first."""
    two = 2 * EPOCH_STEPS
    sizes = [(128, 2), (192, 3), (256, 4), (384, 6), (512, 8)]
    runs = [run_spec(_moe(256, 4, vocab), two, "size-moe"), run_spec(_dense(256, 4, vocab), two, "size-dense")]
    for h, n in sizes:
        runs += [run_spec(_dense(h, n, vocab), two, "size-dense"), run_spec(_moe(h, n, vocab), two, "size-moe")]
    runs += [run_spec(_moe(256, 4, vocab, experts=e), two, "sparsity") for e in (4, 8, 16, 32, 64)]
    for g in (2, 4, 8, 16, 32):  # no shared expert; active routed width 2H = 512, total 8H
        width = 4 * 256 // g
        runs.append(run_spec(_moe(256, 4, vocab, experts=2048 // width, top_k=512 // width, width=width, shared=0),
                             two, "granularity"))
    for shared, k, e in ((0, 4, 18), (128, 3, 17), (256, 2, 16), (384, 1, 15)):  # total width 9H = 2304
        runs.append(run_spec(_moe(256, 4, vocab, experts=e, top_k=k, shared=shared), two, "shared"))
    for steps in (EPOCH_STEPS // 2, EPOCH_STEPS, 4 * EPOCH_STEPS):
        runs += [run_spec(_dense(256, 4, vocab), steps, "tokens"), run_spec(_moe(256, 4, vocab), steps, "tokens")]
    runs += [run_spec(_dense(256, 4, vocab), two, "seed", seed=1), run_spec(_moe(256, 4, vocab), two, "seed", seed=1)]
    runs += [run_spec(_moe(h, n, vocab), EPOCH_STEPS, "tokens") for h, n in ((128, 2), (384, 6))]
    runs += [run_spec(_moe(h, n, vocab, experts=e), two, "sparsity") for h, n in ((128, 2), (384, 6)) for e in (4, 64)]
    # second round: every size / sparsity / granularity / shared config again on 4 passes (the first
    # round's 2-pass runs were still far from converged; 0.5 and 1 pass turned out to be the plateau)
    main = ("size-dense", "size-moe", "sparsity", "granularity", "shared")
    runs += [{**run_spec(MobileMoEConfig.from_dict(r["model"]), 4 * EPOCH_STEPS, r["families"][0]),
              "families": [f for f in r["families"] if f in main]}
             for r in merge_runs(runs) if r["tokens"] == two * STEP_TOKENS and r["seed"] == 0
             and any(f in main for f in r["families"])]
    return merge_runs(runs)


def smoke_grid(vocab: int = 8192) -> list[dict]:
    """Two seconds-long CPU runs (a dense and an MoE model of width 64): checks the whole command."""
    train = {**_train(64, 4), "seq_len": 64, "batch_size": 4, "warmup_steps": 2, "eval_tokens": 1024}
    return [run_spec(make_config("smoke-dense", 64, 2, vocab=vocab, ffn_hidden=128, head_dim=16, max_kv_heads=2),
                     4, "smoke", train=train),
            run_spec(make_config("smoke-moe", 64, 2, vocab=vocab, experts=8, top_k=2, expert_hidden=32,
                                 shared_hidden=64, head_dim=16, max_kv_heads=2), 4, "smoke", train=train)]


def corpus50m_grid(vocab: int = 8192) -> list[dict]:
    """The refit on the ~50M-token corpus (issue 17), under one pass (no token seen twice), sized for
    one 10-minute GPU call; run with --tokenizer train/runs/issue17/tokenizer-8192.json.
        size    dense FFN 2H and the reference MoE at (H, L) = (256, 4), (384, 6), (512, 8)
                (4.5-67M total params) on 1.6M, 3.1M and 6.3M tokens; (256, 4) also on 12.6M and 25.2M
        shape   (256, 4) on 3.1M tokens: 4 and 64 experts (R), G = 2 and 32 without a shared expert,
                shared share s = 0 and 3/4 (as the default grid's families): what pins rho, gamma, sigma"""
    runs = []
    for steps in (96, 192, 384):  # x 16,384 tokens
        for h, n in ((256, 4), (384, 6), (512, 8)):
            runs += [run_spec(_dense(h, n, vocab), steps, "size-dense"), run_spec(_moe(h, n, vocab), steps, "size-moe")]
    for steps in (768, 1536):
        runs += [run_spec(_dense(256, 4, vocab), steps, "size-dense"), run_spec(_moe(256, 4, vocab), steps, "size-moe")]
    runs += [run_spec(_moe(256, 4, vocab, experts=e), 192, "sparsity") for e in (4, 64)]
    for g in (2, 32):
        width = 4 * 256 // g
        runs.append(run_spec(_moe(256, 4, vocab, experts=2048 // width, top_k=512 // width, width=width, shared=0),
                             192, "granularity"))
    for shared, k, e in ((0, 4, 18), (384, 1, 15)):
        runs.append(run_spec(_moe(256, 4, vocab, experts=e, top_k=k, shared=shared), 192, "shared"))
    return merge_runs(runs)


def corpus50m_long_grid(vocab: int = 8192) -> list[dict]:
    """corpus50m plus the runs that pin its size and shape terms (issue 17): corpus50m's runs were all
    in their fast early descent (<= 6.3M tokens above width 256), so the loss was set by the tokens and
    alpha, rho, gamma, sigma ran to their bounds. Same batch, LR rule and cosine-to-length schedule as
    corpus50m, so its 28 runs (same ids, same specs) stay in the fit; run with the same tokenizer.
        size    (384, 6) and (512, 8) dense and reference MoE also on 12.6M and 25.2M tokens (5 token
                counts each, 1.6-25M), but the (512, 8) MoE (67M total) on 12.6M only (4 counts; on 25.2M
                it alone would cost a fifth of the sweep); (256, 4) also on 50.3M; (128, 2) and (192, 3),
                new, on 6.3M, 12.6M, 25.2M and 50.3M (the small models bend towards their size limit:
                what pins E and alpha)
        shape   the six (256, 4) MoE shapes of corpus50m again on 12.6M tokens (R 1.3 and 11, G 2 and
                32, s 0 and 3/4; the reference shape has 12.6M already)
    50.3M tokens is about one pass of the whole corpus' training split; where a sweep trains on part
    of it, the log's epochs say how often a token was seen."""
    runs = corpus50m_grid(vocab)
    for steps in (768, 1536):
        for h, n in ((384, 6), (512, 8)):
            runs.append(run_spec(_dense(h, n, vocab), steps, "size-dense"))
            if (h, steps) != (512, 1536):  # the 67M MoE on 25M tokens alone would cost a fifth of the sweep
                runs.append(run_spec(_moe(h, n, vocab), steps, "size-moe"))
    runs += [run_spec(_dense(256, 4, vocab), 3072, "size-dense"), run_spec(_moe(256, 4, vocab), 3072, "size-moe")]
    for steps in (384, 768, 1536, 3072):
        for h, n in ((128, 2), (192, 3)):
            runs += [run_spec(_dense(h, n, vocab), steps, "size-dense"), run_spec(_moe(h, n, vocab), steps, "size-moe")]
    runs += [{**r, "tokens": 768 * STEP_TOKENS, **_respec(r, 768)} for r in corpus50m_grid(vocab)
             if r["tokens"] == 192 * STEP_TOKENS and not {"size-dense", "size-moe"} & set(r["families"])]
    return merge_runs(runs)


SHAPE_SEEDS = (1, 2)


def corpus50m_shapes_grid(vocab: int = 8192) -> list[dict]:
    """corpus50m-long plus what its shape terms (rho, gamma, sigma, gamma2, mu) lacked: corpus50m-long
    had each of R, G and s at two levels on 12.6M tokens (besides the reference), one seed each, against
    a run-to-run scatter of 0.1-0.3 nats. All (256, 4), 768 steps (12.6M tokens), the default families:
        levels  the default grid's levels that corpus50m-long left out: 8 and 32 experts (R 2.0, 5.9),
                G = 4, 8 and 16 without a shared expert, shared share s = 1/4 (so R, G: 5 levels, s: 4)
        seeds   every MoE shape of the three families at 12.6M (13, the reference included) and the
                dense (256, 4) again with seeds 1 and 2 (the dense one: seed 1 only)
    Same ids as corpus50m-long for its runs (their logged losses are reused); seeds > 0 add -seedN."""
    runs = corpus50m_long_grid(vocab)
    steps = 768
    shapes = [(_moe(256, 4, vocab, experts=e), "sparsity") for e in (4, 8, 16, 32, 64)]
    for g in (2, 4, 8, 16, 32):  # no shared expert; active routed width 2H, total 8H
        width = 4 * 256 // g
        shapes.append((_moe(256, 4, vocab, experts=2048 // width, top_k=512 // width, width=width, shared=0),
                       "granularity"))
    for shared, k, e in ((0, 4, 18), (128, 3, 17), (256, 2, 16), (384, 1, 15)):  # total width 9H
        shapes.append((_moe(256, 4, vocab, experts=e, top_k=k, shared=shared), "shared"))
    runs += [run_spec(cfg, steps, fam) for cfg, fam in shapes]  # new levels (the rest are logged already)
    runs += [run_spec(cfg, steps, fam, seed=s) for s in SHAPE_SEEDS for cfg, fam in shapes]
    runs.append(run_spec(_dense(256, 4, vocab), steps, "seed", seed=SHAPE_SEEDS[0]))
    return merge_runs(runs)


def _respec(run: dict, steps: int) -> dict:
    """`run` (a spec of the default batch and LR rule) at another length: its id, tokens and train fields."""
    return run_spec(MobileMoEConfig.from_dict(run["model"]), steps, run["families"][0])


GRIDS = {"default": default_grid, "smoke": smoke_grid, "corpus50m": corpus50m_grid,
         "corpus50m-long": corpus50m_long_grid, "corpus50m-shapes": corpus50m_shapes_grid}


def merge_runs(runs: list[dict]) -> list[dict]:
    """One run per id (the first's position), its families merged; the same id with another spec is an error."""
    out: dict[str, dict] = {}
    for r in runs:
        if r["id"] in out:
            old = out[r["id"]]
            diff = [k for k in SPEC_KEYS if old[k] != r[k]]
            if diff:
                raise SweepError(f"grid: run '{r['id']}' appears twice with different {diff}")
            old["families"] += [f for f in r["families"] if f not in old["families"]]
        else:
            out[r["id"]] = {**r, "families": list(r["families"])}
    return list(out.values())


def load_grid(name_or_path: str, vocab: int = 8192) -> list[dict]:
    """A named grid (GRIDS) or a JSON file: a list of run specs {"id", "model", "tokens", "seed", "train"}."""
    if name_or_path in GRIDS:
        return GRIDS[name_or_path](vocab)
    path = Path(name_or_path)
    data = read_json(path, SweepError, "grid file", f" (named grids: {', '.join(GRIDS)})")
    runs = data.get("runs") if isinstance(data, dict) else data
    if not isinstance(runs, list):
        raise SweepError(f"{path}: expected a list of runs (or {{\"runs\": [...]}})")
    for i, r in enumerate(runs):
        where = f"{path}: run {i}"
        if not isinstance(r, dict):
            raise SweepError(f"{where}: expected an object")
        for k, kind in (("id", str), ("model", dict), ("tokens", int)):
            if not isinstance(r.get(k), kind):
                raise SweepError(f"{where}: field '{k}' must be {kind.__name__}, got {r.get(k)!r}")
        MobileMoEConfig.from_dict(r["model"], source=f"{where} ('{r['id']}') field 'model'")
        r.setdefault("seed", 0)
        r.setdefault("train", {})
        r.setdefault("families", ["custom"])
    return merge_runs(runs)
