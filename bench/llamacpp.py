"""llama.cpp as a peer: build it, convert our checkpoint to GGUF, check the conversion, run llama-bench.

    python -m bench.llamacpp build                      # the cached build (~15-20 min on 2 cores)
    python -m bench.llamacpp convert --checkpoint DIR   # F16 GGUF + Q4_0 + Q4_0 --pure, checked
    python -m bench.llamacpp bench MODEL.gguf --threads 1,2

Build: llama.cpp as vendored in the `llama-cpp-python` source distribution of the Python index
(`pip download --no-binary :all: --no-deps llama-cpp-python`), CPU only, Release, only the tools
used here: llama-bench, llama-quantize and mobilemoe-logits (bench/llamacpp_src/logits.c, one
llama_decode writing every position's logits, for the conversion check). Static binaries, cached in
~/.cache/mobilemoe/llama.cpp/<version>/ ($MOBILEMOE_CACHE moves the root) with the llama.cpp source
beside them (convert_hf_to_gguf.py and its vendored gguf-py); rebuilt when the CMake flags or
logits.c change (build.json records them). The build runs in a temporary sibling directory renamed
into place when complete, so a killed build leaves no half cache. GGML_NATIVE: the binaries are for
this machine's CPU only.

Conversion: llama.cpp's own convert_hf_to_gguf.py to F16, then llama-quantize to Q4_0 (default
mixture: token embedding and output in Q6_K/Q8_0 etc.) and Q4_0 --pure (every tensor Q4_0, same
bits per weight as our INT4 artifact). The check: llama.cpp's F16 logits vs our PyTorch model on
the same tokens (max |diff| relative to the logit range, top-1 agreement); ConversionError if they
disagree.

bench/peers.py --llama-cpp runs this peer alternating with our artifact (the ratio table).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.generation import generation, prompt_cache
from mobilemoe.runtimes import load_artifact
from mobilemoe.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SDIST = "llama-cpp-python"
TOOLS = ("llama-bench", "llama-quantize", "mobilemoe-logits")
LOGITS_SRC = Path(__file__).resolve().parent / "llamacpp_src" / "logits.c"
COMPLETE = "build.json"  # written last inside the temporary directory: its presence marks a whole build


class LlamaCppError(RuntimeError):
    pass


class ConversionError(LlamaCppError):
    pass


def log(*a):
    print("[llama.cpp]", *a, file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("MOBILEMOE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "mobilemoe") / "llama.cpp"


# ---------------------------------------------------------------------------------------- build

@dataclass(frozen=True)
class Build:
    """One complete cached build: <root>/<version>/{bin/, src/, build.json}."""
    dir: Path

    @property
    def version(self) -> str:
        return self.dir.name

    def tool(self, name: str) -> Path:
        return self.dir / "bin" / name

    @property
    def src(self) -> Path:
        return self.dir / "src"

    @property
    def converter(self) -> Path:
        return self.src / "convert_hf_to_gguf.py"

    def info(self) -> dict:
        return json.loads((self.dir / COMPLETE).read_text())


def build_key() -> dict:
    """What a build depends on besides the llama.cpp version: a change makes cached builds stale."""
    return {"cmake": CMAKE_FLAGS, "logits_c_sha256": hashlib.sha256(LOGITS_SRC.read_bytes()).hexdigest()}


def _current(d: Path) -> bool:
    try:
        info = json.loads((d / COMPLETE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(info.get(k) == v for k, v in build_key().items())


def find_build(version: str | None = None, root: Path | None = None) -> Build | None:
    """The cached build of `version` (None: the newest complete one) made with today's build_key(), or None."""
    root = root or cache_root()
    if not root.is_dir():
        return None
    if version is not None:
        d = root / version
        return Build(d) if _current(d) else None
    done = [d for d in root.iterdir() if not d.name.startswith(".") and _current(d)]
    return Build(max(done, key=lambda d: _version_key(d.name))) if done else None


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in v.replace("-", ".").split("."))


