"""The one training loop that every stage runs (pretrain, midtrain, sft, qat), on one device or many.

A stage = a `StageConfig` (dataclass; JSON file and CLI flags override its fields) + optional
`StageHooks` (QAT's fake-quant prepare/convert). `run_stage(cfg, hooks)` does:

    model      from `init_from` (the previous stage's final/ checkpoint, or any checkpoint of a
               registered HF architecture: mobilemoe/arch) or the `model` preset
    data       train.data rows (tokenized once, cached) in a seeded per-epoch order
    loss       cross-entropy on the target tokens + router_aux_loss_coef * load balancing
               + router_z_loss_coef * router z-loss (coefficients from the model config; MoE only)
    optimizer  AdamW (no decay on 1-D weights), LR schedule warmup + cosine | linear | constant
    logs       tqdm (loss, tokens/s), out_dir/metrics.jsonl, out_dir/loss.png
    checkpoint out_dir/checkpoint/ every ckpt_every steps and at the end, written atomically:
               model.safetensors (module state), optimizer.pt + trainer.pt (scheduler, RNG; torch.save,
               read back with weights_only=True), state.json (step, data position, configs)
    output     out_dir/final/ (HF-compatible checkpoint + tokenizer), out_dir/summary.json; an
               imported model's final/ keeps its own config.json, tokenizer and chat template
               (documents and chats are framed by them: mobilemoe/text_format.py)

Multi-GPU: run the same module under torchrun; each process takes its slice of every global batch
(DDP, NCCL on CUDA, gloo on CPU). `--resume` continues a killed run from its last checkpoint on the
same loss curve; a checkpoint written under a different config is refused before anything is written.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from tqdm import tqdm

from mobilemoe.checkpoint import atomic_dir, imported_config, imported_files, load_checkpoint, save_checkpoint
from mobilemoe.config import MobileMoEConfig, load_config
from mobilemoe.model import MobileMoE
from mobilemoe.text_format import OURS, TextFormat, load_text_format
from train.data import IGNORE_INDEX, DataSpec, RowOrder, build_rows, split_for_eval
from train.logs import MetricsLog, plot_losses, read_metrics

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fields that may change between a run and its resumption: they do not change the trajectory.
PLOT_EVERY_S = 60  # loss.png is redrawn at a checkpoint at most this often (and at the end)
RESUME_FREE = {"resume", "progress", "ckpt_every", "log_every", "eval_every", "eval_tokens", "out_dir",
               "device", "cache_dir", "budget_wait_s"}


class StageError(ValueError):
    """A stage cannot start: bad config, incompatible checkpoint, occupied output dir (names which)."""


@dataclass
class StageConfig:
    stage: str = "pretrain"
    model: str = "mobilemoe-tiny"  # preset name or a config.json path (used when init_from is empty)
    init_from: str = ""  # checkpoint dir to start from (the previous stage's out_dir/final, or an HF one); --init
    out_dir: str = "runs/pretrain"
    tokenizer: str = ""  # tokenizer.json; empty: init_from's, else the bundled one (an HF model needs its own)
    train_data: list[str] = field(default_factory=lambda: ["data/corpus/train.jsonl"])
    heldout_data: list[str] = field(default_factory=lambda: ["data/corpus/heldout.jsonl"])
    heldout_frac: float = 0.0  # > 0 with empty heldout_data: hash-split this share off train_data
    text_field: str = "text"
    data_filter: str = ""  # "" | "quality" (train.data.is_high_quality)
    packing: str = "stream"  # "stream" | "examples" (chat: loss on answers only)
    cache_dir: str = "data/cache/tokens"
    seq_len: int = 512
    batch_size: int = 16  # sequences per process per micro-batch
    grad_accum: int = 1
    max_steps: int = 0  # the first of max_steps / max_tokens / epochs that is > 0 sets the length
    max_tokens: int = 0
    epochs: float = 0.0
    max_seconds: float = 0.0  # > 0: also stop by this wall-clock budget (steps fixed after CALIBRATE_STEPS)
    # side-by-side runs that must see the same tokens (train/runs/issue17/gpu_pairs.sh): at the end of
    # warmup (before the schedule depends on the length) wait up to budget_wait_s for this file, a token
    # count written by a watcher that timed every run sharing the device, and end the stage there
    # (never past its own length: max_steps / max_tokens / epochs stay the upper bound)
    budget_file: str = ""
    budget_wait_s: float = 300.0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant (after a linear warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_tokens: int = 200_000  # held-out target tokens per evaluation (0: all)
    log_every: int = 10
    ckpt_every: int = 500
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # autocast dtype: auto = bfloat16 on CUDA, float32 on CPU
    moe_impl: str = "auto"
    save_dtype: str = "float32"  # dtype of final/model.safetensors
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        positive = ("seq_len", "batch_size", "grad_accum", "eval_every", "log_every", "ckpt_every")
        for k in positive:
            if getattr(self, k) <= 0:
                raise StageError(f"{self.stage}: '{k}' must be > 0, got {getattr(self, k)}")
        if self.max_steps <= 0 and self.max_tokens <= 0 and self.epochs <= 0:
            raise StageError(f"{self.stage}: set one of max_steps, max_tokens or epochs (> 0)")
        if self.schedule not in SCHEDULES:
            raise StageError(f"{self.stage}: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for k in ("dtype", "save_dtype"):
            allowed = (*DTYPES, "auto") if k == "dtype" else tuple(DTYPES)
            if getattr(self, k) not in allowed:
                raise StageError(f"{self.stage}: {k} must be one of {allowed}, got {getattr(self, k)!r}")
        if not self.train_data:
            raise StageError(f"{self.stage}: train_data is empty")
        if not self.heldout_data and self.heldout_frac <= 0:
            raise StageError(f"{self.stage}: give heldout_data or a heldout_frac > 0")


# ---------------------------------------------------------------------------- config from JSON / CLI
def _parse_value(f: dataclasses.Field, value, where: str):
    kind = str(f.type)
    try:
        if kind.startswith("list"):
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
            return [str(v) for v in items]
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "int":
            v = float(value) if isinstance(value, str) else value  # "2e6" is a fine token count
            if isinstance(v, bool) or v != int(v):
                raise ValueError(value)
            return int(v)
        return {"float": float, "str": str}[kind](value)
    except (ValueError, TypeError):
        raise StageError(f"{where}: field '{f.name}' expects {kind}, got {value!r}") from None


def apply_overrides(cfg, overrides: dict, where: str):
    known = {f.name: f for f in fields(cfg)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise StageError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(cfg, **{k: _parse_value(known[k], v, where) for k, v in overrides.items()})


def config_from_args(default, argv=None, prog: str = "", description: str = ""):
    """`default` (a StageConfig) overridden by --config FILE.json, then by --field value flags."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", type=Path, help="JSON object of field overrides")
    for f in fields(default):
        flags = ["--" + f.name.replace("_", "-")] + (["--init"] if f.name == "init_from" else [])
        if str(f.type) == "bool":
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(*flags, dest=f.name, default=None, metavar=str(f.type).upper(),
                           help=f"default: {getattr(default, f.name)!r}")
    a = vars(p.parse_args(argv))
    cfg = default
    try:
        if a.pop("config") is not None:
            path = Path(p.parse_args(argv).config)
            try:
                overrides = json.loads(path.read_text())
            except FileNotFoundError:
                raise StageError(f"{path}: config file not found") from None
            except json.JSONDecodeError as e:
                raise StageError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(overrides, dict):
                raise StageError(f"{path}: expected a JSON object of field overrides")
            cfg = apply_overrides(cfg, overrides, str(path))
        cfg = apply_overrides(cfg, {k: v for k, v in a.items() if v is not None}, "command line")
        cfg.validate()
    except StageError as e:
        p.error(str(e))
    return cfg


