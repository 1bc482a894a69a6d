"""train.loop: config overrides, schedules, kill -9 + --resume on the same curve, refusals, DDP (gloo)."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.logs import read_metrics
from train.loop import Schedule, StageConfig, StageError, config_from_args, fit_steps, run_stage
from train.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    # same thread count as this process: CPU results then match bit for bit
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}


def _train_losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def _snapshot(d: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def test_config_from_json_and_flags(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.5, "max_tokens": "2e3", "train_data": ["a", "b"]}))
    cfg = config_from_args(PretrainConfig(), ["--config", str(tmp_path / "c.json"), "--lr", "0.25",
                                              "--no-progress", "--heldout-data", "x.jsonl,y.jsonl"])
    assert (cfg.lr, cfg.max_tokens, cfg.progress) == (0.25, 2000, False)
    assert cfg.train_data == ["a", "b"] and cfg.heldout_data == ["x.jsonl", "y.jsonl"]
    assert cfg.schedule == "constant" and cfg.stage == "pretrain"  # the stage's own defaults
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(SystemExit):
        config_from_args(PretrainConfig(), ["--config", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit):
        config_from_args(PretrainConfig(), ["--seq-len", "1.5"])


def test_schedules():
    cos = Schedule("cosine", warmup=10, total=110, min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1)
    lin = Schedule("linear", warmup=0, total=100, min_ratio=0.0)
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.5) and lin(100) == 0.0
    assert Schedule("constant", 5, 100, 0.0)(99) == 1.0


def test_fit_steps_to_a_time_budget():
    assert fit_steps(1000, 25, per_step_s=0.5, elapsed_s=15.0, budget_s=65.0) == 125
    assert fit_steps(100, 25, per_step_s=0.01, elapsed_s=1.0, budget_s=60.0) == 100  # the budget is not a floor
    assert fit_steps(1000, 25, per_step_s=1.0, elapsed_s=90.0, budget_s=60.0) == 25  # spent: stop here


def test_max_seconds_shortens_a_stage_and_ends_its_schedule(stage_kwargs, tmp_path):
    # 5000 steps would take minutes; a three-second budget cuts the stage to what fits, and the cosine
    # schedule is re-fitted so the last step still reaches min_lr_ratio (one second was spent before the
    # 25 calibration steps ended when the machine was loaded: nothing left to decay over, lr still 3e-3)
    s = run_stage(StageConfig(**stage_kwargs(tmp_path / "run", max_steps=5000, max_seconds=3.0, warmup_steps=2,
                                             schedule="cosine", min_lr_ratio=0.1, eval_every=10_000,
                                             ckpt_every=10_000)))
    assert 25 <= s["steps"] < 5000
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert len(lrs) == s["steps"] and lrs[-1] < 0.15 * 3e-3


def test_budget_file_sets_the_length_at_the_end_of_warmup(stage_kwargs, tmp_path):
    # side-by-side runs: the length comes from a file written while the stage runs (read at the end of
    # warmup, so the schedule is the one a run given that length from the start would follow)
    budget = tmp_path / "budget"
    kw = dict(max_steps=50, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1, eval_every=10_000,
              ckpt_every=10_000, log_every=1)
    cfg = StageConfig(**stage_kwargs(tmp_path / "x", **kw))
    per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    budget.write_text(f"{10 * per_step - 5}\n")  # rounded up to whole steps
    s = run_stage(StageConfig(**stage_kwargs(tmp_path / "run10", budget_file=str(budget), **kw)))
    ref = run_stage(StageConfig(**stage_kwargs(tmp_path / "ref", **{**kw, "max_steps": 10})))
    assert s["steps"] == ref["steps"] == 10
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run10" / "metrics.jsonl") if "lr" in r]
    assert lrs == [r["lr"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "lr" in r]
    budget.write_text(f"{10_000 * per_step}")  # never past the stage's own length
    assert run_stage(StageConfig(**stage_kwargs(tmp_path / "long", budget_file=str(budget),
                                                **{**kw, "max_steps": 12})))["steps"] == 12
    with pytest.raises(StageError, match="not written within"):
        run_stage(StageConfig(**stage_kwargs(tmp_path / "none", budget_file=str(tmp_path / "missing"),
                                             budget_wait_s=0.2, **kw)))


def test_seq_len_beyond_the_model_is_refused(stage_kwargs, tmp_path):
    with pytest.raises(StageError, match=r"seq_len 512 exceeds the model's max_seq_len 256 \(test-moe\)"):
        run_stage(StageConfig(**stage_kwargs(tmp_path / "run", seq_len=512)))
    assert not (tmp_path / "run").exists()


def test_kill_and_resume_continues_the_same_curve(stage_kwargs, tmp_path):
    kw = stage_kwargs(tmp_path / "ref", max_steps=40, ckpt_every=4, eval_every=20, stage="pretrain")
    ref = run_stage(StageConfig(**kw))

    out = tmp_path / "killed"
    cfg_file = tmp_path / "killed.json"
    cfg_file.write_text(json.dumps(asdict(StageConfig(**{**kw, "out_dir": str(out)}))))  # every field
    proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", "--config", str(cfg_file)], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, f"run ended before the kill: {err[-2000:]}"
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < 40 and not (out / "final").exists()

    resumed = run_stage(StageConfig(**{**kw, "out_dir": str(out), "resume": True}))
    assert _train_losses(out) == _train_losses(tmp_path / "ref")  # one record a step, same values
    assert resumed["eval_loss"] == ref["eval_loss"]
    a, b = load_file(out / "final" / "model.safetensors"), load_file(tmp_path / "ref" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_config_is_refused_and_changes_nothing(stage_kwargs, tmp_path):
    kw = stage_kwargs(tmp_path / "run", max_steps=4)
    run_stage(StageConfig(**kw))
    before = _snapshot(tmp_path / "run")
    with pytest.raises(StageError, match=r"different config \(lr: checkpoint 0\.003 vs now 0\.001"):
        run_stage(StageConfig(**{**kw, "lr": 1e-3, "resume": True}))
    with pytest.raises(StageError, match="different config .*model"):
        run_stage(StageConfig(**{**kw, "model": "test-dense", "resume": True}))
    with pytest.raises(StageError, match="already holds a run .*pass --resume"):
        run_stage(StageConfig(**kw))
    assert _snapshot(tmp_path / "run") == before
    # settings that do not change the trajectory may differ
    done = run_stage(StageConfig(**{**kw, "resume": True, "log_every": 3, "progress": False}))
    assert done["steps"] == 4


def test_cli_errors_are_clean(stage_kwargs, tmp_path):
    kw = stage_kwargs(tmp_path / "run", train_data=[str(tmp_path / "missing.jsonl")])
    (tmp_path / "c.json").write_text(json.dumps(kw))
    r = subprocess.run([sys.executable, "-m", "train.pretrain", "--config", str(tmp_path / "c.json")], cwd=ROOT,
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert "error: " in r.stderr and "missing.jsonl: data file or directory not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_two_processes_gloo_match_one(stage_kwargs, tmp_path):
    kw = stage_kwargs(tmp_path / "one", max_steps=6, batch_size=4, eval_every=6, ckpt_every=6)
    one = run_stage(StageConfig(**kw))
    two_kw = {**kw, "out_dir": str(tmp_path / "two"), "batch_size": 2}
    (tmp_path / "two.json").write_text(json.dumps(asdict(StageConfig(**two_kw))))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "train.pretrain", "--config", str(tmp_path / "two.json")], cwd=ROOT,
                       env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["tokens"] == one["tokens"] and json.loads((tmp_path / "two" / "checkpoint" / "state.json")
                                                         .read_text())["world_size"] == 2
    # same global batches: the curves agree up to float reduction order and the per-process
    # load-balancing loss (a product of per-batch means)
    for (s1, l1), (s2, l2) in zip(_train_losses(tmp_path / "one"), _train_losses(tmp_path / "two"), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=2e-3)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=2e-3)