def sdist_version(path: Path) -> str:
    """'llama_cpp_python-0.3.36.tar.gz' -> '0.3.36'."""
    name = path.name
    for suffix in (".tar.gz", ".zip"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    prefix = SDIST.replace("-", "_") + "-"
    if not name.startswith(prefix):
        raise LlamaCppError(f"{path}: not a {SDIST} source distribution (expected {prefix}<version>.tar.gz)")
    return name[len(prefix):]


def download_sdist(dest: Path, version: str | None = None) -> Path:
    """pip download of the llama-cpp-python source distribution (the local index when configured)."""
    spec = f"{SDIST}=={version}" if version else SDIST
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           "-d", str(dest), spec]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(SDIST.replace("-", "_") + "-*.tar.gz"))
    if r.returncode != 0 and not found:
        raise LlamaCppError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    if not found:
        raise LlamaCppError(f"pip download wrote no {SDIST} source distribution into {dest}")
    return found[-1]


def _extract_vendored(sdist: Path, dest: Path) -> None:
    """vendor/llama.cpp of the source distribution -> dest."""
    top = sdist_version(sdist)
    prefix = f"{SDIST.replace('-', '_')}-{top}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
        if not members:
            raise LlamaCppError(f"{sdist}: no {prefix} inside")
        for m in members:
            m.name = m.name[len(prefix):]
            if not m.name:
                continue
            _extract_data(tf, m, dest, sdist)


def _extract_data(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, sdist: Path) -> None:
    """One file or directory, as tarfile's "data" filter extracts it. Python 3.11.0-3.11.3 (Debian 12's
    python3 is 3.11.2) has no extraction filters: there the same checks are made here (inside dest, no
    absolute name, no setuid/setgid/sticky or group/other-write bits)."""
    if hasattr(tarfile, "data_filter"):
        tf.extract(member, dest, filter="data")
        return
    root = Path(dest).resolve()
    if member.name.startswith("/") or not (root / member.name).resolve().is_relative_to(root):
        raise LlamaCppError(f"{sdist}: member {member.name!r} would be written outside {dest}")
    member.mode &= 0o755
    tf.extract(member, dest)


_WRAPPER = """cmake_minimum_required(VERSION 3.21)
project(mobilemoe_llamacpp C CXX)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_subdirectory(${LLAMA_SRC} llama.cpp)
add_executable(mobilemoe-logits ${LOGITS_SRC})
target_link_libraries(mobilemoe-logits PRIVATE llama)
"""

CMAKE_FLAGS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",  # static: the binaries survive the rename into the cache
    "GGML_NATIVE": "ON",  # the host's own ISA: these binaries only ever run here
    "GGML_OPENMP": "ON",
    "GGML_CUDA": "OFF", "GGML_VULKAN": "OFF", "GGML_METAL": "OFF", "GGML_OPENCL": "OFF",
    "LLAMA_BUILD_COMMON": "ON", "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_BUILD_APP": "OFF", "LLAMA_OPENSSL": "OFF", "LLAMA_BUILD_UI": "OFF",
}


def _clear_stale(root: Path) -> None:
    """Temporary directories of builds whose process is gone (killed): removed."""
    for d in [*root.glob(".*.tmp-*"), *root.glob(".*.old-*")]:
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            log(f"removing the partial build {d} (process {pid} is gone)")
            shutil.rmtree(d, ignore_errors=True)


