"""The `mobilemoe` lm-eval model run through lm-eval's own evaluator on local JSONL tasks: its scores
equal mobilemoe.eval's direct computation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, before datasets is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mobilemoe.eval import choice_accuracy, perplexity  # noqa: E402
from mobilemoe.lm_eval_adapter import MobileMoELM, local_task_configs, task_config  # noqa: E402
from tests.eval_helpers import MC_ROWS, SAMPLE, make_checkpoint, write_jsonl  # noqa: E402

PPL_DOCS = [{"text": "The json module encodes Python objects."}, {"text": SAMPLE[:1500]}]  # 2 windows
GEN_CONTEXT = "import json\n"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("lm_eval") / "ckpt", 0)
    return get_model("mobilemoe").create_from_arg_string(f"checkpoint={ckpt}")


def local(path, tmp_path, **extra):
    cfg = {**task_config(path), **extra}
    cfg["dataset_kwargs"]["cache_dir"] = str(tmp_path / "hf-cache")  # datasets' cache stays in tmp
    return cfg


def run(lm, tasks):
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_defaults=False),
                                   bootstrap_iters=0, log_samples=True, random_seed=0)


def test_registered_and_arguments(lm, tmp_path):
    assert isinstance(lm, MobileMoELM) and lm.max_length == 256 and lm.scorer.kind == "checkpoint"
    with pytest.raises(ValueError, match="exactly one of model_args checkpoint=DIR or artifact=DIR"):
        MobileMoELM()
    with pytest.raises(FileNotFoundError, match="artifact directory .*missing not found"):
        MobileMoELM(artifact=str(tmp_path / "missing"))


def test_simple_evaluate_equals_direct_computation(lm, tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    ppl = write_jsonl(tmp_path / "ppl.jsonl", PPL_DOCS)
    greedy = lm.scorer.generate(GEN_CONTEXT, ["\n\n"], 6)
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"context": GEN_CONTEXT, "answer": greedy},
                                               {"context": GEN_CONTEXT + "x", "answer": "not this"}])
    gen_task = {"task": "mobilemoe_gen", "dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(gen)}, "cache_dir": str(tmp_path / "hf-cache")},
                "output_type": "generate_until", "doc_to_text": "context", "doc_to_target": "answer",
                "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    out = run(lm, [local(mc, tmp_path), local(ppl, tmp_path), gen_task])
    res, samples = out["results"], out["samples"]

    direct = choice_accuracy(lm.scorer, MC_ROWS)
    assert res["mobilemoe_mc"]["acc,none"] == direct["acc"]
    assert res["mobilemoe_mc"]["acc_norm,none"] == direct["acc_norm"]
    first = next(s for s in samples["mobilemoe_mc"] if s["doc_id"] == 0)  # its choices, as lm-eval scored them
    ours = [lm.scorer.loglikelihood(MC_ROWS[0]["context"], " " + c)[0] for c in MC_ROWS[0]["choices"]]
    assert [r[0][0] for r in first["resps"]] == pytest.approx(ours, abs=1e-5)

    direct = perplexity(lm.scorer, PPL_DOCS)
    assert res["mobilemoe_ppl"]["bits_per_byte,none"] == pytest.approx(direct["bits_per_byte"], rel=1e-6)
    assert res["mobilemoe_ppl"]["word_perplexity,none"] == pytest.approx(direct["word_perplexity"], rel=1e-6)
    first = next(s for s in samples["mobilemoe_ppl"] if s["doc_id"] == 0)
    assert first["resps"][0][0] == pytest.approx(lm.scorer.rolling_logprob(PPL_DOCS[0]["text"])[0], abs=1e-5)

    assert res["mobilemoe_gen"]["exact_match,none"] == 0.5
    first = next(s for s in samples["mobilemoe_gen"] if s["doc_id"] == 0)
    assert first["resps"][0][0] == greedy


def test_local_task_configs_are_bundled_tasks():
    names = [c["task"] for c in local_task_configs()]
    assert {"mobilemoe_python_modules", "mobilemoe_python_docstrings"} <= set(names)
    for cfg in local_task_configs():
        assert Path(cfg["dataset_kwargs"]["data_files"]["test"]).is_file()


@pytest.mark.slow
def test_cli_wrapper(tmp_path):
    """python -m mobilemoe.lm_eval_adapter: lm-eval's own CLI, `mobilemoe` registered, local tasks found
    (slow: lm-eval's CLI indexes all its built-in tasks first)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", 0)
    cmd = [sys.executable, "-m", "mobilemoe.lm_eval_adapter", "--model", "mobilemoe", "--model_args",
           f"checkpoint={ckpt}", "--tasks", "mobilemoe_python_modules", "--limit", "3",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    assert result["results"]["mobilemoe_python_modules"]["acc,none"] in (0, 1 / 3, 2 / 3, 1)
    assert "|mobilemoe_python_modules|" in proc.stdout.replace(" ", "")  # lm-eval's results table


@pytest.mark.slow
def test_tvm_artifact_matches_int4_checkpoint(tmp_path):
    """A host TVM artifact scored through lm-eval agrees with its checkpoint's simulated INT4 weights."""
    from compiler.build import build
    ckpt = make_checkpoint(tmp_path / "ckpt", 0)
    artifact = build(ckpt, "host", tmp_path / "host", verbose=False)
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    tvm_lm = MobileMoELM(artifact=str(artifact))
    sim_lm = MobileMoELM(checkpoint=str(ckpt), int4="true")
    assert tvm_lm.scorer.kind == "tvm" and sim_lm.scorer.kind == "checkpoint-int4"
    a, b = run(tvm_lm, [local(mc, tmp_path)]), run(sim_lm, [local(mc, tmp_path)])
    for sa, sb in zip(a["samples"]["mobilemoe_mc"], b["samples"]["mobilemoe_mc"]):
        assert [r[0][0] for r in sa["resps"]] == pytest.approx([r[0][0] for r in sb["resps"]], abs=2e-3)
