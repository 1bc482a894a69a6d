"""train.scaling: budget accounting, law variables, the fit (known coefficients recovered),
design within budgets (and its config accepted by training and the compiler), resumable sweep."""
import json
import math
import re

import numpy as np
import pytest
import torch

from mobilemoe.config import PRESETS, ConfigError, MobileMoEConfig, format_count, load_config, preset_table
from mobilemoe.model import MobileMoE
from train.scaling.__main__ import DEFAULT_LAW, main
from train.scaling.arch import budget, law_vars, make_config
from train.scaling.design import DesignError, SearchSpace, design, write_design
from train.scaling.law import (FORMS, PARAMS, LawError, coefficients, cross_validate, features, fit_params,
                               law_info, load_law, predict_log)
from train.scaling.grid import GRIDS, STEP_TOKENS, SweepError, default_grid, load_grid, run_spec
from train.scaling.sweep import SweepOptions, append_log, read_log, run_sweep

# A law with the shape the sweep found (granularity optimum near G = 8, sparsity and shared help).
LAW = dict.fromkeys(PARAMS, 0.0) | {"e": math.log(1.7), "a": math.log(400.0), "alpha": 0.35,
                                    "b": math.log(400.0), "beta": 0.3, "rho": 0.3, "gamma": 1.8,
                                    "sigma": 0.5, "gamma2": -0.45, "mu": -2.2}
SMALL_SPACE = SearchSpace(vocab=8192, max_seq_len=1024, tokens=1e7, hidden=(128, 256, 384), layers=(2, 4, 6),
                          aspect=(32, 96), experts=(8, 16, 32, 64), top_k=(1, 2, 4), shared=(0.0, 1.0))


# ---------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("name", list(PRESETS))
def test_budget_is_config_list_accounting(name):
    cfg = PRESETS[name]
    b = budget(cfg)
    assert b["int4_mb"] == cfg.int4_weight_bytes() / 2**20
    assert b["decode_gflops"] == cfg.flops_per_token(1024) / 1e9
    row = next(line for line in preset_table().splitlines() if line.split()[0] == name)
    assert f"{b['int4_mb']:.1f}" in row.split() and format_count(b["decode_gflops"] * 1e9) in row.split()


def test_law_vars_by_hand():
    moe = MobileMoEConfig.from_name("test-moe")  # H 64, 8 experts of 32, top-2, shared 64
    v = law_vars(moe, 1e6)
    assert v["n_active"] == moe.active_params(include_lm_head=False)
    assert v["expansion"] == moe.total_params(include_embedding=False) / v["n_active"] > 1
    assert (v["granularity"], v["shared_frac"], v["moe"], v["tokens"]) == (8.0, 0.5, 1.0, 1e6)
    dense = law_vars(MobileMoEConfig.from_name("test-dense"), 2e6)
    assert (dense["expansion"], dense["granularity"], dense["shared_frac"], dense["moe"]) == (1.0, 1.0, 0.0, 0.0)
    noshared = law_vars(MobileMoEConfig.from_name("test-moe-noshared"), 1e6)
    assert noshared["shared_frac"] == 0.0 and noshared["granularity"] == 8.0


def test_make_config_heads():
    cfg = make_config("x", 640, 16, vocab=1000, experts=32, top_k=4, expert_hidden=320, shared_hidden=640)
    assert (cfg.num_heads, cfg.num_kv_heads) == (10, 2)  # largest divisor of 10 heads <= 4
    with pytest.raises(ValueError, match="multiple of head_dim"):
        make_config("x", 100, 2, vocab=1000, ffn_hidden=64)