def build(version: str | None = None, sdist: Path | None = None, jobs: int | None = None,
          root: Path | None = None, runner=subprocess.run) -> Build:
    """The cached build for `version` (default: what pip download gives), building it when missing."""
    root = root or cache_root()
    if sdist is None and version is not None and (b := find_build(version, root)):
        return b
    root.mkdir(parents=True, exist_ok=True)
    _clear_stale(root)
    with tempfile.TemporaryDirectory(prefix="llamacpp-sdist-") as dl:
        sdist = sdist or download_sdist(Path(dl), version)
        version = sdist_version(sdist)
        if b := find_build(version, root):
            return b
        final = root / version
        tmp = root / f".{version}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            log(f"building llama.cpp {version} into {final} (CPU, Release; ~15-20 min on 2 cores)")
            t0 = time.time()
            _extract_vendored(sdist, tmp / "src")
            wrap = tmp / "wrap"
            wrap.mkdir()
            (wrap / "CMakeLists.txt").write_text(_WRAPPER)
            bdir = tmp / "build"
            flags = {**CMAKE_FLAGS, "LLAMA_SRC": str(tmp / "src"), "LOGITS_SRC": str(LOGITS_SRC)}
            runner(["cmake", "-S", str(wrap), "-B", str(bdir), "-G", "Ninja",
                    *(f"-D{k}={v}" for k, v in flags.items())], check=True)
            runner(["cmake", "--build", str(bdir), "--target", *TOOLS, "-j", str(jobs or os.cpu_count() or 1)],
                   check=True)
            # the converter's one dependency outside this venv (its sentencepiece import comes first)
            runner([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp / "pydeps"),
                    "sentencepiece>=0.1.98,<0.3.0"], check=True)
            (tmp / "bin").mkdir()
            for t in TOOLS:
                shutil.copy2(bdir / "bin" / t, tmp / "bin" / t)
            shutil.rmtree(bdir)  # objects: ~1 GB, not needed once the static tools are copied
            shutil.rmtree(wrap)
            info = {"version": version, "sdist": sdist.name, "tools": list(TOOLS), **build_key(),
                    "build_seconds": round(time.time() - t0, 1)}
            (tmp / COMPLETE).write_text(json.dumps(info, indent=1) + "\n")
            if final.exists():  # a stale build (other flags or logits.c): moved aside, then removed
                old = root / f".{version}.old-{os.getpid()}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, final)  # atomic: the cache holds a whole build or none
            except OSError:  # another process finished the same version first: keep theirs
                if not (b := find_build(version, root)):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return b
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"built in {time.time() - t0:.0f} s: {final}")
        return Build(final)


# ---------------------------------------------------------------------------------------- convert

QUANTS = {"q4_0": ["Q4_0"], "q4_0-pure": ["--pure", "Q4_0"]}  # name -> llama-quantize arguments
CONVERTER_DRIVER = Path(__file__).resolve().parent / "llamacpp_src" / "convert.py"


def _checkpoint_key(ckpt: Path) -> dict:
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(Path(ckpt).iterdir()) if f.is_file()}


