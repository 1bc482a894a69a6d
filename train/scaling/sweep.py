"""The sweep: a grid of short pre-training runs, each logged as one JSON line with its held-out loss.

    python -m train.scaling sweep [--grid default|smoke|GRID.json] [--log train/runs/scaling/sweep.jsonl]
        [--work-dir runs/scaling] [--workers 8] [--deadline SECONDS] [--corpus data/corpus]

A run is `train.pretrain` (train/loop.py: one loop, held-out eval, atomic checkpoints) of one config
on the project corpus for a fixed token budget with a cosine schedule of that length (Hoffmann et
al. 2022 match the schedule to the tokens), then the held-out loss of the final model. `--workers N`
runs N at once as subprocesses (round-robin over the visible GPUs); `--workers 0` runs them one after
another in this process.

Resuming: every finished run appends one line to the log (written by this process alone, one
flushed + fsynced write per line; a line cut short by a kill is ignored). On restart, runs whose id is
in the log are skipped (a logged run whose spec differs from the grid's is an error, naming the
run), a run whose summary.json exists is logged without training, and a run killed halfway resumes
from its last checkpoint (`--resume`). `--deadline` stops launching runs that would not finish in
time, and at the deadline interrupts the rest; rerun the same command to continue.

The grids (and what each family varies) are in grid.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mobilemoe.config import MobileMoEConfig
from mobilemoe.tokenizer import load_tokenizer
from train.loop import Dist, apply_overrides, run_stage, stage_rows
from train.pretrain import PretrainConfig
from train.scaling.arch import budget, law_vars
from train.scaling.grid import SPEC_KEYS, SweepError

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- the log
def read_log(path) -> list[dict]:
    """Records of a sweep log; a last line cut short by a kill is skipped, any other bad line is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                print(f"warning: {path}:{n}: ignoring a cut-off last line", file=sys.stderr)
                continue
            raise SweepError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "id" not in rec or "eval_loss" not in rec:
            raise SweepError(f"{path}:{n}: expected a run record with 'id' and 'eval_loss'")
        records.append(rec)
    return records


