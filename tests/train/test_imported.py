"""SFT and QAT of imported HF MoE checkpoints (train/ with --init DIR): the chats are formatted by the
model's own chat template, the result reopens in transformers under its own architecture with our
logits, and the QAT'd model compiles. Tiny random models that transformers writes (tests/arch/hf_models.py)."""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mobilemoe.checkpoint import load_checkpoint
from mobilemoe.text_format import load_text_format
from tests.arch.hf_models import CHAT_TEMPLATE, save_tiny, write_tokenizer
from train.data import DataSpec, build_rows
from train.logs import read_metrics
from train.midtrain import main as midtrain_main
from train.pipeline import main as pipeline_main
from train.pretrain import main as pretrain_main
from train.qat import main as qat_main
from train.sft import main as sft_main

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def chat_data(path: Path, n: int, seed: int) -> Path:
    """Chats whose answer maps each question word wK to w(K + 100): learnable in a few steps."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = [f"w{r.randrange(8, 40)}" for _ in range(4)]
            a = [f"w{int(w[1:]) + 100}" for w in q]
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(q)},
                                             {"role": "assistant", "content": " ".join(a)}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("chats")
    return {"train_data": str(chat_data(d / "train.jsonl", 96, 0)),
            "heldout_data": str(chat_data(d / "heldout.jsonl", 16, 1))}


def imported(model_type: str, d: Path) -> Path:
    return write_tokenizer(save_tiny(model_type, d / model_type))


def stage_args(out: Path, chats: dict, **kw) -> list[str]:
    base = {**dict(out_dir=str(out), cache_dir=str(out.parent / "cache"), seq_len=32, batch_size=8, max_steps=10,
                   warmup_steps=2, lr=3e-3, eval_every=5, eval_tokens=0, log_every=1, ckpt_every=10, device="cpu"),
            **chats, **kw}
    return [a for k, v in base.items() for a in (f"--{k.replace('_', '-')}", str(v))] + ["--no-progress"]


def max_logit_error(ckpt: Path) -> float:
    """transformers on `ckpt` vs ours, float32, 13 random tokens."""
    ours = load_checkpoint(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return (hf(tokens).logits - ours(tokens)[0]).abs().max().item()


def _evals(stage_dir: Path) -> list[float]:
    return [r["eval_loss"] for r in read_metrics(stage_dir / "metrics.jsonl") if "eval_loss" in r]


# qwen2_moe: shared expert with a sigmoid gate, sharded checkpoint; mixtral: no shared expert, bf16 on
# disk; granitemoe: tied embeddings, multipliers
@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral", "granitemoe"])
def test_sft_then_qat_reopens_in_transformers(tmp_path, chats, model_type):
    src = imported(model_type, tmp_path)
    assert sft_main(["--init", str(src)] + stage_args(tmp_path / "sft", chats)) == 0
    qat_args = stage_args(tmp_path / "qat", chats, lr=1e-3, max_steps=4)
    assert qat_main(["--init", str(tmp_path / "sft" / "final")] + qat_args) == 0
    evals = _evals(tmp_path / "sft")
    assert evals[-1] < evals[0] - 0.5, evals  # the answers were learned
    summary = json.loads((tmp_path / "qat" / "summary.json").read_text())
    assert summary["eval_loss_int4"] < evals[0]

    original = json.loads((src / "config.json").read_text())
    for stage, dtype in (("sft", "float32"), ("qat", "bfloat16")):
        final = tmp_path / stage / "final"
        raw = json.loads((final / "config.json").read_text())
        assert raw == {**original, **{k: dtype for k in ("dtype", "torch_dtype") if k in original}}
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (final / f).read_bytes() == (src / f).read_bytes()
        err = max_logit_error(final)
        print(f"{model_type} {stage}: max |logit error| vs transformers {err:.2e}")
        assert err <= 1e-4, (stage, err)
    before, after = load_checkpoint(src).state_dict(), load_checkpoint(tmp_path / "qat" / "final").state_dict()
    experts = [k for k in before if k.endswith("moe.w1")]  # [E, I, H] per layer
    assert experts and all(not torch.equal(before[k].float(), after[k].float()) for k in experts)


def test_pipeline_init_sft_qat_export(tmp_path, chats, capsys):
    src = imported("granitemoeshared", tmp_path)
    sets = [f"all.{k}={v}" for k, v in dict(seq_len=32, batch_size=8, max_steps=6, warmup_steps=2, eval_every=6,
                                            ckpt_every=6, eval_tokens=0, device="cpu", progress="false").items()]
    sft_data = Path(chats["train_data"]).parent
    args = ["--init", str(src), "--stages", "sft,qat", "--sft-data", str(sft_data), "--out", str(tmp_path / "run"),
            "--export", str(tmp_path / "export")] + [a for s in sets for a in ("--set", s)]
    assert pipeline_main(args) == 0
    assert json.loads((tmp_path / "run" / "sft" / "config.json").read_text())["init_from"] == str(src)
    export = tmp_path / "export"
    raw = json.loads((export / "config.json").read_text())
    assert raw["model_type"] == "granitemoeshared" and raw["architectures"] == ["GraniteMoeSharedForCausalLM"]
    assert json.loads((export / "training.json").read_text())["ran"] == ["sft", "qat"]
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    err = max_logit_error(export)
    print(f"granitemoeshared export: max |logit error| vs transformers {err:.2e}")
    assert err <= 1e-4
    r = subprocess.run([sys.executable, "-m", "mobilemoe.generate", "--checkpoint", str(export), "--prompt", "w9 w10",
                        "--chat", "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("w9 w10"), r.stderr[-2000:]


def test_pretrain_and_midtrain_take_an_imported_model(tmp_path, capsys):
    src = imported("olmoe", tmp_path)
    r = random.Random(0)
    with open(tmp_path / "text.jsonl", "w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(f"w{r.randrange(8, 60)}" for _ in range(20))}) + "\n")
    data = {"train_data": str(tmp_path / "text.jsonl"), "heldout_data": str(tmp_path / "text.jsonl")}
    assert pretrain_main(["--init", str(src)] + stage_args(tmp_path / "pre", data, max_steps=4)) == 0
    mid_args = stage_args(tmp_path / "mid", data, max_steps=4, data_filter="")
    assert midtrain_main(["--init", str(tmp_path / "pre" / "final")] + mid_args) == 0
    assert max_logit_error(tmp_path / "mid" / "final") <= 1e-4
    tok, fmt = load_text_format(src, load_checkpoint(src).config)
    rows = build_rows(DataSpec((data["train_data"],), 32, "stream"), tok, tmp_path / "cache2", fmt)
    first = rows.tokens[0].tolist()
    assert first[0] == 0 and first[21] == 1 and first[22] == 0  # <s> 20 words </s> <s> ...: its BOS, its EOS


def test_imported_chat_rows_train_on_the_answers_only(tmp_path, chats):
    src = imported("qwen2_moe", tmp_path)
    tok, fmt = load_text_format(src, load_checkpoint(src).config)
    rows = build_rows(DataSpec((chats["train_data"],), 32, "examples"), tok, tmp_path / "cache", fmt)
    x, y = rows.batch([0])
    question = json.loads(Path(chats["train_data"]).read_text().splitlines()[0])["messages"][0]["content"]
    answer = [f"w{int(w[1:]) + 100}" for w in question.split()]
    assert [tok.id_to_token(int(t)) for t in y[0] if t >= 0][:5] == answer + ["<|im_end|>"]


def _edit(d: Path, **fields) -> None:
    raw = json.loads((d / "config.json").read_text())
    raw.update(fields)
    (d / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("edit,message", [
    (lambda d: _edit(d, model_type="gpt2"),
     r"config.json: field 'model_type': unsupported model_type 'gpt2'; supported: "),
    (lambda d: _edit(d, decoder_sparse_step=2), r"config.json: field 'decoder_sparse_step' is 2; supported: \[1\]"),
    (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer file not found: .*/tokenizer.json"),
    (lambda d: write_tokenizer(d, chat_template=None),
     r"tokenizer_config.json: no 'chat_template' \(nor a chat_template.jinja beside it\): chats cannot be formatted"),
])
def test_init_errors_are_one_line(tmp_path, chats, capsys, edit, message):
    src = imported("qwen2_moe", tmp_path)
    edit(src)
    capsys.readouterr()
    assert sft_main(["--init", str(src)] + stage_args(tmp_path / "sft", chats)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert re.search(message, err), err
    assert not (tmp_path / "sft" / "final").exists()


@pytest.mark.slow
def test_qat_model_compiles(tmp_path, chats):
    """The QAT'd imported model through compiler.build --target host (~40 s)."""
    src = imported("qwen2_moe", tmp_path)
    assert qat_main(["--init", str(src)] + stage_args(tmp_path / "qat", chats, max_steps=2)) == 0
    r = subprocess.run([sys.executable, "-m", "compiler.build", "--checkpoint", str(tmp_path / "qat" / "final"),
                        "--target", "host", "--out", str(tmp_path / "art")], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "art" / "manifest.json").is_file()
