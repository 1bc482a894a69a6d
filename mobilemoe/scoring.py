"""Log-probabilities of text under a checkpoint or a compiled artifact: what evaluation is built on.

    scorer = open_scorer("mobilemoe/assets/default-model")     # checkpoint dir (config.json + weights)
    scorer = open_scorer("dist/mobilemoe-tiny-host")           # artifact dir (manifest.json)
    ctx, cont = scorer.encode_pair("The module that parses JSON is", " json")
    logprobs, greedy = scorer.score(ctx, cont)                 # per-token logprobs [C], all-argmax?

Both kinds sit behind one two-call interface (`TorchLM`, `ArtifactLM`):
    last(ids, kv) -> (logits [V] of the last position, kv)     # prefill the context
    each(ids, kv) -> (logits [S, V] of every position, kv)     # teacher forcing over a continuation
An artifact returns only last-position logits, so its `each` is one decode step per token.

Scoring rules (the same as lm-eval's causal models, so scores from either path agree):
  - text is encoded as BOS + tokens; a continuation's tokens are encode(ctx + cont) minus encode(ctx),
    with trailing whitespace of the context moved to the continuation;
  - a sequence longer than max_seq_len keeps its last tokens (the context is cut on the left);
  - a long text is scored in rolling windows of max_seq_len predictions (`rolling_windows`), each
    window seeing as much context as fits; every token after BOS is predicted exactly once.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .checkpoint import INDEX_NAME, load_checkpoint
from .generate import sample
from .quant import simulate_int4
from .runtimes import load_artifact
from .tokenizer import BOS_ID, STOP_TOKEN_IDS, load_tokenizer


class TorchLM:
    """A PyTorch MobileMoE (float, or INT4 simulated with mobilemoe.quant.simulate_int4)."""

    def __init__(self, model):
        self.model = model.eval()
        self.config = model.config
        self.device = model.embed.weight.device

    @torch.no_grad()
    def last(self, ids: list[int], kv=None):
        logits, kv = self.model(torch.tensor([ids], device=self.device), kv=kv, last_only=True)
        return logits[0, -1].float().cpu(), kv  # [V] (on the CPU: the scorer's maths)

    @torch.no_grad()
    def each(self, ids: list[int], kv=None):
        logits, kv = self.model(torch.tensor([ids], device=self.device), kv=kv)
        return logits[0].float().cpu(), kv  # [S, V]


class ArtifactLM:
    """A compiled artifact opened with mobilemoe.runtimes (TVM host, ONNX Runtime, IREE)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.config = runtime.config

    def last(self, ids: list[int], kv=None):
        logits, kv = self.runtime.step(list(ids), kv)
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)), kv

    def each(self, ids: list[int], kv=None):
        rows = []
        for t in ids:  # one decode step per token: the artifact returns the last position only
            logits, kv = self.last([t], kv)
            rows.append(logits)
        return torch.stack(rows), kv  # [S, V]


def kind_of(path) -> str:
    """'artifact' (manifest.json) or 'checkpoint' (config.json + model.safetensors, or the sharded
    model.safetensors.index.json) for a directory."""
    d = Path(path)
    if (d / "manifest.json").is_file():
        return "artifact"
    if (d / "config.json").is_file() and ((d / "model.safetensors").is_file() or (d / INDEX_NAME).is_file()):
        return "checkpoint"
    raise FileNotFoundError(f"{d}: neither an artifact (no manifest.json) nor a checkpoint "
                            f"(needs config.json and model.safetensors or {INDEX_NAME})")