def append_log(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:  # a line cut short by an earlier kill gets its own line ended first
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def record_of(run: dict, summary: dict) -> dict:
    cfg = MobileMoEConfig.from_dict(run["model"], source=f"run '{run['id']}'")
    b = budget(cfg)
    return {"id": run["id"], "families": run["families"], "eval_loss": summary["eval_loss"],
            "train_loss": summary["train_loss"], **law_vars(cfg, summary["tokens"]),
            "params_total": cfg.total_params(), "int4_mb": round(b["int4_mb"], 3),
            "decode_gflops": round(b["decode_gflops"], 6), "steps": summary["steps"], "epochs": summary["epochs"],
            "epoch_tokens": summary.get("target_tokens_per_epoch"),  # the training split trained on
            "wall_s": summary["wall_s"], "tok_s": summary["tok_s"],
            **{k: run[k] for k in SPEC_KEYS}}


# ---------------------------------------------------------------------------- running
@dataclass
class SweepOptions:
    log: Path = Path("train/runs/scaling/sweep.jsonl")
    work_dir: Path = Path("runs/scaling")
    corpus: Path = Path("data/corpus")
    tokenizer: str = ""  # empty: the bundled one
    workers: int = 1  # 0: one after another in this process
    device: str = "auto"
    deadline: float = 0.0  # seconds from the start; 0: none
    keep_checkpoints: bool = False
    threads: int = 0  # OMP threads per worker (0: cores / workers)
    order: str = "grid"  # "grid" | "longest" (longest first: the shortest finish time on a deadline)
    env: dict = field(default_factory=dict)


def stage_fields(run: dict, run_dir: Path, opts: SweepOptions) -> dict:
    """The train.pretrain fields (StageConfig) of one run."""
    return {"stage": "pretrain", "model": str(run_dir / "model.json"), "out_dir": str(run_dir),
            "tokenizer": opts.tokenizer, "train_data": [str(opts.corpus / "train.jsonl")],
            "heldout_data": [str(opts.corpus / "heldout.jsonl")], "cache_dir": str(opts.work_dir / "cache"),
            "max_tokens": run["tokens"], "max_steps": 0, "epochs": 0.0, "seed": run["seed"], "device": opts.device,
            "eval_every": 10**9, "eval_tokens": 0, "log_every": 10, "ckpt_every": 100, "save_dtype": "bfloat16",
            "resume": True, "progress": False, **run["train"]}


def _stage_config(fields_: dict, where: str):
    cfg = apply_overrides(PretrainConfig(), fields_, where)
    cfg.validate()
    return cfg


def prepare_data(stage_cfgs) -> None:
    """Tokenize the corpus once per distinct packing (train/loop.py's own cache keys) before workers start."""
    seen = set()
    for cfg in stage_cfgs:
        key = (cfg.seq_len, cfg.packing, tuple(cfg.train_data), tuple(cfg.heldout_data), cfg.tokenizer)
        if key in seen:
            continue
        seen.add(key)
        tok = load_tokenizer(cfg.tokenizer or None)
        stage_rows(cfg, tok, Dist(), cfg.train_data, "train", cfg.packing)
        stage_rows(cfg, tok, Dist(), cfg.heldout_data, "eval", cfg.packing)


def est_cost(run: dict) -> float:
    """Relative training cost: tokens x (every parameter, as the dense MoE path computes every expert, + LM head)."""
    cfg = MobileMoEConfig.from_dict(run["model"], source=f"run '{run['id']}'")
    return run["tokens"] * (cfg.total_params() + cfg.vocab_size * cfg.hidden_size)


def _check_logged(run: dict, rec: dict, log: Path) -> None:
    diff = [k for k in SPEC_KEYS if rec.get(k) != run[k]]
    if diff:
        raise SweepError(f"{log}: run '{run['id']}' was logged with a different {', '.join(diff)} than the grid "
                         f"gives; use another --log, or delete that line to run it again")


def _prepare_run_dir(run: dict, run_dir: Path) -> None:
    spec = {k: run[k] for k in ("id", *SPEC_KEYS)}
    spec_file = run_dir / "run.json"
    if spec_file.is_file():
        old = json.loads(spec_file.read_text())
        if old != spec:
            diff = [k for k in spec if old.get(k) != spec[k]]
            raise SweepError(f"{run_dir}: holds run '{run['id']}' with a different {', '.join(diff)}; "
                             f"remove the folder or use another --work-dir")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "model.json").write_text(json.dumps(run["model"], indent=1) + "\n")
    tmp = spec_file.with_name("run.json.tmp")
    tmp.write_text(json.dumps(spec, indent=1) + "\n")
    os.replace(tmp, spec_file)