# ---------------------------------------------------------------------------- distributed context
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


def init_dist(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StageError("device 'cuda' requested but torch.cuda.is_available() is False")
        dev = torch.device("cuda", local if world > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


# ---------------------------------------------------------------------------- model, optimizer, schedule
def build_model(cfg: StageConfig) -> MobileMoE:
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = load_checkpoint(cfg.init_from, dtype=torch.float32).train()
        for p in model.parameters():  # gate / up load as views of HF's fused tensors: own storage each
            p.data = p.data.clone(memory_format=torch.contiguous_format)
        return model
    model_cfg = load_config(cfg.model) if cfg.model.endswith(".json") else MobileMoEConfig.from_name(cfg.model)
    return MobileMoE(model_cfg).train()


@dataclass
class Schedule:
    """LR multiplier at step s: linear warmup, then cosine / linear decay to min_ratio, or constant."""
    kind: str
    warmup: int
    total: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        frac = 0.5 * (1 + math.cos(math.pi * t)) if self.kind == "cosine" else 1 - t
        return self.min_ratio + (1 - self.min_ratio) * frac


def make_optimizer(model: torch.nn.Module, cfg: StageConfig, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


# ---------------------------------------------------------------------------- resumable checkpoints
CKPT = "checkpoint"


def _trajectory(cfg: StageConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}


def check_resume(cfg: StageConfig, model_cfg: MobileMoEConfig, world: int) -> dict | None:
    """The checkpoint state to resume from (None: start fresh). Raises before anything is written."""
    out = Path(cfg.out_dir)
    state_file = out / CKPT / "state.json"
    olds = sorted(out.glob(f".{CKPT}.old-*"))  # atomic_dir killed between its two renames
    if cfg.resume and olds and not (out / CKPT).exists():
        os.rename(olds[-1], out / CKPT)
    if not cfg.resume:
        taken = [n for n in (CKPT, "final", "metrics.jsonl") if (out / n).exists()]
        if taken:
            raise StageError(f"{out}: already holds a run ({', '.join(taken)}); pass --resume to continue "
                             f"it, or choose another out_dir")
        return None
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    theirs, ours = state["config"], _trajectory(cfg)
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        shown = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {ours.get(k)!r}" for k in diff[:6])
        raise StageError(f"{state_file}: written by a different config ({shown}); nothing was changed. "
                         f"Resume with the same settings, or start a new out_dir.")
    if state["model_config"] != model_cfg.to_dict():
        raise StageError(f"{state_file}: checkpoint of model {state['model_config']['name']!r} with a "
                         f"different model config than {model_cfg.name!r}; nothing was changed.")
    if state["world_size"] != world:
        raise StageError(f"{state_file}: written by {state['world_size']} process(es), resumed with {world}; "
                         f"run with the same number of processes")
    return state


def save_train_checkpoint(out: Path, model, opt, sched, state: dict) -> None:
    def write(tmp: Path):
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"scheduler": sched.state_dict(), "rng": rng}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    atomic_dir(out / CKPT, write)


def load_train_checkpoint(out: Path, model, opt, sched, device) -> None:
    d = out / CKPT
    missing, unexpected = load_model(model, str(d / "model.safetensors"), strict=True, device=str(device))
    opt.load_state_dict(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))
    trainer = torch.load(d / "trainer.pt", map_location="cpu", weights_only=True)
    sched.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"]["cpu"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])


# ---------------------------------------------------------------------------- evaluation
def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def heldout_loss(model: MobileMoE, rows, row_ids: np.ndarray, batch_size: int, d: Dist,
                 dtype: torch.dtype = torch.float32) -> float:
    """Mean cross-entropy over the target tokens of rows[row_ids] (split over processes)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=d.device)
    mine = row_ids[d.rank::d.world]
    for i in range(0, len(mine), batch_size):
        x, y = (t.to(d.device) for t in rows.batch(mine[i:i + batch_size]))
        with _autocast(d.device, dtype):
            logits = model(x)[0]
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="sum").double()
        total[1] += (y != IGNORE_INDEX).sum()
    d.sum(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


class StageHooks:
    """Stage-specific steps around the shared loop (QAT overrides them)."""

    def prepare(self, model: MobileMoE, cfg: StageConfig) -> MobileMoE:
        """After the model is built, before the optimizer and any checkpoint load."""
        return model

    def finalize(self, model: MobileMoE, cfg: StageConfig) -> MobileMoE:
        """Before final/ is written: the model to save."""
        return model

    def final_metrics(self, model: MobileMoE, evaluate) -> dict:
        """Extra summary entries; evaluate(model) -> held-out loss."""
        return {}


# ---------------------------------------------------------------------------- the loop
def stage_rows(cfg: StageConfig, tok, d: Dist, files, split: str, packing: str, fmt: TextFormat = OURS):
    """A stage's token rows of `files` for one split ("train" | "eval"), as train/data.py build_rows
    caches them in cfg.cache_dir: rank 0 tokenizes, the other ranks then read its cache."""
    # the quality filter picks training data; held-out data stays whole, comparable across stages
    spec = DataSpec(tuple(files), cfg.seq_len, packing, cfg.text_field,
                    cfg.data_filter if split == "train" else "",
                    split="all" if cfg.heldout_data else ("heldout" if split == "eval" else "train"),
                    heldout_frac=0.0 if cfg.heldout_data else cfg.heldout_frac)
    if d.main:  # rank 0 tokenizes; the others read its cache
        rows = build_rows(spec, tok, cfg.cache_dir, fmt)
    d.barrier()
    return rows if d.main else build_rows(spec, tok, cfg.cache_dir, fmt)


CALIBRATE_STEPS = (5, 25)  # max_seconds: time steps 5..25 (past start-up), then fix the stage's length


def fit_steps(max_steps: int, step: int, per_step_s: float, elapsed_s: float, budget_s: float) -> int:
    """The stage's length under a wall-clock budget: the steps that fit in what is left of budget_s at
    per_step_s each (never past max_steps, never before the current step)."""
    fit = step + int(max(0.0, budget_s - elapsed_s) / max(per_step_s, 1e-9))
    return max(step, min(max_steps, fit))


def wait_for_budget(path: Path, wait_s: float, poll_s: float = 0.1) -> int:
    """The token count in `path` (budget_file), once it exists; StageError after wait_s seconds."""
    t0 = time.perf_counter()
    while not path.is_file():
        if time.perf_counter() - t0 > wait_s:
            raise StageError(f"budget_file {path}: not written within {wait_s:g} s (did the watcher die?)")
        time.sleep(poll_s)
    text = path.read_text().split()
    if not text or not text[0].isdigit() or int(text[0]) <= 0:
        raise StageError(f"budget_file {path}: expected a positive token count, got {' '.join(text)[:40]!r}")
    return int(text[0])


def resolve_steps(cfg: StageConfig, n_rows: int, world: int) -> int:
    per_step = cfg.batch_size * cfg.grad_accum * world
    if cfg.max_steps > 0:
        return cfg.max_steps
    if cfg.max_tokens > 0:
        return max(1, math.ceil(cfg.max_tokens / (per_step * cfg.seq_len)))
    return max(1, math.ceil(cfg.epochs * n_rows / per_step))


def run_stage(cfg: StageConfig, hooks: StageHooks | None = None) -> dict:
    """Train one stage; returns its summary (also written to out_dir/summary.json on rank 0)."""
    cfg.validate()
    hooks = hooks or StageHooks()
    owner = not dist.is_initialized()  # a caller that set up the process group (pipeline) keeps it
    d = init_dist(cfg.device)
    try:
        return _run(cfg, hooks, d)
    finally:
        if owner and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: StageConfig, hooks: StageHooks, d: Dist) -> dict:
    out = Path(cfg.out_dir)
    model = build_model(cfg)
    mcfg = model.config
    if cfg.seq_len > mcfg.max_seq_len:
        raise StageError(f"{cfg.stage}: seq_len {cfg.seq_len} exceeds the model's max_seq_len "
                         f"{mcfg.max_seq_len} ({mcfg.name})")
    tok, fmt = load_text_format(cfg.init_from or None, mcfg, cfg.tokenizer or None)
    if tok.get_vocab_size() > mcfg.vocab_size:
        raise StageError(f"{cfg.stage}: tokenizer has {tok.get_vocab_size()} tokens, more than the model's "
                         f"vocab_size {mcfg.vocab_size}")
    resume_state = check_resume(cfg, mcfg, d.world)  # raises before anything is written
    dtype = (torch.bfloat16 if d.device.type == "cuda" else torch.float32) if cfg.dtype == "auto" else DTYPES[cfg.dtype]

    train_rows = stage_rows(cfg, tok, d, cfg.train_data, "train", cfg.packing, fmt)
    eval_rows = stage_rows(cfg, tok, d, cfg.heldout_data or cfg.train_data, "eval", cfg.packing, fmt)
    eval_ids = split_for_eval(eval_rows, cfg.eval_tokens)
    max_steps = resolve_steps(cfg, len(train_rows), d.world)
    if resume_state is not None and (cfg.max_seconds > 0 or cfg.budget_file):  # the length fitted before
        max_steps = resume_state.get("max_steps", max_steps)

    model = hooks.prepare(model, cfg).to(d.device)
    model.set_moe_impl(cfg.moe_impl)
    opt = make_optimizer(model, cfg, d.device)
    schedule = Schedule(cfg.schedule, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=d.main)
    step = samples = 0
    if resume_state is not None:
        load_train_checkpoint(out, model, opt, sched, d.device)
        step, samples = resume_state["step"], resume_state["samples"]
        metrics.truncate_after(step)
    elif d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        metrics.path.unlink(missing_ok=True)  # left by a run killed before its first checkpoint
    d.barrier()

    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.active else model
    order = RowOrder(len(train_rows), cfg.seed)
    per_rank, global_batch = cfg.batch_size, cfg.batch_size * cfg.grad_accum * d.world
    coef_lb, coef_z = (mcfg.router_aux_loss_coef, mcfg.router_z_loss_coef) if mcfg.is_moe else (0.0, 0.0)

    def state() -> dict:
        return {"step": step, "samples": samples, "tokens": samples * cfg.seq_len, "max_steps": max_steps,
                "epochs": order.epochs(samples), "world_size": d.world, "stage": cfg.stage,
                "config": _trajectory(cfg), "model_config": mcfg.to_dict()}

    last_plot = [time.perf_counter()]

    def checkpoint():
        if d.main:
            save_train_checkpoint(out, model, opt, sched, state())
            if time.perf_counter() - last_plot[0] > PLOT_EVERY_S:
                plot_losses({mcfg.name: read_metrics(metrics.path)}, out / "loss.png", f"{cfg.stage}: {mcfg.name}")
                last_plot[0] = time.perf_counter()
        d.barrier()

    def evaluate(m=None) -> float:
        return heldout_loss(m if m is not None else model, eval_rows, eval_ids, cfg.batch_size, d, dtype)

    if step == 0:
        metrics.write({"step": 0, "tokens": 0, "eval_loss": evaluate()})
    bar = tqdm(total=max_steps, initial=step, desc=f"{cfg.stage} {mcfg.name}", unit="step",
               disable=not (cfg.progress and d.main), dynamic_ncols=True)
    acc = torch.zeros(4, dtype=torch.float64, device=d.device)  # ce sum, targets, lb, z (since last log)
    share = torch.zeros(mcfg.num_layers, max(mcfg.num_experts, 1), device=d.device)
    logged = [r["loss"] for r in read_metrics(metrics.path) if "loss" in r] if step and d.main else []
    t_log, steps_logged, last_loss = time.perf_counter(), 0, logged[-1] if logged else float("nan")
    t_start, start_step = time.perf_counter(), step
    t_cal = t_start
    model.train()
    while step < max_steps:
        batches = [train_rows.batch(order.rows(samples + (m * d.world + d.rank) * per_rank, per_rank))
                   for m in range(cfg.grad_accum)]
        n_targets = d.sum(torch.tensor(float(sum((y != IGNORE_INDEX).sum() for _, y in batches)),
                                       device=d.device)).clamp(min=1)
        for m, (x, y) in enumerate(batches):
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            sync = m == cfg.grad_accum - 1 or not d.active
            with (contextlib.nullcontext() if sync else ddp.no_sync()), _autocast(d.device, dtype):
                logits, _, aux = ddp(x, return_aux=True)
                ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum")
                # DDP averages gradients over processes: scale so the result is the global token mean
                router = coef_lb * aux["load_balance"] + coef_z * aux["z_loss"]
                loss = ce * (d.world / n_targets) + router / cfg.grad_accum
            loss.backward()
            acc += torch.stack([ce.detach().double(), (y != IGNORE_INDEX).sum().double(),
                                aux["load_balance"].detach().double() / cfg.grad_accum,
                                aux["z_loss"].detach().double() / cfg.grad_accum])
            if aux["expert_share"] is not None:
                share += aux["expert_share"] / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step, samples = step + 1, samples + global_batch
        steps_logged += 1
        if cfg.max_seconds > 0 and resume_state is None and step - start_step in CALIBRATE_STEPS:
            if d.device.type == "cuda":
                torch.cuda.synchronize()  # the queued steps count too
            now = time.perf_counter()
            if step - start_step == CALIBRATE_STEPS[0]:
                t_cal = now
            else:  # every rank measured its own time: take the slowest, so all agree on the length
                per_step = d.max(torch.tensor((now - t_cal) / (CALIBRATE_STEPS[1] - CALIBRATE_STEPS[0]),
                                              device=d.device)).item()
                fitted = fit_steps(max_steps, step, per_step, now - t_start, cfg.max_seconds)
                if fitted < max_steps:
                    max_steps = fitted
                    schedule.total, schedule.warmup = max_steps, min(schedule.warmup, max(1, max_steps // 10))
                    bar.total = max_steps
                    print(f"{cfg.stage}: {per_step:.3f} s/step: {max_steps} steps fit in max_seconds="
                          f"{cfg.max_seconds:g} ({max_steps * global_batch * cfg.seq_len / 1e6:.1f}M tokens)",
                          file=sys.stderr)
        if cfg.budget_file and resume_state is None and step == max(1, cfg.warmup_steps):
            tokens = wait_for_budget(Path(cfg.budget_file), cfg.budget_wait_s)
            fitted = max(step, min(max_steps, math.ceil(tokens / (global_batch * cfg.seq_len))))
            print(f"{cfg.stage}: budget_file: {tokens:,} tokens -> {fitted} of at most {max_steps} steps "
                  f"({fitted * global_batch * cfg.seq_len / 1e6:.2f}M tokens)", file=sys.stderr)
            max_steps = schedule.total = bar.total = fitted
        bar.update(1)

        if step % cfg.log_every == 0 or step == max_steps:
            d.sum(acc)
            d.sum(share)
            dt = time.perf_counter() - t_log
            last_loss = (acc[0] / acc[1].clamp(min=1)).item()
            rec = {"step": step, "tokens": samples * cfg.seq_len, "loss": round(last_loss, 5), "lr": lr,
                   "grad_norm": round(grad_norm.item(), 4),
                   "tok_s": round(steps_logged * global_batch * cfg.seq_len / dt, 1)}
            if mcfg.is_moe:
                s = share / (steps_logged * d.world)
                rec.update(load_balance=round(acc[2].item() / (steps_logged * d.world), 5),
                           z_loss=round(acc[3].item() / (steps_logged * d.world), 5),
                           expert_share=[[round(v, 4) for v in layer] for layer in s.tolist()])
            metrics.write(rec)
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{rec['tok_s']:.0f}", lr=f"{lr:.2e}")
            acc.zero_()
            share.zero_()
            t_log, steps_logged = time.perf_counter(), 0
        if step % cfg.eval_every == 0 or step == max_steps:
            metrics.write({"step": step, "tokens": samples * cfg.seq_len, "eval_loss": evaluate()})
        if step % cfg.ckpt_every == 0 or step == max_steps:
            checkpoint()
    bar.close()
    wall = time.perf_counter() - t_start

    final = hooks.finalize(model, cfg)
    summary = {"stage": cfg.stage, "model": mcfg.name, "is_moe": mcfg.is_moe, "steps": max_steps,
               "tokens": samples * cfg.seq_len, "target_tokens_per_epoch": train_rows.target_tokens(),
               "epochs": round(order.epochs(samples), 3), "train_loss": round(last_loss, 5),
               "eval_loss": round(evaluate(final), 5), "eval_rows": int(len(eval_ids)),
               "wall_s": round(wall, 1),
               "tok_s": round((step - start_step) * global_batch * cfg.seq_len / max(wall, 1e-9), 1),
               **hooks.final_metrics(final, evaluate)}
    if d.main:
        if fmt.own:
            save_checkpoint(final, out / "final", tokenizer=tok, dtype=DTYPES[cfg.save_dtype])
        else:  # an imported model goes back under its own config, tokenizer and chat template
            tok_dir = Path(cfg.tokenizer).parent if cfg.tokenizer else Path(cfg.init_from)
            save_checkpoint(final, out / "final", dtype=DTYPES[cfg.save_dtype], extra_files=imported_files(tok_dir),
                            base_config=imported_config(cfg.init_from) if cfg.init_from else None)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot_losses({mcfg.name: read_metrics(metrics.path)}, out / "loss.png", f"{cfg.stage}: {mcfg.name}")
        print(f"{cfg.stage}: {summary['tokens']:,} tokens, train loss {summary['train_loss']:.4f}, "
              f"held-out {summary['eval_loss']:.4f} -> {out / 'final'}", file=sys.stderr)
    d.barrier()
    return summary


def stage_main(default: StageConfig, argv=None, hooks: StageHooks | None = None, prog: str = "",
               doc: str = "") -> int:
    cfg = config_from_args(default, argv, prog=prog, description=doc.split("\n")[0] if doc else "")
    try:
        run_stage(cfg, hooks)
    except (StageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