# ---------------------------------------------------------------------------- the law
def _synthetic(n=70, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(n):
        moe = rng.random() < 0.8
        recs.append({"n_active": float(np.exp(rng.uniform(np.log(3e5), np.log(3e7)))),
                     "tokens": float(np.exp(rng.uniform(np.log(2e6), np.log(5e7)))),
                     "expansion": float(np.exp(rng.uniform(0.2, 2.5))) if moe else 1.0,
                     "granularity": float(2 ** rng.integers(1, 6)) if moe else 1.0,
                     "shared_frac": float(rng.choice([0, 0.25, 0.5, 0.75])) if moe else 0.0, "moe": float(moe)})
    return recs


def test_fit_recovers_known_coefficients():
    recs = _synthetic()
    X = features(recs)
    y = np.exp(predict_log(LAW, X))
    fit = fit_params(X, y, "moe-full")
    got, want = coefficients(fit["params"]), coefficients(LAW)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=0.02, abs=0.005), k
    # with 0.2% multiplicative noise the exponents still come back close, held-out error ~ the noise
    noisy = y * (1 + 0.002 * np.random.default_rng(1).standard_normal(len(y)))
    fit = fit_params(X, noisy, "moe-full")
    got = coefficients(fit["params"])
    for k in ("alpha", "rho", "gamma", "gamma2", "sigma"):
        assert got[k] == pytest.approx(want[k], rel=0.15, abs=0.05), k
    cv = cross_validate(X, noisy, "moe-full", folds=3, full=fit["params"])
    assert np.sqrt(np.mean((cv - noisy) ** 2)) < 3 * 0.002 * noisy.mean()


def test_fit_chinchilla_form_and_errors(tmp_path):
    recs = _synthetic(30, seed=2)
    X = features(recs)
    law = {**LAW, "rho": 0.0, "gamma": 0.0, "sigma": 0.0, "gamma2": 0.0, "mu": 0.0}
    fit = fit_params(X, np.exp(predict_log(law, X)), "chinchilla")
    assert {k: fit["params"][k] for k in FORMS["moe-full"] if k not in FORMS["chinchilla"]} == dict.fromkeys(
        ["rho", "gamma", "sigma", "gamma2", "mu"], 0.0)
    assert fit["params"]["alpha"] == pytest.approx(0.35, rel=0.02)
    with pytest.raises(LawError, match="need at least 11 runs"):
        fit_params(X[:5], np.ones(5), "moe-full")
    with pytest.raises(LawError, match="unknown law form"):
        fit_params(X, np.ones(len(X)), "kaplan")
    with pytest.raises(LawError, match=r"field 'expansion' must be > 0"):
        features([{**recs[0], "expansion": 0.0}])
    (tmp_path / "law.json").write_text(json.dumps({"params": {"e": 1}}))
    with pytest.raises(LawError, match="lacks numeric"):
        load_law(tmp_path / "law.json")


# ---------------------------------------------------------------------------- design
def test_design_respects_budgets_and_ranks():
    res = design(LAW, memory_mb=6.0, gflops_per_token=0.012, space=SMALL_SPACE)
    assert res["feasible"] > 10
    for row in res["all"]:
        cfg = MobileMoEConfig.from_dict(row["config"])
        b = budget(cfg)  # recomputed from the written config, as `mobilemoe.config list` counts
        assert b["int4_mb"] <= 6.0 and b["decode_gflops"] <= 0.012
    losses = [r["predicted_loss"] for r in res["all"]]
    assert losses == sorted(losses) and res["best"]["predicted_loss"] == losses[0]
    assert res["neighbours"] == res["all"][1:10]
    # this law puts the optimum granularity at exp(1.8 / 0.9) ~ 7.4: a fine-grained MoE wins
    assert res["best"]["config"]["num_experts"] > 0 and res["best"]["granularity"] in (4, 8)
    assert all(c is None or c["vs_best"] >= 0 for c in res["classes"].values())
    assert res["classes"]["dense"]["vs_best"] > 0


def test_design_paper_space_within_budgets():
    res = design(LAW, memory_mb=1024, gflops_per_token=0.6)
    b = res["best"]
    assert b["int4_mb"] <= 1024 and b["decode_gflops"] <= 0.6 and res["space"] == "paper"
    assert b["config"]["vocab_size"] == PRESETS["mobilemoe-s"].vocab_size
    assert all(r["int4_mb"] <= 1024 and r["decode_gflops"] <= 0.6 for r in res["all"])