def _atomic_file(out: Path, write) -> Path:
    """write(tmp_path), then one rename to `out` (a killed run leaves only a .tmp-PID file)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _run(cmd: list, what: str, runner=subprocess.run, **kw) -> subprocess.CompletedProcess:
    r = runner([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode:
        raise LlamaCppError(f"{what} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
    return r


def convert(b: Build, ckpt: Path, out_dir: Path, force: bool = False) -> dict[str, Path]:
    """ckpt -> out_dir/{f16,q4_0,q4_0-pure}.gguf with llama.cpp's converter and llama-quantize; reused
    while out_dir/key.json (llama.cpp version, checkpoint files' sizes and times) matches."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"f16": out_dir / "f16.gguf", **{q: out_dir / f"{q}.gguf" for q in QUANTS}}
    key = {"llama.cpp": b.version, "checkpoint": str(Path(ckpt).resolve()), "files": _checkpoint_key(ckpt)}
    key_file = out_dir / "key.json"
    if not force and key_file.is_file() and json.loads(key_file.read_text()) == key \
            and all(f.is_file() for f in files.values()):
        log(f"reusing the GGUF files in {out_dir}")
        return files
    key_file.unlink(missing_ok=True)
    log(f"converting {ckpt} to F16 GGUF (llama.cpp {b.version} convert_hf_to_gguf.py)")
    _atomic_file(files["f16"], lambda tmp: _run(
        [sys.executable, CONVERTER_DRIVER, b.src, ckpt, "--outtype", "f16", "--outfile", tmp], "convert_hf_to_gguf.py"))
    for q, args in QUANTS.items():
        log(f"llama-quantize {' '.join(args)} -> {files[q].name}")
        _atomic_file(files[q], lambda tmp, args=args: _run(
            [b.tool("llama-quantize"), *args[:-1], files["f16"], tmp, args[-1]], "llama-quantize"))
    key_file.write_text(json.dumps(key, indent=1) + "\n")
    return files


# ---------------------------------------------------------------------------------------- check

MAX_REL_ERR = 0.02  # max |logit diff| / logit range, F16 weights vs our float32 model
MIN_TOP1 = 0.95


def llama_logits(b: Build, gguf: Path, ids: list[int], threads: int = 2) -> "np.ndarray":
    """llama.cpp's logits of every position of `ids` (one llama_decode): [len(ids), n_vocab] float32."""
    with tempfile.TemporaryDirectory(prefix="llamacpp-logits-") as d:
        tok, out = Path(d) / "tokens.txt", Path(d) / "logits.f32"
        tok.write_text(" ".join(map(str, ids)) + "\n")
        r = _run([b.tool("mobilemoe-logits"), gguf, tok, out, threads], "mobilemoe-logits")
        n, vocab = map(int, r.stdout.split()[-2:])
        return np.fromfile(out, dtype=np.float32).reshape(n, vocab)


def check_tokens(ckpt: Path, cfg, n: int = 64) -> list[int]:
    """BOS + the real-text sample (tests/data) when the checkpoint has a tokenizer, else seeded random ids."""
    sample = ROOT / "tests" / "data" / "heldout_sample.txt"
    if (Path(ckpt) / "tokenizer.json").is_file() and sample.is_file():
        ids = load_tokenizer(Path(ckpt) / "tokenizer.json").encode(sample.read_text()).ids
        return [cfg.bos_token_id, *[t % cfg.vocab_size for t in ids[: n - 1]]]
    return [int(i) for i in np.random.default_rng(0).integers(3, cfg.vocab_size, size=n)]


def compare_logits(ref, got) -> dict:
    """Our PyTorch logits vs llama.cpp's, both [n, vocab]: max |diff|, relative to the logit range, top-1."""
    if ref.shape != got.shape:
        raise ConversionError(f"logits shapes differ: ours {tuple(ref.shape)}, llama.cpp {tuple(got.shape)}")
    diff = float(np.abs(ref - got).max())
    span = float(ref.max() - ref.min())
    return {"tokens": int(ref.shape[0]), "max_abs_diff": diff, "logit_range": span, "rel_err": diff / max(span, 1e-9),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def conversion_check(b: Build, f16: Path, ckpt: Path, n: int = 64, threads: int = 2) -> dict:
    """llama.cpp's F16 logits vs our PyTorch model (float32) on the same tokens; ConversionError unless
    top-1 agreement >= MIN_TOP1 and max |diff| <= MAX_REL_ERR of the logit range."""
    import torch  # deferred: torch (and the checkpoint loader) only for the conversion check

    from mobilemoe.checkpoint import load_checkpoint  # deferred: imports torch
    model = load_checkpoint(ckpt).float().eval()
    ids = check_tokens(ckpt, model.config, n)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0].float().numpy()  # [n, vocab]
    r = compare_logits(ref, llama_logits(b, f16, ids, threads))
    r["ok"] = r["top1_agreement"] >= MIN_TOP1 and r["rel_err"] <= MAX_REL_ERR
    line = (f"conversion check ({f16.name} vs PyTorch float32, {r['tokens']} tokens): top-1 agreement "
            f"{r['top1_agreement']:.3f}, max |logit diff| {r['max_abs_diff']:.3e} (logit range {r['logit_range']:.2f}, "
            f"{100 * r['rel_err']:.2f}%)")
    print(line, flush=True)
    if not r["ok"]:
        raise ConversionError(f"{line}: llama.cpp's conversion of {ckpt} disagrees with our model (want top-1 >= "
                              f"{MIN_TOP1}, max |diff| <= {100 * MAX_REL_ERR:.0f}% of the range)")
    return r


# ---------------------------------------------------------------------------------------- llama-bench

def llama_bench_cmd(b: Build, models: list[Path], threads: int, prompts=(128, 512), gen: int = 128,
                    repeats: int = 1) -> list[str]:
    """llama-bench over `models` (one process): pp<prompts> and tg<gen> at `threads`, JSON out."""
    return [str(b.tool("llama-bench")), *(x for m in models for x in ("-m", str(m))),
            "-p", ",".join(map(str, prompts)), "-n", str(gen), "-t", str(threads), "-r", str(repeats), "-o", "json"]


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench -o json -> [{"model": file name, "test": "pp512" | "tg128", "threads", "tok_s": [samples]}]."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench output is not JSON ({e}): {text[:300]!r}") from None
    out = []
    for r in rows:
        missing = [k for k in ("model_filename", "n_prompt", "n_gen", "n_threads", "samples_ts") if k not in r]
        if missing:
            raise LlamaCppError(f"llama-bench JSON row without {', '.join(missing)}: {r}")
        if r["n_prompt"] and r["n_gen"]:
            test = f"pp{r['n_prompt']}+tg{r['n_gen']}"
        else:
            test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        if r.get("n_depth"):
            test += f"@d{r['n_depth']}"
        out.append({"model": Path(r["model_filename"]).name, "test": test, "threads": int(r["n_threads"]),
                    "tok_s": [float(x) for x in r["samples_ts"]]})
    return out


