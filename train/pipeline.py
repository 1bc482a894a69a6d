"""All four stages in a row: pretrain -> midtrain -> sft -> qat, then a held-out report.

    python -m train.pipeline --model mobilemoe-tiny --out runs/tiny [--corpus data/corpus]
        [--config pipeline.json] [--set pretrain.max_tokens=2e7 --set all.batch_size=32 ...]
        [--resume] [--export mobilemoe/assets/default-model] [--compare-with runs/tiny-dense]
    python -m train.pipeline --init HF_DIR --stages sft,qat --sft-data data/sft --out runs/ft --export DIR
    torchrun --nproc-per-node 2 -m train.pipeline ...          (the same, data-parallel)
    python -m train.pipeline ... --set all.cache_dir=C --prepare-data   (tokenize once for runs sharing C)

Layout of --out: sft-data/ (question/answer pairs built from --corpus by train.sft_data), cache/
(tokenized rows), one dir per stage (train/loop.py: metrics.jsonl, loss.png, checkpoint/, final/,
summary.json), report.json and loss.png (all stages, tokens end to end).
Each stage in --stages starts from the previous one's final/; the first from --init (a checkpoint
dir: ours, or any registered HF architecture, mobilemoe/arch) or else from the final/ of the stage
before it in the full order (pretrain: from --model). --config is a JSON object {"all": {...}, "pretrain": {...},
...} of StageConfig field overrides; --set STAGE.FIELD=VALUE overrides it again. --resume skips
finished stages and resumes the interrupted one.

report.json: per stage the summary (tokens, losses), and held-out losses of every stage's final
model on the text held-out split, plus float vs INT4 (dequant(quantize(w))) for sft (post-training
quantization, no QAT) and qat; "exact_answers": greedy answers of sft and qat (float, INT4) to the
held-out questions of sft-data/heldout_qa.jsonl (--qa-limit of them), checked by
mobilemoe.answer_check (rate, per kind, samples).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mobilemoe.answer_check import evaluate_checkpoint as evaluate_answers
from mobilemoe.checkpoint import imported_config, imported_files, load_checkpoint, save_checkpoint
from mobilemoe.tokenizer import load_tokenizer
from train.evaluate import evaluate_checkpoint
from train.logs import plot_losses, read_metrics
from train.loop import (Dist, StageConfig, StageError, StageHooks, apply_overrides, init_dist, run_stage,
                        stage_rows)
from train.midtrain import MidtrainConfig
from train.pretrain import PretrainConfig
from train.qat import QATHooks, QATStageConfig
from train.sft import SFTConfig
from train.sft_data import build_sft_data

STAGES: dict[str, tuple[type[StageConfig], type[StageHooks]]] = {
    "pretrain": (PretrainConfig, StageHooks),
    "midtrain": (MidtrainConfig, StageHooks),
    "sft": (SFTConfig, StageHooks),
    "qat": (QATStageConfig, QATHooks),
}
CHAT_STAGES = ("sft", "qat")


def stage_configs(model: str, out: Path, corpus: Path, sft_dir: Path, overrides: dict,
                  resume: bool = False, stages=tuple(STAGES), init: str = "") -> dict[str, StageConfig]:
    """Every stage's config; those in `stages` start from the previous one's final/ (the first from
    `init` when given), the others as in the full order."""
    unknown = sorted(set(overrides) - {"all", *STAGES})
    if unknown:
        raise StageError(f"pipeline overrides: unknown section(s) {unknown}; known: all, {', '.join(STAGES)}")
    text = {"train_data": [str(corpus / "train.jsonl")], "heldout_data": [str(corpus / "heldout.jsonl")]}
    chat = {"train_data": [str(sft_dir / "train.jsonl")], "heldout_data": [str(sft_dir / "heldout.jsonl")]}
    cfgs, prev, chained = {}, "", ""
    for name, (cls, _) in STAGES.items():
        start = (chained or init or prev) if name in stages else prev
        cfg = cls(model=model, out_dir=str(out / name), init_from=start, cache_dir=str(out / "cache"),
                  resume=resume, **(chat if name in CHAT_STAGES else text))
        cfg = apply_overrides(cfg, {**overrides.get("all", {}), **overrides.get(name, {})}, f"pipeline {name}")
        cfg.validate()
        cfgs[name], prev = cfg, str(out / name / "final")
        chained = prev if name in stages else chained
    return cfgs


def parse_sets(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        stage, dot, fld = key.partition(".")
        if not (eq and dot and stage and fld):
            raise StageError(f"--set {item!r}: expected STAGE.FIELD=VALUE (STAGE: all, {', '.join(STAGES)})")
        out.setdefault(stage, {})[fld] = value
    return out


def report(cfgs: dict[str, StageConfig], out: Path, device: str, qa_limit: int = 300) -> dict:
    """Held-out losses of every stage's final model (float32 math), float vs INT4 for sft and qat;
    and, when the SFT data has heldout_qa.jsonl, the exact-answer rate of sft and qat (float, INT4)
    on its first qa_limit questions (mobilemoe.answer_check)."""
    text = cfgs["pretrain"].heldout_data
    seq = cfgs["pretrain"].seq_len
    chat = cfgs["sft"].heldout_data
    rep: dict = {"stages": {}, "heldout_text": {}, "heldout_chat": {}}
    for name, cfg in cfgs.items():
        final = Path(cfg.out_dir) / "final"
        rep["stages"][name] = json.loads((Path(cfg.out_dir) / "summary.json").read_text())
        for int4 in ((False, True) if name in CHAT_STAGES else (False,)):
            key = f"{name}{'_int4' if int4 else ''}"
            rep["heldout_text"][key] = evaluate_checkpoint(final, text, "stream", seq, int4, device=device,
                                                           cache_dir=cfg.cache_dir)["loss"]
            if name in CHAT_STAGES:
                rep["heldout_chat"][key] = evaluate_checkpoint(final, chat, "examples", cfg.seq_len, int4,
                                                               device=device, cache_dir=cfg.cache_dir)["loss"]
    rep["tokens"] = {n: s["tokens"] for n, s in rep["stages"].items()}
    qa = Path(chat[0]).with_name("heldout_qa.jsonl") if chat else None
    own = imported_config(Path(cfgs["sft"].out_dir) / "final") is None  # answer_check prompts in our chat format
    if own and qa is not None and qa.is_file() and qa_limit > 0:  # exact answers on held-out questions (greedy)
        rep["exact_answers"] = {}
        for name in CHAT_STAGES:
            final = Path(cfgs[name].out_dir) / "final"
            for int4 in (False, True):
                res = evaluate_answers(final, qa, qa_limit, device=device, int4=int4)
                rep["exact_answers"][f"{name}{'_int4' if int4 else ''}"] = {
                    k: res[k] for k in ("rate", "n", "by_kind", "samples")}
    return rep


def prepare_data(cfgs: dict[str, StageConfig]) -> int:
    """Tokenize every stage's training and held-out data into its cache_dir (what each stage would do
    at its start), so that pipelines launched side by side with one all.cache_dir share one copy
    instead of each tokenizing the corpus; returns the number of distinct caches."""
    seen = set()
    for cfg in cfgs.values():
        key = (cfg.seq_len, cfg.packing, cfg.data_filter, tuple(cfg.train_data), tuple(cfg.heldout_data),
               cfg.tokenizer, cfg.cache_dir)
        if key not in seen:
            seen.add(key)
            tok = load_tokenizer(cfg.tokenizer or None)
            stage_rows(cfg, tok, Dist(), cfg.train_data, "train", cfg.packing)
            stage_rows(cfg, tok, Dist(), cfg.heldout_data, "eval", cfg.packing)
    return len(seen)


def stage_curves(dirs: dict[str, Path]) -> dict[str, list[dict]]:
    """Each stage's metrics (stage name -> its out_dir) with tokens counted from the pipeline's start."""
    curves, offset = {}, 0
    for name, stage_dir in dirs.items():
        records = read_metrics(Path(stage_dir) / "metrics.jsonl")
        curves[name] = [{**r, "tokens": r["tokens"] + offset} for r in records]
        offset += max(r["tokens"] for r in records)
    return curves


def export(final: Path, out: Path, training: dict) -> None:
    """A stage's final/ as bf16 + its tokenizer (an imported model: its own config.json, tokenizer and
    chat template) + training.json."""
    extra = {"training.json": json.dumps(training, indent=1).encode()}
    base = imported_config(final)
    if base is None:
        save_checkpoint(load_checkpoint(final), out, tokenizer=load_tokenizer(final), dtype=torch.bfloat16,
                        extra_files=extra)
    else:
        save_checkpoint(load_checkpoint(final), out, dtype=torch.bfloat16, base_config=base,
                        extra_files={**imported_files(final), **extra})
    print(f"pipeline: exported {final} -> {out} (bf16)", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilemoe-tiny", help="preset or config.json")
    p.add_argument("--init", default="", metavar="DIR", help="checkpoint the first of --stages starts from "
                   "(ours or an HF model of a registered architecture)")
    p.add_argument("--out", type=Path, default=Path("runs/pipeline"))
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"), help="train.corpus output dir")
    p.add_argument("--sft-data", type=Path, help="train.sft_data output dir (default: built into --out)")
    p.add_argument("--config", type=Path, help='JSON {"all": {...}, "pretrain": {...}, ...}')
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.FIELD=VALUE")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export", type=Path, help="write the last stage's (QAT's) model here as bf16 + tokenizer")
    p.add_argument("--compare-with", type=Path, help="another pipeline --out: joint loss plot + table")
    p.add_argument("--device", default="auto")
    p.add_argument("--qa-limit", type=int, default=300, help="held-out questions for the exact-answer check (0: skip)")
    p.add_argument("--prepare-data", action="store_true", help="only tokenize the data of every stage in --stages "
                   "into its cache_dir and exit (before launching pipelines that share all.cache_dir)")
    a = p.parse_args(argv)

    d = init_dist(a.device)  # once for all stages (a no-op without torchrun)
    rep: dict = {}
    try:
        overrides = json.loads(a.config.read_text()) if a.config else {}
        for stage, kv in parse_sets(a.sets).items():
            overrides.setdefault(stage, {}).update(kv)
        sft_dir = a.sft_data or a.out / "sft-data"
        wanted = [s for s in a.stages.split(",") if s]
        if any(s not in STAGES for s in wanted):
            raise StageError(f"--stages {a.stages!r}: known stages are {', '.join(STAGES)}")
        cfgs = stage_configs(a.model, a.out, a.corpus, sft_dir, overrides, a.resume, wanted, a.init)
        if a.sft_data is None and not (sft_dir / "train.jsonl").is_file():
            if d.main:
                build_sft_data(a.corpus, sft_dir)
            d.barrier()
        if a.prepare_data:
            if a.init:
                raise StageError("--prepare-data: models of our own only (an --init model tokenizes with its own format)")
            if d.main:
                print(f"pipeline: {prepare_data({n: cfgs[n] for n in wanted})} data cache(s) ready", file=sys.stderr)
            return 0
        for name in wanted:
            cfg = cfgs[name]
            if a.resume and (Path(cfg.out_dir) / "summary.json").is_file():
                print(f"pipeline: {name} already finished ({cfg.out_dir}), skipped", file=sys.stderr)
                continue
            run_stage(cfg, STAGES[name][1]())
        if d.main and wanted == list(STAGES):
            device = "cuda" if d.device.type == "cuda" else "cpu"
            rep = report(cfgs, a.out, device, a.qa_limit)
            (a.out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
            curves = stage_curves({n: Path(c.out_dir) for n, c in cfgs.items()})
            plot_losses(curves, a.out / "loss.png", f"pipeline: {a.model}")
            print(json.dumps({"tokens": rep["tokens"], "heldout_text": rep["heldout_text"],
                              "heldout_chat": rep["heldout_chat"],
                              "exact_answers": {k: v["rate"] for k, v in rep.get("exact_answers", {}).items()}},
                             indent=1))
            if a.compare_with:
                other = json.loads((a.compare_with / "report.json").read_text())
                name = other["stages"]["pretrain"]["model"]
                theirs = stage_curves({n: a.compare_with / n for n in ("pretrain", "midtrain")})
                runs = {a.model: curves["pretrain"] + curves["midtrain"],
                        name: theirs["pretrain"] + theirs["midtrain"]}
                plot_losses(runs, a.out / "compare.png", "pre- + mid-training, same tokens")
                print(json.dumps({"compare_heldout_text": {a.model: rep["heldout_text"],
                                                           name: other["heldout_text"]}}, indent=1))
        if d.main and a.export and wanted:
            export(Path(cfgs[wanted[-1]].out_dir) / "final", a.export,
                   {"pipeline": str(a.out), "model": a.init or a.model, "ran": wanted, **rep})
    except (StageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if d.active and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