def test_design_impossible_or_bad_budget():
    with pytest.raises(DesignError, match=r"no architecture in the 'paper' space fits 10 MB .* smallest needs "
                                          r"[\d.]+ MB .* raise a budget"):
        design(LAW, memory_mb=10, gflops_per_token=0.6)
    with pytest.raises(DesignError, match="--memory-mb must be a number > 0"):
        design(LAW, memory_mb=-1, gflops_per_token=0.6)
    with pytest.raises(DesignError, match="--space must be one of paper, tiny"):
        design(LAW, memory_mb=100, gflops_per_token=0.6, space="huge")


def test_designed_config_loads_in_training_and_compiler(tmp_path):
    res = design(LAW, memory_mb=3.0, gflops_per_token=0.01, space=SMALL_SPACE)
    path = write_design(res, tmp_path / "d", "law.json")
    cfg = load_config(path)
    assert cfg.to_dict() == res["best"]["config"] and budget(cfg)["int4_mb"] <= 3.0
    assert MobileMoEConfig.from_name(str(path)) == cfg  # what compiler.build --preset calls
    from train.loop import StageConfig, build_model
    model = build_model(StageConfig(model=str(path)))
    assert model.config == cfg
    assert sum(p.numel() for p in model.parameters()) == cfg.total_params()
    pytest.importorskip("tvm")
    from mobilemoe.checkpoint import shape_only_model
    assert shape_only_model(str(path)).config == cfg
    doc = json.loads((tmp_path / "d" / "design.json").read_text())
    assert doc["best"]["shape"] == res["best"]["shape"] and "all" not in doc


