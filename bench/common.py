"""What the performance scripts (roofline.py, moe_vs_dense.py, peers.py) share.

- cached builds: `cached_artifact` builds an artifact once into a work directory (in a subprocess,
  holding /tmp/mobilemoe-big.lock for paper-size models) and reuses it while its manifest and the
  compiler sources still match;
- accounting: `decode_bytes` (what one decode step must read: weights, scales, KV cache) and
  `prefill_flops`, both from an artifact's parameter shapes and config.
How they measure (threads, timing, the conditions printed with a result) is bench/measure.py.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from mobilemoe.artifact import PARAMS_NAME, ArtifactError, read_manifest, verify
from mobilemoe.checkpoint import read_config
from mobilemoe.config import MobileMoEConfig, load_config
from targets import get_target

ROOT = Path(__file__).resolve().parents[1]

BIG_LOCK = Path("/tmp/mobilemoe-big.lock")
BIG_PARAMS = 500e6  # builds of models above this (~9 min, ~8 GB RSS) never run two at once
DEFAULT_WORK = ROOT / ".cache" / "bench"
# what a build depends on besides its inputs: a change here makes cached artifacts stale
BUILD_SOURCES = ("compiler", "tir_kernels", "passes", "targets", "mobilemoe/model.py", "mobilemoe/quant.py",
                 "mobilemoe/export.py", "mobilemoe/config.py")
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "I64": 8}
KV_BYTES = 4  # the KV cache is float32 ([L, 2, 1, nkv, P, D], mobilemoe/model.py)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lengths(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def add_args(p: argparse.ArgumentParser, prompts: str = "128,512", contexts: str = "128,1024") -> None:
    """Measurement options (bench/decode.py's names; --contexts takes a list)."""
    p.add_argument("--prompt-lens", type=lengths, default=lengths(prompts), help=f"prefill lengths (default {prompts})")
    p.add_argument("--contexts", type=lengths, default=lengths(contexts), help=f"decode contexts (default {contexts})")
    p.add_argument("--decode-tokens", type=int, default=128,
                   help="decode steps in a row per repeat, the cache growing (llama-bench tg; default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up; the median is kept")
    p.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"build cache (default {DEFAULT_WORK})")
    p.add_argument("--rebuild", action="store_true", help="rebuild artifacts even if the cached ones match")


def sources_digest() -> str:
    h = hashlib.sha256()
    for top in BUILD_SOURCES:
        path = ROOT / top
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def model_config(preset: str | None, checkpoint: Path | None):
    """The config of a preset (a name or a config JSON path, as compiler.build --preset) or checkpoint."""
    if preset is None:
        return read_config(checkpoint)  # ours or an imported HF architecture (mobilemoe/arch)
    if preset.endswith(".json") or Path(preset).is_file():
        return load_config(preset)
    return MobileMoEConfig.from_name(preset)


