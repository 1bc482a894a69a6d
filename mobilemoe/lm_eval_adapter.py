"""lm-eval model `mobilemoe`: score a checkpoint or a compiled artifact with EleutherAI's lm-eval.

    python -m mobilemoe.lm_eval_adapter --model mobilemoe --model_args checkpoint=DIR --tasks mobilemoe_python_modules
    python -m mobilemoe.lm_eval_adapter --model mobilemoe --model_args artifact=dist/mobilemoe-tiny-host \\
        --tasks mobilemoe_heldout,mobilemoe_python_modules,mobilemoe_python_docstrings
    (the console script `mobilemoe-lm-eval` is the same command)

lm-eval 0.4 discovers models only through its own registry (no plugin entry points), so this
wrapper registers `mobilemoe` and then runs lm-eval's CLI unchanged; from Python, importing this
module registers it: `lm_eval.simple_evaluate(model="mobilemoe", model_args={"checkpoint": DIR}, ...)`.
model_args: checkpoint=DIR | artifact=DIR, int4=true (checkpoint: simulate INT4 weights), threads=N.

The wrapper also offers the local tasks as lm-eval tasks (no network: datasets are read from local
JSONL files, HF_DATASETS_OFFLINE=1): mobilemoe_heldout (rolling perplexity on
data/corpus/heldout.jsonl, when built) and mobilemoe_NAME for each bundled
mobilemoe/assets/eval_tasks/NAME.jsonl. `task_config(path)` builds such a task for any file.
Scores equal mobilemoe.eval's: both go through mobilemoe.scoring.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .eval import HELDOUT, TASKS_DIR, bundled_tasks, read_task_file
from .scoring import Scorer, open_scorer
from .tokenizer import BOS_ID, EOS, EOS_ID

TASK_PREFIX = "mobilemoe_"


def _flag(value) -> bool:
    return str(value).lower() in ("1", "true", "yes")


@register_model("mobilemoe")
class MobileMoELM(TemplateLM):
    """lm-eval LM over mobilemoe.scoring.Scorer (PyTorch checkpoint or mobilemoe.runtimes artifact)."""

    def __init__(self, checkpoint: str | None = None, artifact: str | None = None, int4=False,
                 threads: int | None = None, max_gen_toks: int = 256, scorer: Scorer | None = None, **unused):
        super().__init__()
        if scorer is None:
            if (checkpoint is None) == (artifact is None):
                raise ValueError("mobilemoe: give exactly one of model_args checkpoint=DIR or artifact=DIR")
            path = Path(checkpoint or artifact)
            if not path.is_dir():
                raise FileNotFoundError(f"mobilemoe: {'checkpoint' if checkpoint else 'artifact'} directory "
                                        f"{path} not found")
            if threads:
                torch.set_num_threads(int(threads))
            scorer = open_scorer(path, int4=_flag(int4), num_threads=int(threads) if threads else None)
        self.scorer = scorer
        self.max_gen_toks = int(max_gen_toks)

    # -- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def prefix_token_id(self) -> int:
        return BOS_ID  # documents start with BOS in training; an empty context is BOS alone

    @property
    def max_length(self) -> int:
        return self.scorer.max_len

    @property
    def tokenizer_name(self) -> str:
        return "mobilemoe-bpe"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.scorer.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.scorer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # requests: ((context, continuation), context ids, continuation ids); sorted by context so
        # the choices of one question reuse one context prefill (the scorer caches the last one)
        order = sorted(range(len(requests)), key=lambda i: requests[i][1])
        out = [None] * len(requests)
        for i in tqdm(order, disable=disable_tqdm or self.rank != 0, desc="mobilemoe loglikelihood"):
            key, context, continuation = requests[i]
            logprobs, greedy = self.scorer.score(context, continuation)
            out[i] = (float(logprobs.sum()), greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="mobilemoe rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text, add_special_tokens=False), self.prefix_token_id, self.max_length, 1)]
            total = sum(lp for lp, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows], True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="mobilemoe generate"):
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kw.get("until"), eos=EOS)
            text = self.scorer.generate(context, until, kw["max_gen_toks"], float(kw.get("temperature", 0.0)),
                                        float(kw.get("top_p", 1.0)), kw.get("seed"))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


# ---------------------------------------------------------------------------- local tasks
def task_config(path, name: str | None = None) -> dict:
    """An lm-eval task for a local JSONL in mobilemoe.eval's format: rolling perplexity for
    {"text"} rows, multiple choice (acc, acc_norm) for {"context", "choices", "label"} rows."""
    path = Path(path).resolve()
    kind = read_task_file(path).kind
    cfg = {"task": name or TASK_PREFIX + path.stem, "dataset_path": "json",
           "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test"}
    if kind == "perplexity":
        return {**cfg, "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
                "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}
    return {**cfg, "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
            "doc_to_target": "label", "target_delimiter": " ",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}


def local_task_configs() -> list[dict]:
    configs = [task_config(HELDOUT, TASK_PREFIX + "heldout")] if HELDOUT.is_file() else []
    return configs + [task_config(TASKS_DIR / f"{t}.jsonl") for t in bundled_tasks()]


def write_task_yamls(out_dir) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for cfg in local_task_configs():
        (out_dir / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out_dir


def main(argv=None) -> None:
    """lm-eval's CLI with `mobilemoe` registered and the local tasks on its include path."""
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSONL only: never reach a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="mobilemoe-lm-eval-") as tmp:
        tasks = write_task_yamls(Path(tmp) / "mobilemoe")
        if "--include_path" in argv:  # lm-eval's CLI takes one include path: put the user's beside ours
            i = argv.index("--include_path") + 1
            shutil.copytree(argv[i], Path(tmp) / "user")
            argv[i] = tmp
        else:
            argv += ["--include_path", str(tasks)]
        sys.argv = ["lm-eval", *argv]
        # deferred on purpose: lm-eval's CLI imports `datasets`, which reads HF_*_OFFLINE (set above) on import
        from lm_eval.__main__ import cli_evaluate
        cli_evaluate()


if __name__ == "__main__":
    main()