class Scorer:
    """Token-level scoring and greedy/sampled generation over a TorchLM or ArtifactLM."""

    def __init__(self, lm, tokenizer, label: str = "", kind: str = ""):
        self.lm, self.tokenizer, self.label, self.kind = lm, tokenizer, label, kind
        self.max_len = lm.config.max_seq_len
        self._cached = (None, None)  # (context ids, (last logits, kv)): choices share their context

    # -- tokens
    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([BOS_ID] if bos else []) + self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (BOS first) and continuation ids, split as lm-eval splits them."""
        if not context:
            return [BOS_ID], self.encode(continuation, bos=False)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # -- scoring
    def score(self, context: list[int], continuation: list[int]) -> tuple[np.ndarray, bool]:
        """logprobs [C] of each continuation token after `context`, and whether greedy decoding
        would produce the whole continuation."""
        if not continuation:
            raise ValueError("score: the continuation is empty (it must hold at least one token)")
        if len(continuation) > self.max_len:
            raise ValueError(f"score: continuation of {len(continuation)} tokens exceeds max_seq_len "
                             f"{self.max_len}; score it in windows (rolling_windows)")
        whole = (context + continuation)[-(self.max_len + 1):]  # the last id is only predicted
        context = whole[:len(whole) - len(continuation)]
        if self._cached[0] != context:
            self._cached = (context, self.lm.last(context))
        first, kv = self._cached[1]
        logits = first[None]
        if len(continuation) > 1:
            logits = torch.cat([logits, self.lm.each(continuation[:-1], kv)[0]])  # [C, V]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation)
        picked = logprobs.gather(1, target[:, None])[:, 0].double().numpy()
        return picked, bool((logits.argmax(-1) == target).all())

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        logprobs, greedy = self.score(*self.encode_pair(context, continuation))
        return float(logprobs.sum()), greedy

    def rolling_logprob(self, text: str) -> tuple[float, int]:
        """Sum of logprobs of every token of BOS + text after BOS, and how many tokens that is."""
        ids = self.encode(text)
        total = 0.0
        for context, continuation in rolling_windows(ids, self.max_len):
            total += float(self.score(context, continuation)[0].sum())
        return total, len(ids) - 1

    # -- generation
    def generate(self, context: str, until: list[str], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> str:
        """Text after `context` up to (not including) the first `until` string or a stop token."""
        ids = self.encode(context)[-max(self.max_len - max_new_tokens, 1):]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out, kv, text = [], None, ""
        logits, kv = self.lm.last(ids, kv)
        for _ in range(min(max_new_tokens, self.max_len - len(ids))):
            token = sample(logits, temperature, top_p, gen)
            if token in STOP_TOKEN_IDS:
                break
            out.append(token)
            text = self.decode(out)
            if any(u and u in text for u in until):
                break
            logits, kv = self.lm.last([token], kv)
        for u in until:
            if u:
                text = text.split(u)[0]
        return text


def rolling_windows(ids: list[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs predicting ids[1:] exactly once, max_len predictions each:
    every window feeds context + continuation[:-1] (<= max_len tokens) with the most context that fits."""
    windows = []
    for start in range(1, len(ids), max_len):
        end = min(start + max_len, len(ids))
        windows.append((ids[max(0, end - 1 - max_len):start], ids[start:end]))
    return windows


def open_scorer(path, int4: bool = False, num_threads: int | None = None, device: str = "cpu") -> Scorer:
    """A Scorer for a checkpoint or artifact directory (kind_of decides). int4: checkpoints only,
    every INT4 weight replaced by dequant(quantize(w)) (mobilemoe.quant.simulate_int4). device: where
    a checkpoint's model runs (an artifact runs on its own runtime's device)."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "artifact":
        if int4:
            raise ValueError(f"{path}: int4 simulation applies to checkpoints; an artifact is already compiled")
        rt = load_artifact(path, num_threads)
        backend = json.loads((path / "manifest.json").read_text()).get("backend", "artifact")
        return Scorer(ArtifactLM(rt), rt.tokenizer(), label=path.name, kind=backend)
    model = load_checkpoint(path)
    if int4:
        model = simulate_int4(model)
    model = model.to(device)
    tok_file = path / "tokenizer.json"
    tokenizer = load_tokenizer(tok_file if tok_file.is_file() else None)
    return Scorer(TorchLM(model), tokenizer, label=path.name + (" int4" if int4 else ""),
                  kind="checkpoint-int4" if int4 else "checkpoint")
