"""`python -m bench.residency`: a MoE under a memory budget (compiler.build --memory-budget-mb), measured.

    python -m bench.residency [--checkpoint DIR | --preset NAME] [--budgets 1,0.75,0.5,0.25,min]
        [--prompt-tokens 64] [--decode-tokens 64] [--text FILE] [--threads 1] [--out DIR] [--work DIR]
    python -m bench.residency --policies --cal FILE --text FILE     # cache policies' hit rates (simulated)

A script that prints tables, not a timed test. For each budget (a share of the routed experts' bytes
on top of the non-expert weights; "min": one layer's top-k experts) it builds the budgeted host
artifact (cached, bench/common.py) and runs it in a fresh process: a warm-up generation (which
fills the expert cache), then a timed prefill of --prompt-tokens tokens of --text and
--decode-tokens greedy decode steps. Reported per run: prefill and decode tok/s, the expert cache's
hit rate over those steps, peak RSS (VmHWM) and peak RSS over the process's RSS before the
artifact was loaded, and the memory cgroup's peak charge. Modes:
    warm   the expert file in the page cache (standing in for fast phone storage)
    cold   the expert file evicted (posix_fadvise DONTNEED) after the warm-up, before the timed steps
           (the cache's slots stay: the misses read storage)
    mmap   the baseline: the fully resident artifact's weights mmapped from one file (page aligned;
           not read up front), unmapped (madvise DONTNEED) and evicted the same way, under the same
           memory limit: what the limit makes it drop, it reads again from storage; it runs as the
           budgeted artifact does (TVMRuntime.keep_to_budget: the KV cache at the planned context,
           prompts in the same chunks), so only where the weights live differs
Every budget plans for the context the timed run reaches (compiler.build --budget-context
prompt + decode tokens).
Memory limit: RLIMIT_RSS is not enforced by Linux and RLIMIT_AS counts address space, not residency,
so each run goes into its own memory cgroup (v1, created under this process's own cgroup and removed
after): the run moves in after its imports, so the limit charges what it allocates and the page cache
it reads from then on, but not the pages it maps that were cached before (the TVM runtime's and
lib.so's code, which the budget's reserve counts and RSS shows): measured on the resident run (its
RSS growth less its cgroup charge, the params file cached beforehand), that share is taken off every
limit, so the limit is the budget + 1% + 1 MB of slack in RSS terms for every mode (the cgroup also
charges what RSS does not show: page tables, 0.2% of the pages, kernel stacks, slab). The budget is the model's whole memory (weights,
expert cache, the runtime's reserve for KV cache, activations and code: compiler/residency.py), so
the table's "RSS / budget" (the peak resident memory the run added over its imports, VmHWM - VmRSS
before loading, over the budget) says whether the plan held. Page cache read before the move (warm
mode) is not charged: it stands in for storage. A run killed by the limit reads "OOM".
Writes OUT/residency.json and OUT/residency.png (decode tok/s vs budget).
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tabulate import tabulate

from bench.common import DEFAULT_WORK, ROOT, cached_artifact, log, model_config
from bench.residency_policies import main as policies
from compiler.residency import MB, PREFILL_CHUNK, budget_mb_for, weight_bytes
from mobilemoe.artifact import PARAMS_NAME, read_manifest
from mobilemoe.generate import DEFAULT_MODEL_DIR
from mobilemoe.kv_cache import capacity_for
from mobilemoe.tokenizer import load_tokenizer

DEFAULT_TEXT = ROOT / "tests" / "data" / "heldout_sample.txt"  # held out from the bundled model's training
ALIGN = 4096


# ---------------------------------------------------------------------------------------- the runs
def aligned_weights(artifact: Path) -> Path:
    """<artifact>.weights.bin (+ .json index): params.safetensors with every tensor page aligned, so
    TVM can take the mmapped bytes in place (from_dlpack needs 64-byte alignment). Written once."""

    out = artifact.parent / f"{artifact.name}.weights.bin"
    if out.is_file() and out.with_suffix(".json").is_file():
        return out
    index, at = {}, 0
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for name, a in load_file(str(artifact / PARAMS_NAME)).items():
            at = -(-at // ALIGN) * ALIGN
            f.seek(at)
            f.write(a.tobytes())
            index[name] = {"offset": at, "dtype": str(a.dtype), "shape": list(a.shape)}
            at += a.nbytes
    out.with_suffix(".json").write_text(json.dumps(index))
    os.replace(tmp, out)
    return out


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _into_page_cache(path: Path) -> None:
    """Read `path` through one reused 1 MB buffer: its pages land in the page cache, not in this process."""
    buf = bytearray(MB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes: VmRSS (now), VmHWM (peak of this program: unlike
    ru_maxrss, not inherited from the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(a) -> None:
    """One run (in its own process): print one JSON line of figures."""
    import tvm  # deferred on purpose: the parent process never loads TVM

    from mobilemoe.runtimes.tvm_local import TVMRuntime  # deferred with tvm

    class MmapRuntime(TVMRuntime):
        """The resident artifact with its weights mmapped in place from the aligned file."""

        def _load_params(self):
            index = json.loads(Path(a.weights).with_suffix(".json").read_text())
            self._mm = np.memmap(a.weights, np.uint8, mode="c")  # private: TVM needs writable buffers
            return {n: tvm.runtime.from_dlpack(self._mm[t["offset"]:t["offset"] + int(np.prod(t["shape"], dtype=np.int64))
                                                         * np.dtype(t["dtype"]).itemsize]
                                               .view(t["dtype"]).reshape(t["shape"]))
                    for n, t in index.items()}

    ids = json.loads(a.ids)
    file = Path(a.weights) if a.mode == "mmap" else Path(a.artifact) / "experts.bin"
    if a.mode != "mmap":  # read into the process's own memory at load (charged there), its page cache not
        _into_page_cache(Path(a.artifact) / "params.safetensors")
    if a.mode == "warm" and file.is_file():
        _into_page_cache(file)  # charged outside the run's cgroup
    elif file.is_file():
        _evict(file)
    rss0 = _status("VmRSS")
    if a.cgroup:
        Path(a.cgroup, "cgroup.procs").write_text(str(os.getpid()))
    t0 = time.perf_counter()
    rt = (MmapRuntime if a.mode == "mmap" else TVMRuntime)(a.artifact, num_threads=a.threads)
    if a.mode == "mmap":  # the same runtime discipline as the budgeted artifact: only the weights' residency differs
        rt.keep_to_budget(capacity_for(a.prompt_tokens + a.decode_tokens), PREFILL_CHUNK)
    load_s = time.perf_counter() - t0
    prompt, warm = ids[:a.prompt_tokens], ids[a.prompt_tokens:2 * a.prompt_tokens]
    rt.generate(warm, a.decode_tokens // 2)  # fills the expert cache
    if a.mode == "mmap":  # its pages are mapped: unmap them first, or the page cache keeps them
        rt._mm._mmap.madvise(mmap.MADV_DONTNEED)
    if a.mode != "warm" and file.is_file():
        _evict(file)
    if rt.experts is not None:
        rt.experts.reset_stats()
    t0 = time.perf_counter()
    logits, kv = rt.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    prefill_stats = rt.experts.stats() if rt.experts is not None else None
    if rt.experts is not None:
        rt.experts.reset_stats()
    t0 = time.perf_counter()
    for _ in range(a.decode_tokens):
        logits, kv = rt.decode(int(np.argmax(logits)), kv)
    decode_s = time.perf_counter() - t0
    print(json.dumps({"prefill_tok_s": len(prompt) / prefill_s, "decode_tok_s": a.decode_tokens / decode_s,
                      "hit_rate": rt.experts.stats()["hit_rate"] if rt.experts is not None else None,
                      "prefill_hit_rate": prefill_stats["hit_rate"] if prefill_stats else None,
                      "peak_rss": _status("VmHWM"), "rss0": rss0,
                      "load_s": load_s}))


class MemoryCgroup:
    """A memory cgroup (v1) under this process's own, with a limit; removed on exit."""

    def __init__(self, limit: int | None):
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in x)
        self.path = Path("/sys/fs/cgroup/memory" + line.split(":", 2)[2]) / f"bench-residency-{os.getpid()}"
        self.limit = limit

    def __enter__(self):
        self.path.mkdir()
        if self.limit is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        return self

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def __exit__(self, *exc):
        for _ in range(50):  # the run's process has exited; the kernel may take a moment to let go
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_once(artifact: Path, mode: str, ids: list[int], a, limit: int | None, weights: Path | None = None) -> dict:
    """One run in a fresh process under a memory cgroup of `limit` bytes (None: unlimited)."""
    with MemoryCgroup(limit) as cg:
        cmd = [sys.executable, "-m", "bench.residency", "--child", "--artifact", str(artifact), "--mode", mode,
               "--ids", json.dumps(ids), "--prompt-tokens", str(a.prompt_tokens), "--decode-tokens",
               str(a.decode_tokens), "--threads", str(a.threads), "--cgroup", str(cg.path),
               "--weights", str(weights or "")]
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.run_timeout)
        except subprocess.TimeoutExpired:  # thrashing under the limit: subprocess.run killed it
            log(f"{artifact.name} {mode}: over {a.run_timeout}s")
            return {"error": f">{a.run_timeout}s"}
        if done.returncode:
            log(f"{artifact.name} {mode}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            return {"error": "OOM" if done.returncode in (-9, 137) else f"exit {done.returncode}"}
        return {**json.loads(done.stdout.strip().splitlines()[-1]), "cgroup_peak": cg.peak()}


def run(artifact: Path, mode: str, ids: list[int], a, limit: int | None, weights: Path | None = None) -> dict:
    """--repeats runs: the median tok/s, the highest peaks (the first failure ends it)."""
    runs = []
    for _ in range(a.repeats):
        runs.append(run_once(artifact, mode, ids, a, limit, weights))
        if "error" in runs[-1]:
            return runs[-1]
    out = dict(runs[0])
    for key in ("prefill_tok_s", "decode_tok_s"):
        out[key] = float(np.median([r[key] for r in runs]))
        out[key + "_range"] = [min(r[key] for r in runs), max(r[key] for r in runs)]
    for key in ("peak_rss", "cgroup_peak"):
        out[key] = max(r[key] for r in runs)
    return out


# ----------------------------------------------------------------------------------- the tables
def budgets(cfg, shares: list[str]) -> list[tuple[str, int]]:
    """(label, experts held) per --budgets entry: a share of all routed experts, or "min" (top_k)."""
    _, _, layers = weight_bytes(cfg)
    total = layers * cfg.num_experts
    return [("min", cfg.top_k) if s == "min" else (f"{float(s):.0%}", max(cfg.top_k, round(float(s) * total)))
            for s in shares]


def plot(rows: list[dict], resident: dict, path: Path, title: str) -> None:
    import matplotlib  # deferred on purpose: only the plot needs it, and the backend must be set first
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred with matplotlib, after use("Agg")

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for mode, style in (("warm", "o-"), ("cold", "s--"), ("mmap", "x:")):
        pts = [(r["budget_mb"], r["decode_tok_s"]) for r in rows if r["mode"] == mode and "decode_tok_s" in r]
        if pts:
            ax.plot(*zip(*sorted(pts)), style, label={"mmap": "plain mmap (cold, same limit)"}.get(mode, f"expert cache, {mode}"))
    if "decode_tok_s" in resident:
        ax.axhline(resident["decode_tok_s"], color="grey", lw=1, label="fully resident")
    ax.set(xlabel="memory budget (MB: weights, expert cache, runtime reserve)", ylabel="decode tok/s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(a) -> None:
    cfg = model_config(a.preset, a.checkpoint)
    tok = load_tokenizer((a.checkpoint if not a.preset else DEFAULT_MODEL_DIR) / "tokenizer.json")
    ids = [cfg.bos_token_id] + tok.encode(Path(a.text).read_text()).ids
    ids = [i % cfg.vocab_size for i in ids][:2 * a.prompt_tokens]
    src = {"preset": a.preset} if a.preset else {"checkpoint": a.checkpoint}
    resident = cached_artifact(a.work, f"{cfg.name}-host", "host", **src)
    weights = aligned_weights(resident)
    log(f"{cfg.name}: resident artifact, no limit")
    base = run(resident, "warm", ids, a, None)
    # what the run maps from pages cached before (code): in its RSS, never charged to its cgroup
    uncharged = max(0, base["peak_rss"] - base["rss0"] - base["cgroup_peak"])
    rest, one, layers = weight_bytes(cfg)
    rows = []
    context = a.prompt_tokens + a.decode_tokens  # what the timed run reaches; the budgets plan for it
    for label, n in budgets(cfg, a.budgets):
        mb = budget_mb_for(cfg, n, context)
        art = cached_artifact(a.work, f"{cfg.name}-host-e{n}-c{context}", "host", **src,
                              extra_args=("--memory-budget-mb", f"{math.ceil(mb * 1e6) / 1e6:.6f}",  # not below
                                          "--budget-context", str(context)))
        # the budget holds the runtime too (compiler/residency.py); slack of 1 MB + 1% for what the cgroup charges
        # beyond the run's pages (page tables: 0.2% of them, kernel stacks, slab); less what it cannot see
        limit = int(mb * MB * 1.01) + MB - uncharged
        for mode in ("warm", "cold", "mmap"):
            log(f"{label} ({mb:.2f} MB, {n} experts): {mode}")
            r = run(resident if mode == "mmap" else art, mode, ids, a, limit, weights if mode == "mmap" else None)
            rows.append({"budget": label, "budget_mb": mb, "slots": n, "mode": mode, "limit_mb": limit / MB, **r})
    conditions = (f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (2 shared cores), "
                  f"threads {a.threads}, median of {a.repeats}; limits = budget x 1.01 + 1 MB - {uncharged / MB:.1f} MB "
                  f"of cached code pages the cgroup does not charge")
    table = [[r["budget"], f"{r['budget_mb']:.2f}", r["slots"], r["mode"],
              *([f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
                 "-" if r["hit_rate"] is None else f"{r['hit_rate']:.1%}", f"{r['peak_rss'] / MB:.0f}",
                 f"{(r['peak_rss'] - r['rss0']) / MB:.1f}",
                 f"{(r['peak_rss'] - r['rss0']) / MB / r['budget_mb']:.2f}", f"{r['cgroup_peak'] / MB:.1f}"]
                if "error" not in r else [r["error"]] * 7), f"{r['limit_mb']:.1f}"] for r in rows]
    full = budget_mb_for(cfg, layers * cfg.num_experts, context)  # everything resident, the same runtime reserve
    table.insert(0, ["resident", f"{full:.2f}", layers * cfg.num_experts,
                     "-", f"{base['prefill_tok_s']:.0f}", f"{base['decode_tok_s']:.1f}", "-",
                     f"{base['peak_rss'] / MB:.0f}", f"{(base['peak_rss'] - base['rss0']) / MB:.1f}",
                     f"{(base['peak_rss'] - base['rss0']) / MB / full:.2f}", f"{base['cgroup_peak'] / MB:.1f}", "none"])
    print(f"\n{cfg.name}{' (random weights: near-uniform routing, the worst case)' if a.preset else ''}: "
          f"prompt {a.prompt_tokens}, decode {a.decode_tokens} tokens of {Path(a.text).name}; {conditions}")
    print(tabulate(table, headers=["budget", "MB", "slots", "mode", "prefill tok/s", "decode tok/s", "hit rate",
                                   "peak RSS MB", "RSS over base MB", "RSS / budget", "cgroup peak MB", "limit MB"]))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "residency.json").write_text(json.dumps({"model": cfg.name, "conditions": conditions,
                                                      "resident": base, "rows": rows}, indent=1) + "\n")
    plot(rows, base, a.out / "residency.png", f"{cfg.name}: decode under a memory budget\n" + conditions.replace("; ", "\n"))
    log(f"wrote {a.out / 'residency.json'} and {a.out / 'residency.png'}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.residency", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--preset", default=None, help="a preset's shapes with random weights instead")
    p.add_argument("--budgets", type=lambda v: v.split(","), default="1,0.75,0.5,0.25,min".split(","))
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs per point (fresh processes); median tok/s")
    p.add_argument("--run-timeout", type=int, default=240, help="seconds a run may take (thrashing mmap runs)")
    p.add_argument("--out", type=Path, default=Path("dist/residency"))
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--policies", action="store_true", help="simulate cache policies' hit rates instead")
    p.add_argument("--cal", type=Path, default=None, help="--policies: the text the pinned set's statistics come from")
    p.add_argument("--policy-tokens", type=int, default=12000)
    for name in ("--child", "--artifact", "--mode", "--ids", "--cgroup", "--weights"):  # one run (internal)
        p.add_argument(name, **({"action": "store_true"} if name == "--child" else {"default": None}),
                       help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    if a.policies:
        return policies(a)
    measure(a)


if __name__ == "__main__":
    main()