def run_llama_bench(b: Build, models: list[Path], threads: int, prompts=(128, 512), gen: int = 128,
                    repeats: int = 1) -> list[dict]:
    """llama-bench's rows (parse_llama_bench), each with the run's CPU time / wall time (load, warm-up
    included): near `threads` when the cores were its own."""
    def cpu():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    c0, w0 = cpu(), time.perf_counter()
    rows = parse_llama_bench(_run(llama_bench_cmd(b, models, threads, prompts, gen, repeats), "llama-bench").stdout)
    cpu_per_wall = (cpu() - c0) / (time.perf_counter() - w0)
    return [{**r, "cpu_per_wall": cpu_per_wall} for r in rows]


# ---------------------------------------------------------------------------------------- ours

def ours_round(rt, prompts=(128, 512), gen: int = 128, context: int = 1) -> dict:
    """One timed round of our artifact, llama-bench's tests: {"pp128": tok/s, ..., "tg128": tok/s}.

    pp<n>: one prefill of n random tokens (rt.step(ids, None)); tg<gen>: `gen` decode steps in a row
    from a cache of `context` tokens (compiler/generation.py: greedy feedback, the cache growing),
    as llama-bench's tg runs from an empty context."""
    vocab = rt.config.vocab_size
    out = {}
    for n in prompts:
        ids = [int(i) for i in np.random.default_rng(n).integers(3, vocab, size=n)]
        t0 = time.perf_counter()
        rt.step(ids, None)
        out[f"pp{n}"] = n / (time.perf_counter() - t0)
    kv, token = prompt_cache(rt.step, vocab, context)
    out[f"tg{gen}"] = generation(rt.step, kv, token, gen, repeats=1, warmup=0)["tok_s"]
    return out


def ours_worker(artifact: Path, threads: int, prompts, gen: int) -> None:
    """A process holding our artifact at `threads` (TVM's pool size is fixed per process): one warm-up
    round, then one timed round per 'round' line on stdin, its JSON on stdout."""
    rt = load_artifact(artifact, num_threads=threads)
    ours_round(rt, prompts, gen)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        c0, w0 = time.process_time(), time.perf_counter()
        r = ours_round(rt, prompts, gen)
        r["cpu_per_wall"] = (time.process_time() - c0) / (time.perf_counter() - w0)
        print(json.dumps(r), flush=True)


