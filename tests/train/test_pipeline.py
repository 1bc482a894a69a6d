"""train.pipeline: pretrain -> midtrain -> sft -> qat on the synthetic corpus, CPU, test-moe preset."""
import json

import torch
from safetensors import safe_open

from mobilemoe.checkpoint import load_checkpoint
from mobilemoe.generate import generate
from mobilemoe.tokenizer import chat_template, load_tokenizer
from train.logs import read_metrics
from train.pipeline import main


def _evals(stage_dir):
    return [r["eval_loss"] for r in read_metrics(stage_dir / "metrics.jsonl") if "eval_loss" in r]


def test_four_stages_with_falling_loss_and_export(corpus_dir, tokenizer_path, tmp_path, capsys):
    out, export = tmp_path / "run", tmp_path / "export"
    sets = ["all.tokenizer=" + str(tokenizer_path), "all.device=cpu", "all.progress=false",
            "all.seq_len=64", "all.batch_size=4", "all.eval_tokens=512", "all.log_every=2",
            "all.eval_every=10", "all.ckpt_every=10", "all.warmup_steps=3",
            "pretrain.max_steps=40", "midtrain.max_steps=10", "sft.max_steps=16", "qat.max_steps=6",
            "sft.lr=2e-3", "qat.eval_tokens=0"]  # qat: all held-out chats, as the report
    args = ["--model", "test-moe", "--corpus", str(corpus_dir), "--out", str(out), "--export", str(export)]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0

    for stage in ("pretrain", "midtrain", "sft"):
        evals = _evals(out / stage)
        assert evals[-1] < evals[0], (stage, evals)  # held-out loss fell during the stage
        assert (out / stage / "loss.png").stat().st_size > 0
    train = [r["loss"] for r in read_metrics(out / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert sum(train[-3:]) < sum(train[:3])
    share = [r["expert_share"] for r in read_metrics(out / "pretrain" / "metrics.jsonl") if "loss" in r][-1]
    assert len(share) == 2 and all(abs(sum(layer) - 1) < 1e-3 for layer in share)  # [layers][experts]

    rep = json.loads((out / "report.json").read_text())
    assert set(rep["tokens"]) == {"pretrain", "midtrain", "sft", "qat"}
    assert rep["tokens"]["pretrain"] == 40 * 4 * 64
    assert rep["heldout_text"]["midtrain"] < rep["heldout_text"]["pretrain"] + 0.05
    qat = rep["stages"]["qat"]
    assert abs(qat["eval_loss_int4"] - rep["heldout_chat"]["qat_int4"]) < 0.05  # bf16 autocast-free on CPU
    assert rep["heldout_chat"]["qat_int4"] < _evals(out / "sft")[0]  # still far better than before SFT
    assert (out / "loss.png").is_file() and (out / "sft-data" / "train.jsonl").is_file()
    ex = rep["exact_answers"]  # greedy answers to sft-data/heldout_qa.jsonl, checked (mobilemoe.answer_check)
    assert set(ex) == {"sft", "sft_int4", "qat", "qat_int4"}
    assert all(0 <= v["rate"] <= 1 and v["n"] > 0 and v["samples"] for v in ex.values())

    # the exported default-model layout: bf16 safetensors + tokenizer, generates
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((export / "training.json").read_text())["tokens"] == rep["tokens"]
    model, tok = load_checkpoint(export), load_tokenizer(export)
    ids = tok.encode(chat_template([{"role": "user", "content": "What does `mod3.f0()` do?"}],
                                   add_generation_prompt=True)).ids
    new, _ = generate(model, ids, 8)
    assert len(new) == 8

    capsys.readouterr()
    assert main(args + ["--resume"] + [a for s in sets for a in ("--set", s)]) == 0  # all stages done
    assert capsys.readouterr().err.count("already finished") == 4


def test_prepare_data_fills_the_shared_cache(corpus_dir, tokenizer_path, tmp_path, capsys):
    """--prepare-data tokenizes each stage's data once into all.cache_dir; a stage then reads it, no new cache."""
    cache = tmp_path / "cache"
    sets = ["all.tokenizer=" + str(tokenizer_path), "all.device=cpu", "all.progress=false", "all.seq_len=64",
            "all.batch_size=4", "all.eval_tokens=512", f"all.cache_dir={cache}", "sft.seq_len=32",
            "midtrain.data_filter=quality", "pretrain.max_steps=2"]
    args = ["--model", "test-moe", "--corpus", str(corpus_dir), "--out", str(tmp_path / "run")]
    args += [a for s in sets for a in ("--set", s)]
    assert main(args + ["--prepare-data", "--stages", "pretrain,midtrain"]) == 0
    assert len(list(cache.iterdir())) == 3  # text train + held-out, midtrain's quality-filtered train
    assert main(args + ["--prepare-data"]) == 0
    made = sorted(p.name for p in cache.iterdir() if (p / "meta.json").is_file())
    # text (64) train + held-out, midtrain's quality-filtered train, chats (32 and qat's 64) train + held-out
    assert len(made) == 7 and not (tmp_path / "run" / "pretrain").exists()
    assert "data cache(s) ready" in capsys.readouterr().err
    assert main(args + ["--stages", "pretrain"]) == 0
    assert sorted(p.name for p in cache.iterdir() if (p / "meta.json").is_file()) == made