def test_cli_design(tmp_path, capsys):
    (tmp_path / "law.json").write_text(json.dumps({"params": LAW}))
    rc = main(["design", "--memory-mb", "8", "--gflops-per-token", "0.02", "--space", "tiny", "--law",
               str(tmp_path / "law.json"), "--out", str(tmp_path / "out"), "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "best and its neighbours" in out and "best of each class" in out
    assert load_config(tmp_path / "out" / "config.json").name == "design-8mb-0.02gf"
    rc = main(["design", "--memory-mb", "0.01", "--gflops-per-token", "0.02", "--space", "tiny", "--law",
               str(tmp_path / "law.json"), "--out", str(tmp_path / "out2")])
    assert rc == 2 and "no architecture" in capsys.readouterr().err


def test_cli_design_says_what_its_law_identifies(tmp_path, capsys):
    ci = {"E": [1, 2], "rho": [0.1, 0.5], "gamma": [-1.0, 2.0], "sigma": [-0.9, -0.1]}
    doc = {"form": "moe", "params": LAW, "runs": 40, "log": "sweep.jsonl", "fit_error": {"held_out": {"rmse": 0.2,
           "mape_pct": 4.0}}, "bootstrap_90": ci}
    (tmp_path / "law.json").write_text(json.dumps(doc))
    info = law_info(tmp_path / "law.json")
    assert info["moe_terms"] == ["rho", "gamma", "sigma"] and info["not_identified"] == ["gamma"]
    assert info["identified"] == ["rho", "sigma"] and info["loo_rmse"] == 0.2
    assert main(["design", "--memory-mb", "8", "--gflops-per-token", "0.02", "--space", "tiny", "--law",
                 str(tmp_path / "law.json"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "form 'moe', 40 runs of sweep.jsonl; leave-one-out RMSE 0.2000 nats" in out
    assert "the ranking by G (gamma) is not supported" in out
    assert json.loads((tmp_path / "out" / "design.json").read_text())["law_info"]["not_identified"] == ["gamma"]


def test_design_default_law_is_fitted_on_the_new_corpus_with_identified_terms():
    info = law_info(DEFAULT_LAW)  # issue 17: the ~50M-token corpus' sweep, in a form the fit pins down
    assert "corpus50m" in info["log"] and info["runs"] >= 50 and 0 < info["loo_rmse"] < 0.3
    assert info["not_identified"] == []
    doc = json.loads(DEFAULT_LAW.read_text())
    assert all(doc["bootstrap_90"][k][0] > 0 for k in ("alpha", "beta"))


# ---------------------------------------------------------------------------- sweep
def test_default_grid_is_consistent():
    grid = default_grid()
    assert len(grid) == len({r["id"] for r in grid}) >= 16
    fams = {f for r in grid for f in r["families"]}
    assert {"size-dense", "size-moe", "sparsity", "granularity", "shared", "tokens", "seed"} <= fams
    for r in grid:
        cfg = MobileMoEConfig.from_dict(r["model"])
        assert r["tokens"] % (r["train"]["seq_len"] * r["train"]["batch_size"]) == 0
        assert cfg.vocab_size == 8192 and r["id"].startswith(f"h{cfg.hidden_size}-l{cfg.num_layers}-")


def test_corpus50m_shapes_grid_extends_corpus50m_long_with_levels_and_seeds():
    long, shapes = GRIDS["corpus50m-long"](), GRIDS["corpus50m-shapes"]()
    spec = ("id", "model", "tokens", "seed", "train")
    assert [{k: r[k] for k in spec} for r in shapes[:len(long)]] == [{k: r[k] for k in spec} for r in long]  # logged
    new = shapes[len(long):]
    assert all(r["tokens"] == 768 * STEP_TOKENS for r in new)
    at = [{**_law_vars_of(r), "families": r["families"], "seed": r["seed"]} for r in shapes if r["tokens"] == 768 * STEP_TOKENS and r["model"]["hidden_size"] == 256
          and r["model"]["num_experts"] > 0]
    for fam, key, levels in (("sparsity", "expansion", 5), ("granularity", "granularity", 5), ("shared", "shared_frac", 4)):
        got = {}
        for r in at:
            if fam in r["families"]:
                got.setdefault(round(r[key], 3), set()).add(r["seed"])
        assert len(got) == levels and all(seeds == {0, 1, 2} for seeds in got.values()), (fam, got)


def test_corpus50m_grid_has_three_token_counts_per_size_under_one_pass():
    grid = GRIDS["corpus50m"]()
    by_shape: dict = {}
    for r in grid:
        if {"size-dense", "size-moe"} & set(r["families"]):
            by_shape.setdefault(r["id"].rsplit("-t", 1)[0], set()).add(r["tokens"])
    assert len(by_shape) == 6 and all(len(t) >= 3 for t in by_shape.values())
    shapes = {(r["expansion"], r["granularity"], r["shared_frac"]) for r in map(_law_vars_of, grid)}
    assert len(shapes) >= 6  # the MoE terms (R, G, s) each vary, or the law cannot pin them
    assert max(r["tokens"] for r in grid) < 50.5e6  # the corpus' train split with its tokenizer: one pass at most
    with torch.device("meta"):
        totals = [sum(p.numel() for p in MobileMoE(MobileMoEConfig.from_dict(r["model"])).parameters()) for r in grid]
    assert max(totals) >= 60e6


def test_corpus50m_long_grid_extends_corpus50m_to_identify_size_and_shape_terms():
    old, grid = GRIDS["corpus50m"](), GRIDS["corpus50m-long"]()
    by_id = {r["id"]: r for r in grid}
    assert all(by_id[r["id"]] == r for r in old)  # the same specs: corpus50m's logged runs stay in the fit
    tokens: dict = {}
    for r in grid:
        if {"size-dense", "size-moe"} & set(r["families"]):
            tokens.setdefault(r["id"].rsplit("-t", 1)[0], set()).add(r["tokens"])
    assert len(tokens) == 10  # dense and MoE at 5 widths, 128 to 512
    # every size has >= 3 token counts of >= 3.1M, up to 12.6M or more (all but the 67M MoE: 25M or more)
    assert all(len({t for t in ts if t >= 3e6}) >= 3 and max(ts) >= 12e6 for ts in tokens.values())
    assert sorted(max(ts) for ts in tokens.values())[1] >= 25e6
    assert max(r["tokens"] for r in grid) < 50.5e6  # about one pass of the whole training split
    shapes = {(v["expansion"], v["granularity"], v["shared_frac"]) for v in map(_law_vars_of, grid)
              if v["tokens"] > 12e6}
    assert len(shapes) >= 7  # the reference MoE, dense, and the six shapes on 12.6M tokens
    for r in grid:
        assert r["tokens"] == run_spec(MobileMoEConfig.from_dict(r["model"]), r["tokens"] // STEP_TOKENS, "x")["tokens"]
        assert r["train"] == run_spec(MobileMoEConfig.from_dict(r["model"]), r["tokens"] // STEP_TOKENS, "x")["train"]
    with torch.device("meta"):
        big = MobileMoE(MobileMoEConfig.from_dict(by_id["h512-l8-e16k2i256-s512-t12.58M"]["model"]))
    assert sum(p.numel() for p in big.parameters()) >= 60e6


def _law_vars_of(run: dict) -> dict:
    return law_vars(MobileMoEConfig.from_dict(run["model"]), run["tokens"])


def _tiny_grid():
    train = {"seq_len": 32, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_tokens": 128,
             "schedule": "cosine", "moe_impl": "dense"}
    mk = dict(vocab=8192, head_dim=16, max_kv_heads=2, max_seq_len=64)
    return [run_spec(make_config("d", 32, 1, ffn_hidden=64, **mk), 2, "t", train=train),
            run_spec(make_config("m", 32, 1, experts=4, top_k=2, expert_hidden=16, shared_hidden=32, **mk), 2, "t",
                     train=train)]


def test_sweep_logs_resumes_and_refuses_changed_specs(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [{"text": f"Module {i}: the function returns the value of item {i} and then reads a file. " * 6}
            for i in range(12)]
    (corpus / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:10]))
    (corpus / "heldout.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[10:]))
    log = tmp_path / "sweep.jsonl"
    opts = SweepOptions(log=log, work_dir=tmp_path / "work", corpus=corpus, workers=0, device="cpu")
    grid = _tiny_grid()
    res = run_sweep(grid, opts)
    assert sorted(res["done"]) == sorted(r["id"] for r in grid) and not res["failed"]
    recs = read_log(log)
    assert [r["id"] for r in recs] == res["done"]
    assert all(r["tokens"] == 128 and r["eval_loss"] > 0 and r["model"] in [g["model"] for g in grid] for r in recs)
    assert all(r["epoch_tokens"] == recs[0]["epoch_tokens"] > 0 and r["epochs"] > 0 for r in recs)
    assert not (tmp_path / "work" / grid[0]["id"] / "checkpoint").exists()  # cleaned after logging
    # rerun: nothing trains; a line cut short by a kill is ignored
    with open(log, "a") as f:
        f.write('{"id": "half')
    assert run_sweep(grid, opts)["skipped"] == [r["id"] for r in grid]
    # a finished run missing from the log (killed between summary.json and the log line) is logged, not rerun
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n")
    res = run_sweep(grid, opts)
    assert res["done"] == [grid[1]["id"]] and len(read_log(log)) == 2
    # a grid whose spec changed under a logged id is refused, naming the run and the field
    changed = [{**grid[0], "train": {**grid[0]["train"], "lr": 1e-3}}]
    with pytest.raises(SweepError, match=rf"run '{re.escape(grid[0]['id'])}' was logged with a different train"):
        run_sweep(changed, opts)


def test_log_and_grid_errors(tmp_path):
    log = tmp_path / "l.jsonl"
    append_log(log, {"id": "a", "eval_loss": 1.0})
    log.write_text(log.read_text() + "{bad\n" + json.dumps({"id": "b", "eval_loss": 2.0}) + "\n")
    with pytest.raises(SweepError, match=r"l.jsonl:2: not valid JSON"):
        read_log(log)
    (tmp_path / "g.json").write_text(json.dumps([{"id": "x", "model": {"hidden_size": "big"}, "tokens": 10}]))
    with pytest.raises(ConfigError, match="field 'hidden_size' must be int"):
        load_grid(str(tmp_path / "g.json"))
    with pytest.raises(SweepError, match="grid file not found"):
        load_grid(str(tmp_path / "nope.json"))
    assert load_grid("smoke")[0]["families"] == ["smoke"]
