"""`python -m compiler.bench --artifact DIR`: prefill and decode speed of an artifact, here or on a device.

    python -m compiler.bench --artifact DIR
        [--rpc-tracker HOST:PORT --rpc-key KEY]   run on the device registered with the tracker
        [--prompts 16,64,256] [--contexts 16,128,512] [--decode-steps 64]
        [--warmup 1] [--repeats 5] [--json OUT] [--profile]

Loads the artifact (hash-verified; over RPC the library is uploaded and the weights copied to the
device), then measures:
    prefill   for each prompt length: TTFT (one prefill call, logits back on the host), prefill tok/s
    decode    for each context length, as generation runs (compiler/generation.py): after a prompt of
              that length, --decode-steps consecutive steps with the cache growing, each step's
              argmax fed back; tok/s = steps / their time (llama-bench's tg), the median over the
              repeats with its spread. Beside it, labelled "single step": one step from the same
              fixed cache, repeated (the cache never grows). Per step also: minor page faults (all
              steps, and the steady state: each run's second half), the Python loop's time outside
              the entry call, and (this machine only) the time outside kernels: step time less the
              kernel time of an instrumented step, with the VM's allocation calls per step
each as the median over --repeats runs after --warmup runs, with the spread (min..max). Also the
load time and, when this machine runs the model, the process's peak RSS. --profile adds the
per-kernel breakdown of one prefill and one decode call grouped by layer part (compiler/profile.py)
as a table and in the JSON (on this machine only: the VM instrument it uses is a Python callback,
which TVM 0.27's RPC cannot pass to a device).

With --json, the JSON is rewritten after every measurement: a device that drops mid-run ends the
run with an error naming it, and the JSON keeps every result measured before ("error" says why,
"complete" is false).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mobilemoe.artifact import ArtifactError, verify
from mobilemoe.runtimes import load_artifact
from mobilemoe.runtimes.rpc_session import LOST_SESSION, DeviceError
from targets.rpc_device import parse_tracker, request_session

from .generation import describe, measure_context
from .profile import format_report, group, profile_call

DEFAULT_PROMPTS = (16, 64, 256)
DEFAULT_CONTEXTS = (16, 128, 512)


def _stats(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "n": len(samples)}


def _timed(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _stats(samples)


class Bench:
    """The measurements of one run; `save()` writes them (atomically) after each step."""

    def __init__(self, artifact: Path, json_out: Path | None):
        self.json_out = json_out
        self.result = {"artifact": str(artifact), "complete": False, "error": None, "prefill": [], "decode": []}

    def save(self) -> None:
        if self.json_out is None:
            return
        tmp = self.json_out.with_suffix(self.json_out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=1) + "\n")
        os.replace(tmp, self.json_out)


def _prompt(vocab: int, n: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(n).integers(1, vocab, size=n)]


def _profile(rt, entry: str, ids: list[int], kv, manifest: dict) -> dict:
    past = kv.length
    rows, wall = profile_call(rt.vm, rt.lib, rt.device, entry, rt.entry_args(ids, kv))
    report = group(rows, manifest["entry_points"][entry].get("kernel_calls"))
    return {"entry": entry, "tokens": len(ids), "context": past, "wall_s": wall, **report}


def run(artifact, rpc=None, prompts=DEFAULT_PROMPTS, contexts=DEFAULT_CONTEXTS, decode_steps: int = 64,
        warmup: int = 1, repeats: int = 5, json_out=None, profile: bool = False, log=print) -> dict:
    """Benchmark `artifact` (here, or on the device of rpc=(host, port, key)); -> the results dict."""
    artifact = Path(artifact)
    bench = Bench(artifact, Path(json_out) if json_out else None)
    res = bench.result
    manifest = verify(artifact)
    res.update(model=manifest.get("model"), target=manifest["target"]["name"], tuning=bool(manifest.get("tuning")))
    try:
        start = time.perf_counter()
        if rpc is None:
            rt, session, res["where"] = load_artifact(artifact), None, "this machine"
        else:
            session = request_session(*rpc, timeout=60)
            rt, res["where"] = load_artifact(artifact, session=session), session.device_name
        res["load_s"] = time.perf_counter() - start
        log(f"{artifact.name} on {res['where']}: loaded in {res['load_s']:.2f}s")
        bench.save()
        cfg = rt.config
        for n in [p for p in prompts if p <= cfg.max_seq_len]:
            ids = _prompt(cfg.vocab_size, n)
            s = _timed(lambda: rt.prefill(ids), warmup, repeats)
            res["prefill"].append({"tokens": n, "ttft": s, "tok_s": n / s["median_s"]})
            log(f"  prefill {n:>5} tokens: TTFT {s['median_s'] * 1e3:8.2f} ms "
                f"({s['min_s'] * 1e3:.2f}..{s['max_s'] * 1e3:.2f})  {n / s['median_s']:9.1f} tok/s")
            bench.save()
        for c in [c for c in contexts if c + decode_steps <= cfg.max_seq_len]:  # every run starts at depth c
            r = measure_context(rt, c, decode_steps, repeats, warmup, single_repeats=max(8, repeats * 4))
            r["tok_s"] = r["generation"]["tok_s"]  # the headline figure: generation
            r["token"] = r["single_step"]  # one step from a fixed cache (labelled "single step")
            res["decode"].append(r)
            log("  " + describe(r))
            bench.save()
        if profile and rpc is not None:  # the instrument is a host callback: TVM 0.27 RPC passes none
            res["profile"] = {"error": "per-kernel profiling needs a VM instrument callback, which TVM 0.27's RPC "
                                       "cannot pass to the device; profile a host build instead"}
            log(f"  profile: skipped ({res['profile']['error']})")
        elif profile:
            ids = _prompt(cfg.vocab_size, min(prompts[0], cfg.max_seq_len - 1))
            # one call of the entry point: no longer than the runtime's prefill chunk (a budget's expert
            # cache routes at most that many tokens at once)
            ids = ids[:getattr(rt, "prefill_chunk", None) or len(ids)]
            fits = [c for c in contexts if c < cfg.max_seq_len]  # decode is profiled at the longest context
            _, kv = rt.prefill(_prompt(cfg.vocab_size, max(fits))) if fits else rt.prefill(ids)
            empty = rt._empty_kv
            res["profile"] = [_profile(rt, "prefill", ids, empty, manifest), _profile(rt, "decode", [7], kv, manifest)]
            for p in res["profile"]:
                log(format_report(f"profile {p['entry']} ({p['tokens']} tokens, context {p['context']})", p))
            bench.save()
        if rpc is None:  # ru_maxrss: KiB on Linux; the whole process (Python, TVM, weights, KV cache)
            res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            log(f"  peak RSS {res['peak_rss_mb']:.0f} MB")
        res["complete"] = True
    except Exception as err:  # noqa: BLE001 - keep what was measured, say why it stopped
        if rpc is not None and not isinstance(err, DeviceError) and any(m in str(err) for m in LOST_SESSION):
            last = str(err).strip().splitlines()[-1]
            err = DeviceError(f"{res.get('where', 'the RPC device')} was lost during the benchmark (server killed, "
                              f"crashed or session timed out): {last}")
        res["error"] = f"{type(err).__name__}: {err}"
        bench.save()
        raise err
    finally:
        bench.save()
        rt = session = None  # noqa: F841 - frees the RPC session: the device is free for the next client
        gc.collect()
    return res


def main(argv=None):
    def lengths(value: str) -> tuple[int, ...]:
        return tuple(int(v) for v in value.split(",") if v)

    p = argparse.ArgumentParser(prog="python -m compiler.bench", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--rpc-tracker", type=parse_tracker, default=None, metavar="HOST:PORT")
    p.add_argument("--rpc-key", default=None)
    p.add_argument("--prompts", type=lengths, default=DEFAULT_PROMPTS)
    p.add_argument("--contexts", type=lengths, default=DEFAULT_CONTEXTS)
    p.add_argument("--decode-steps", type=int, default=64, help="consecutive decode steps per run (default 64)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    if (a.rpc_tracker is None) != (a.rpc_key is None):
        p.error("--rpc-tracker and --rpc-key go together")
    rpc = (*a.rpc_tracker, a.rpc_key) if a.rpc_tracker else None
    try:
        run(a.artifact, rpc, a.prompts, a.contexts, a.decode_steps, a.warmup, a.repeats, a.json, a.profile)
    except (ArtifactError, DeviceError, FileNotFoundError, ValueError) as e:
        kept = f"; results so far are in {a.json}" if a.json else ""
        sys.exit(f"error: {e}{kept}")


if __name__ == "__main__":
    main()