@contextlib.contextmanager
def big_build_lock(cfg):
    """Hold /tmp/mobilemoe-big.lock while building a paper-size model (one such build at a time)."""
    if cfg.total_params() < BIG_PARAMS:
        yield
        return
    while True:
        f = open(BIG_LOCK, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {BIG_LOCK}: another paper-size build is running (one at a time)")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:  # the holder before us may have removed the file: then this lock guards nothing, retry
            if os.fstat(f.fileno()).st_ino == os.stat(BIG_LOCK).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        BIG_LOCK.unlink(missing_ok=True)  # while still held: a waiter then sees a removed file and retries
        f.close()


def cached_artifact(work: Path, name: str, target: str, preset: str | None = None, checkpoint: Path | None = None,
                    ort_accuracy_level: int | None = None, rebuild: bool = False, kv_cache: str | None = None,
                    extra_args: tuple[str, ...] = ()) -> Path:
    """work/name: the artifact of (target, preset | checkpoint), built by `python -m compiler.build`
    unless one is there whose manifest (backend, target, CPU, config, weights) and build key (compiler
    sources, checkpoint files, options, extra_args: more compiler.build arguments) match."""

    cfg = model_config(preset, checkpoint)
    out = Path(work) / name
    key = {"target": target, "preset": preset, "ort_accuracy_level": ort_accuracy_level, "kv_cache": kv_cache,
           "extra_args": list(extra_args), "sources": sources_digest(),
           "checkpoint": None if preset else {f.name: [f.stat().st_size, f.stat().st_mtime_ns]
                                              for f in sorted(Path(checkpoint).iterdir()) if f.is_file()}}
    key_file = out.parent / f"{name}.build-key.json"
    why = "--rebuild" if rebuild else None
    try:
        m = read_manifest(out)
        want = {"backend": "onnx" if target == "onnx" else "tvm", "config": cfg.to_dict(),
                "weights": "random" if preset else "checkpoint"}
        have = {"backend": m.get("backend"), "config": m.get("config"),
                "weights": "random" if "random" in str(m.get("weights", "")) else "checkpoint"}
        if target == "host":
            want["cpu"], have["cpu"] = get_target("host").json().get("mcpu"), m["target"]["tvm"].get("mcpu")
        old_key = json.loads(key_file.read_text()) if key_file.is_file() else None
        why = why or next((f"manifest {k} differs" for k in want if want[k] != have[k]), None)
        why = why or next((f"{k} changed since the build" for k in key if (old_key or {}).get(k) != key[k]), None)
        if why is None:
            verify(out)
            log(f"reusing {out} (built {time.strftime('%Y-%m-%d %H:%M', time.localtime(key_file.stat().st_mtime))})")
            return out
    except ArtifactError as e:
        why = why or str(e)
    log(f"building {out} ({why})")
    cmd = [sys.executable, "-m", "compiler.build", "--target", target, "--out", str(out)]
    cmd += ["--preset", preset] if preset else ["--checkpoint", str(checkpoint)]
    if ort_accuracy_level is not None:
        cmd += ["--ort-accuracy-level", str(ort_accuracy_level)]
    if kv_cache is not None:  # TVM: decode's KV cache (compiler.build --kv-cache; default inplace)
        cmd += ["--kv-cache", kv_cache]
    cmd += list(extra_args)
    with big_build_lock(cfg):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if done.returncode:  # its stderr without the progress bars
            lines = [ln for ln in done.stderr.replace("\r", "\n").splitlines() if "%|" not in ln and ln.strip()]
            sys.exit(f"error: `{' '.join(cmd)}` failed:\n" + "\n".join(lines[-40:]))
    log(f"built {out} in {time.perf_counter() - t0:.0f}s")
    key_file.write_text(json.dumps(key, indent=1) + "\n")
    return out


def param_shapes(artifact: Path) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """{name: (shape, safetensors dtype, layer part)} of an artifact's params.safetensors (header
    only); the parts are the manifest's (decode's param_parts: model modules, MoE operand roles)."""
    path = Path(artifact) / PARAMS_NAME
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (decode bytes are counted from a TVM artifact's parameters)")
    parts = read_manifest(artifact)["entry_points"]["decode"].get("param_parts")
    if parts is None:
        raise ArtifactError(f"{Path(artifact) / 'manifest.json'}: entry_points.decode has no param_parts (built "
                            f"before they were recorded): rebuild the artifact")
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: (tuple(v["shape"]), v["dtype"], parts.get(k, "other")) for k, v in header.items() if k != "__metadata__"}


def decode_bytes(params: dict[str, tuple[tuple[int, ...], str]], cfg, ctx: float) -> dict:
    """Bytes one decode step at context `ctx` must read from memory, by part.

    params: {name: (shape, dtype, part)} (param_shapes). Every parameter is read fully (INT4 codes +
    fp16 scales; router and norms float) except: the routed experts (part "routed experts", stacked
    [E, ...]) top_k / E of them; the embedding one row (its own tensor's row, or the tied LM head's,
    which the head reads fully besides). KV cache: keys and values of every layer at `ctx` positions, float32."""
    parts = {"int4_codes": 0.0, "int4_scales": 0.0, "float": 0.0, "routed_experts": 0.0, "embedding_row": 0.0}
    embed_rows = None
    for name, (shape, dtype, part) in params.items():
        n = math.prod(shape) * DTYPE_BYTES[dtype]
        if part == "embedding":
            parts["embedding_row"] += n / shape[0]
        elif part == "routed experts" and shape[0] == cfg.num_experts:
            parts["routed_experts"] += n * cfg.top_k / cfg.num_experts
        elif dtype in ("U32", "U8", "I8"):
            parts["int4_codes"] += n
        elif dtype in ("F16", "BF16") and name.endswith("__s"):
            parts["int4_scales"] += n
        else:
            parts["float"] += n
        if cfg.tie_embeddings and part == "lm head":
            embed_rows = (embed_rows or 0.0) + n / shape[0]
    if embed_rows is not None and not any(p == "embedding" for _, _, p in params.values()):
        parts["embedding_row"] += embed_rows  # tied: the lookup reads one row of the LM head
    parts["kv_cache"] = 2 * cfg.num_layers * cfg.num_kv_heads * ctx * cfg.head_dim * KV_BYTES
    parts["weights"] = sum(v for k, v in parts.items() if k != "kv_cache")
    parts["total"] = parts["weights"] + parts["kv_cache"]
    # mobilemoe.config's accounting: INT4 bytes of active Linear weights (incl. the LM head) + float
    parts["config_weights"] = cfg.int4_active_bytes()
    return parts


def prefill_flops(cfg, n: int) -> dict:
    """FLOPs of an n-token prefill: mobilemoe.config's per-token accounting (2 x active matmul params +
    QK^T/PV at (n+1)/2 keys on average) x n, less the LM head for all but the last token (the
    artifact's prefill returns the last position's logits only)."""
    per_token = cfg.flops_per_token(n, prefill=True)
    head = 2 * cfg.vocab_size * cfg.hidden_size
    return {"config_x_tokens": per_token * n, "needed": (per_token - head) * n + head}