def _cleanup(run_dir: Path) -> None:
    for name in ("checkpoint", "final"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _gpu_count() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA: CPU runs
        return 0


def run_sweep(grid: list[dict], opts: SweepOptions) -> dict:
    """Run every grid run not yet in opts.log; returns {"done", "skipped", "failed", "left"} run ids."""
    log = Path(opts.log)
    logged = {r["id"]: r for r in read_log(log)}
    todo, result = [], {"done": [], "skipped": [], "failed": [], "left": []}
    for run in grid:
        if run["id"] in logged:
            _check_logged(run, logged[run["id"]], log)
            result["skipped"].append(run["id"])
        else:
            todo.append(run)
    if not todo:
        return result
    work = Path(opts.work_dir)
    stage = {}
    for run in todo:
        run_dir = work / run["id"]
        _prepare_run_dir(run, run_dir)
        fields_ = stage_fields(run, run_dir, opts)
        stage[run["id"]] = (fields_, _stage_config(fields_, f"run '{run['id']}'"))
    prepare_data([c for _, c in stage.values()])

    start = time.perf_counter()
    rate: list[float] = []  # seconds per token of finished runs (this session)
    bar = tqdm(total=len(todo), desc="sweep", unit="run", dynamic_ncols=True)

    def finish(run: dict, ok: bool, wall: float | None) -> None:
        run_dir = work / run["id"]
        summary_file = run_dir / "summary.json"
        if ok and summary_file.is_file():
            rec = record_of(run, json.loads(summary_file.read_text()))
            append_log(log, rec)
            result["done"].append(run["id"])
            if wall is not None:
                rate.append(wall / run["tokens"])
            if not opts.keep_checkpoints:
                _cleanup(run_dir)
            bar.set_postfix_str(f"{run['id']}: {rec['eval_loss']:.4f}")
        else:
            result["failed"].append(run["id"])
            tail = (run_dir / "log.txt").read_text(errors="replace")[-3000:] if (run_dir / "log.txt").is_file() else ""
            print(f"\nrun '{run['id']}' failed; the end of {run_dir / 'log.txt'}:\n{tail}", file=sys.stderr)
        bar.update(1)

    def fits(run: dict) -> bool:
        if not opts.deadline:
            return True
        elapsed = time.perf_counter() - start
        est = run["tokens"] * sorted(rate)[len(rate) // 2] if rate else 0.0
        return elapsed + est < opts.deadline

    if opts.order not in ("grid", "longest"):
        raise SweepError(f"order must be 'grid' or 'longest', got {opts.order!r}")
    pending = sorted(todo, key=lambda r: -est_cost(r)) if opts.order == "longest" else list(todo)
    for run in list(pending):  # finished before an interruption, not yet logged
        if (work / run["id"] / "summary.json").is_file():
            pending.remove(run)
            finish(run, True, None)
    if opts.workers <= 0:
        _run_in_process(pending, stage, opts, finish, fits, result)
    else:
        _run_subprocesses(pending, stage, opts, finish, fits, result, start)
    bar.close()
    return result


def _run_in_process(pending, stage, opts, finish, fits, result) -> None:
    for run in pending:
        if not fits(run):
            result["left"].append(run["id"])
            continue
        t0 = time.perf_counter()
        try:
            run_stage(stage[run["id"]][1])
            ok = True
        except Exception as e:  # noqa: BLE001 - one bad run does not stop the sweep
            print(f"\nrun '{run['id']}': {type(e).__name__}: {e}", file=sys.stderr)
            ok = False
        finish(run, ok, time.perf_counter() - t0)


def _run_subprocesses(pending, stage, opts, finish, fits, result, start) -> None:
    gpus = _gpu_count() if opts.device in ("auto", "cuda") else 0
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.workers)
    running: dict[int, tuple] = {}  # pid -> (Popen, run, t0, log file)
    launched = 0
    try:
        while pending or running:
            while pending and len(running) < opts.workers:
                run = pending.pop(0)
                if not fits(run):
                    result["left"].append(run["id"])
                    continue
                run_dir = Path(stage[run["id"]][1].out_dir)
                (run_dir / "stage.json").write_text(json.dumps(stage[run["id"]][0], indent=1) + "\n")
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                       **opts.env}
                if gpus > 1:
                    env["CUDA_VISIBLE_DEVICES"] = str(launched % gpus)
                logf = open(run_dir / "log.txt", "a")
                p = subprocess.Popen([sys.executable, "-m", "train.pretrain", "--config", str(run_dir / "stage.json")],
                                     stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                running[p.pid] = (p, run, time.perf_counter(), logf)
                launched += 1
            if opts.deadline and time.perf_counter() - start > opts.deadline:
                raise TimeoutError
            time.sleep(0.5)
            for pid, (p, run, t0, logf) in list(running.items()):
                if p.poll() is not None:
                    logf.close()
                    del running[pid]
                    finish(run, p.returncode == 0, time.perf_counter() - t0)
    except (KeyboardInterrupt, TimeoutError) as e:
        for p, run, _, logf in running.values():
            p.send_signal(signal.SIGINT)  # the run keeps its last checkpoint: the next sweep resumes it
        for p, run, _, logf in running.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
            logf.close()
            result["left"].append(run["id"])
        result["left"] += [r["id"] for r in pending]
        if isinstance(e, KeyboardInterrupt):
            raise
        print(f"\ndeadline of {opts.deadline:.0f} s reached: {len(result['left'])} run(s) left; rerun the same "
              f"command to resume them", file=sys.stderr)


def sweep_table(records: list[dict], fitted: set | None = None) -> str:
    """A markdown table of logged runs (README); `fitted`: ids of the runs a fit used."""
    head = ("| run | families | N active | R (total/active) | G | s | tokens | INT4 MB | held-out loss |"
            + (" in fit |" if fitted is not None else "") + "\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            + (" :---: |" if fitted is not None else ""))
    rows = [f"| {r['id']} | {', '.join(r['families'])} | {r['n_active'] / 1e6:.2f}M | {r['expansion']:.2f} | "
            f"{r['granularity']:.3g} | {r['shared_frac']:.2f} | {r['tokens'] / 1e6:.2f}M | {r['int4_mb']:.1f} | "
            f"{r['eval_loss']:.4f} |" + ((" yes |" if r["id"] in fitted else " no |") if fitted is not None else "")
            for r in records]
    return "\n".join([head, *rows])