class OursProcess:
    """`python -m bench.llamacpp _ours` in a child process (cwd: the repo), one round per call."""

    def __init__(self, artifact: Path, threads: int, prompts, gen: int):
        env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        self.p = subprocess.Popen([sys.executable, "-m", "bench.llamacpp", "_ours", str(artifact),
                                   "--threads", str(threads), "--prompts", ",".join(map(str, prompts)),
                                   "--gen", str(gen)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env, cwd=ROOT)
        self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise LlamaCppError(f"our artifact's benchmark process exited (code {self.p.wait()}); see its stderr above")
        return json.loads(line)

    def round(self) -> dict:
        self.p.stdin.write("round\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


# ---------------------------------------------------------------------------------------- compare

def stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def alternate(rounds: int, threads_list, llama_fn, ours_fn) -> list[dict]:
    """`rounds` rounds per thread count, llama.cpp and ours alternating (the order swapped every round so
    that a drifting load touches both alike) -> [{"threads", "round", "llama": rows, "ours": figures}]."""
    out = []
    for t in threads_list:
        for r in range(rounds):
            res = {"threads": t, "round": r, "load_average": os.getloadavg()[0]}
            order = ("llama", "ours") if r % 2 == 0 else ("ours", "llama")
            for who in order:
                res[who] = llama_fn(t) if who == "llama" else ours_fn(t)
            out.append(res)
    return out


def summarize(rounds: list[dict], tests, quants) -> list[dict]:
    """Per (threads, test): medians and spreads of ours and of each llama.cpp model, and the ratios."""
    table = []
    for t in sorted({r["threads"] for r in rounds}):
        rs = [r for r in rounds if r["threads"] == t]
        for test in tests:
            row = {"threads": t, "test": test, "ours": stats([r["ours"][test] for r in rs])}
            for q in quants:
                samples = [s for r in rs for x in r["llama"] if x["test"] == test and x["model"] == f"{q}.gguf"
                           for s in x["tok_s"]]
                if not samples:
                    raise LlamaCppError(f"llama-bench gave no {test} figure for {q}.gguf at {t} thread(s)")
                row[q] = stats(samples)
                row[f"ours_over_{q}"] = row["ours"]["median"] / row[q]["median"]
            table.append(row)
    return table


def _fig(s: dict) -> str:
    return f"{s['median']:.1f} [{s['min']:.1f}..{s['max']:.1f}]"


def format_table(table: list[dict], quants, note: str = "") -> str:
    """The ratio table: ours / llama.cpp per test and thread count (tok/s: median [min..max] of the rounds)."""
    w = 26
    head = f"{'test':<8}{'threads':>8}  {'ours tok/s':>{w}}" + "".join(f"  {q + ' tok/s':>{w}}" for q in quants)
    head += "".join(f"{'ours/' + q:>16}" for q in quants)
    lines = [head]
    for r in table:
        line = f"{r['test']:<8}{r['threads']:>8}  {_fig(r['ours']):>{w}}"
        line += "".join(f"  {_fig(r[q]):>{w}}" for q in quants)
        line += "".join(f"{r[f'ours_over_{q}']:>15.2f}x" for q in quants)
        lines.append(line)
    if note:
        lines.append(note)
    return "\n".join(lines)


def compare(b: Build, artifact: Path, ggufs: dict[str, Path], threads_list=(1, 2), rounds: int = 5,
            prompts=(128, 512), gen: int = 128, quants=tuple(QUANTS)) -> dict:
    """Our artifact vs llama.cpp (llama-bench on each of `quants`), `rounds` alternating rounds per thread
    count; our artifact runs in one warmed-up child process per thread count."""
    models = [ggufs[q] for q in quants]
    load = [os.getloadavg()[0]]
    all_rounds = []
    for t in threads_list:
        log(f"loading our artifact at {t} thread(s), one warm-up round")
        ours = OursProcess(artifact, t, prompts, gen)
        try:
            log(f"{rounds} alternating rounds at {t} thread(s): llama-bench ({', '.join(quants)}) and ours")
            all_rounds += alternate(rounds, [t], lambda t: run_llama_bench(b, models, t, prompts, gen),
                                    lambda t: ours.round())
        finally:
            ours.close()
    load.append(os.getloadavg()[0])
    tests = [f"pp{n}" for n in prompts] + [f"tg{gen}"]
    return {"rounds": all_rounds, "table": summarize(all_rounds, tests, quants), "quants": list(quants),
            "threads": list(threads_list), "repeats": rounds, "load_average": load,
            "load_average_rounds": [r["load_average"] for r in all_rounds], "cores": os.cpu_count()}


def load_note(res: dict) -> str:
    """Rounds, load average and, per thread count, each side's CPU time / wall time (min..max over rounds)."""
    la = res["load_average_rounds"]
    lines = [f"{res['repeats']} alternating rounds per thread count (llama-bench -r 1 and one round of ours each); "
             f"load average {min(la):.2f}..{max(la):.2f} during the rounds on {res['cores']} cores (this run's own "
             f"threads included)"]
    for t in res["threads"]:
        rs = [r for r in res["rounds"] if r["threads"] == t]
        ours = [r["ours"].get("cpu_per_wall") for r in rs if r["ours"].get("cpu_per_wall") is not None]
        llama = [r["llama"][0]["cpu_per_wall"] for r in rs if r["llama"] and "cpu_per_wall" in r["llama"][0]]
        if ours and llama:
            shared = min(ours + llama) < 0.9 * t
            lines.append(f"CPU/wall at {t} thread(s): ours {min(ours):.2f}..{max(ours):.2f}, llama-bench "
                         f"{min(llama):.2f}..{max(llama):.2f}: " + ("the cores were shared with other processes, "
                                                                  "treat small ratios as noise" if shared else "ok"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the peer run

def random_checkpoint(preset: str, out: Path) -> Path:
    """A checkpoint of the preset's shapes with random weights (bfloat16), written once and reused:
    our artifact and llama.cpp then run the same weights."""
    from compiler.build import shape_only_model  # deferred: imports TVM and torch, the --preset path only
    from mobilemoe.checkpoint import CheckpointError, read_config, save_checkpoint  # deferred: imports torch
    model = shape_only_model(preset)
    try:
        if read_config(out).to_dict() == model.config.to_dict():
            log(f"reusing {out} (random weights of {preset})")
            return out
    except (CheckpointError, OSError, ValueError):
        pass
    import torch  # deferred: torch only to write the random weights
    log(f"writing {out}: {preset} with random weights (bfloat16)")
    with torch.no_grad():
        model.reset_parameters()
    return save_checkpoint(model, out, dtype=torch.bfloat16)


def peer_run(a, ckpt: Path | None, name: str, label: str) -> dict:
    """bench/peers.py --llama-cpp: build (cached) llama.cpp, convert the checkpoint (or a random-weight
    checkpoint of --preset), check the conversion, alternate llama-bench with our host artifact; print
    the ratio table."""
    from bench import common  # deferred: imports torch; the build and llama-bench parts need none
    b = find_build() or build()
    log(f"llama.cpp {b.version}: {b.dir}")
    if ckpt is None:
        ckpt = random_checkpoint(a.preset, Path(a.work) / f"{name}-random-checkpoint")
        name = f"{name}-random"
    cfg = common.model_config(None, ckpt)
    if cfg.max_seq_len < max(a.llama_prompts) or cfg.max_seq_len < a.llama_gen + 1:
        raise LlamaCppError(f"{ckpt}: max_seq_len {cfg.max_seq_len} is below the prompt lengths "
                            f"{a.llama_prompts} / {a.llama_gen} decode steps")
    artifact = common.cached_artifact(a.work, f"{name}-host", "host", None, ckpt, rebuild=a.rebuild)
    ggufs = convert(b, ckpt, Path(a.work) / f"{name}-gguf", force=a.rebuild)
    check = conversion_check(b, ggufs["f16"], ckpt)
    res = compare(b, artifact, ggufs, a.llama_threads, a.rounds, tuple(a.llama_prompts), a.llama_gen)
    print(f"model: {label}; ours: TVM host INT4 artifact ({artifact}); llama.cpp {b.version} (llama-bench, "
          f"CPU): {', '.join(res['quants'])} of llama.cpp's own F16 conversion")
    print(f"tok/s as median [min..max] over the rounds; tg{a.llama_gen}: ours decodes as generation runs "
          f"(compiler/generation.py, {a.llama_gen} steps from a 1-token cache); pp<n>: one prefill of n tokens")
    print(format_table(res["table"], res["quants"], load_note(res)))
    out = {"model": label, "checkpoint": str(ckpt), "artifact": str(artifact), "llama.cpp": b.info(),
           "gguf": {k: str(v) for k, v in ggufs.items()}, "conversion_check": check, **res}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


def add_peer_args(p: argparse.ArgumentParser) -> None:
    """bench/peers.py's options for this peer."""
    g = p.add_argument_group("llama.cpp peer (bench/llamacpp.py)")
    g.add_argument("--llama-cpp", action="store_true",
                   help="our host artifact vs llama.cpp Q4_0 and Q4_0 --pure, alternating rounds (builds llama.cpp "
                        "once, ~15-20 min on 2 cores, cached in ~/.cache/mobilemoe/llama.cpp)")
    g.add_argument("--llama-threads", type=_ints, default=[1, 2], help="thread counts (default 1,2)")
    g.add_argument("--rounds", type=int, default=5, help="alternating rounds per thread count (default 5)")
    g.add_argument("--llama-prompts", type=_ints, default=[128, 512], help="llama-bench -p (default 128,512)")
    g.add_argument("--llama-gen", type=int, default=128, help="llama-bench -n (default 128)")


def _ints(v: str) -> list[int]:
    try:
        out = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {v!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {v!r}")
    return out


# ---------------------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("build", help="build (or find) the cached llama.cpp")
    s.add_argument("--version", default=None, help=f"{SDIST} version (default: what pip download gives)")
    s.add_argument("--sdist", type=Path, default=None, help="a downloaded source distribution")
    s.add_argument("--jobs", type=int, default=None)
    s = sub.add_parser("convert", help="checkpoint -> F16, Q4_0, Q4_0 --pure GGUF, and the conversion check")
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--force", action="store_true")
    s = sub.add_parser("bench", help="llama-bench on GGUF files (JSON rows on stdout)")
    s.add_argument("models", type=Path, nargs="+")
    s.add_argument("--threads", type=_ints, default=[1, 2])
    s.add_argument("--prompts", type=_ints, default=[128, 512])
    s.add_argument("--gen", type=int, default=128)
    s.add_argument("--repeats", type=int, default=3)
    s = sub.add_parser("_ours", help=argparse.SUPPRESS)  # OursProcess's child
    s.add_argument("artifact", type=Path)
    s.add_argument("--threads", type=int, required=True)
    s.add_argument("--prompts", type=_ints, required=True)
    s.add_argument("--gen", type=int, required=True)
    a = p.parse_args(argv)
    try:
        if a.cmd == "_ours":
            return ours_worker(a.artifact, a.threads, a.prompts, a.gen)
        if a.cmd == "build":
            b = build(a.version, a.sdist, a.jobs)
            print(json.dumps({"dir": str(b.dir), **b.info()}, indent=1))
            return
        b = find_build()
        if b is None:
            sys.exit(f"error: no llama.cpp build in {cache_root()}: run `python -m bench.llamacpp build` first")
        if a.cmd == "convert":
            files = convert(b, a.checkpoint, a.out, a.force)
            conversion_check(b, files["f16"], a.checkpoint)
            for k, f in files.items():
                print(f"{k}: {f} ({f.stat().st_size / 1e6:.1f} MB)")
        elif a.cmd == "bench":
            for t in a.threads:
                for row in run_llama_bench(b, a.models, t, a.prompts, a.gen, a.repeats):
                    print(json.dumps({**row, **{k: v for k, v in stats(row["tok_s"]).items()}}))
    except LlamaCppError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
