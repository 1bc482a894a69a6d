"""Checkpoint I/O: a Hugging Face checkpoint directory, ours or one that transformers wrote.

    <dir>/config.json         HF config; ours (GraniteMoeShared for MoE, Llama for dense) also holds
                              our own config under the "mobilemoe" key
    <dir>/model.safetensors   weights under HF names, float32 / bfloat16 / float16; or sharded:
    <dir>/model.safetensors.index.json + the shards it names ("weight_map": tensor -> file)
    <dir>/tokenizer.json      (+ tokenizer_config.json) when there is a tokenizer

An imported checkpoint written back (a fine-tuned one: train/) keeps its own config.json (dtype
updated) and its tokenizer / chat template / generation files (TOKENIZER_FILES), so transformers
reopens it under its own architecture.

Which architecture a directory holds, how its config.json becomes a MobileMoEConfig and which HF
tensor makes which of our parameters is the business of its family in mobilemoe/arch/ (found by
the config's "model_type"; the tensor names are listed in each family's docstring). Loading checks
every tensor's name and shape against what the config implies before reading any.

Writes are atomic: everything goes to a temp dir beside the target, then one rename. Only JSON and
safetensors are read: nothing is unpickled, no remote code is run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import arch
from .arch.tensors import from_hf, to_hf
from .config import ConfigError, MobileMoEConfig
from .model import MobileMoE, rope_table
from .tokenizer import write_hf_tokenizer_files

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# what an imported checkpoint carries beside its weights and config: copied as they are when it is written back
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
# tensors a checkpoint may hold that no parameter reads (HF's RoPE buffers of old versions)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or disagrees with its config (message names which)."""


# ---------------------------------------------------------------------------- name mapping (mobilemoe/arch)
def tensor_map(cfg: MobileMoEConfig) -> dict:
    return arch.family_for(cfg.arch).tensor_map(cfg)


def to_hf_state_dict(model: MobileMoE) -> dict[str, torch.Tensor]:
    sd = dict(model.named_parameters(remove_duplicate=False))
    return to_hf(tensor_map(model.config), sd)


def from_hf_state_dict(cfg: MobileMoEConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of to_hf_state_dict: HF names -> our state_dict (shapes checked by the caller)."""
    sd = from_hf(tensor_map(cfg), hf.__getitem__)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    return sd


def expected_hf_shapes(cfg: MobileMoEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape: computed from the config."""
    with torch.device("meta"):
        model = MobileMoE(cfg)
    return {k: tuple(v.shape) for k, v in to_hf_state_dict(model).items()}


def hf_config(cfg: MobileMoEConfig, dtype: torch.dtype) -> dict:
    family = arch.family_for(cfg.arch)
    if family.hf_config is None:
        writable = sorted(t for t, f in arch.REGISTRY.items() if f.hf_config is not None)
        raise CheckpointError(f"config field 'arch': writing '{cfg.arch}' checkpoints is not supported "
                              f"(loading is); writable: {', '.join(writable)}")
    return family.hf_config(cfg, dtype)


# ---------------------------------------------------------------------------- atomic directory writes
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID` siblings of `target` left by writers that were
    killed (their PID is gone); a live writer's temp dir is kept. Returns what was removed."""
    removed = []
    for p in Path(target).parent.glob(f".{Path(target).name}.*"):
        m = re.fullmatch(rf"\.{re.escape(Path(target).name)}\.(?:tmp|old)-(\d+)(?:-.*)?", p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def shape_only_model(preset: str | MobileMoEConfig):
    """A model of a preset's shapes (a name, a config JSON path or a config) whose weights are never
    initialised (pages untouched): for random-weight builds of paper-scale presets, and for the graph
    of a checkpoint build whose weights are read lazily (LazyCheckpoint)."""
    cfg = preset if isinstance(preset, MobileMoEConfig) else MobileMoEConfig.from_name(preset)  # name or JSON path
    with torch.device("meta"):
        model = MobileMoE(cfg)
    model = model.to_empty(device="cpu")
    model.rope_cos, model.rope_sin = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling())
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def atomic_dir(target: Path, write) -> Path:
    """Run write(tmp_dir), then move tmp_dir to `target` in one rename (an old target is replaced).
    Temp dirs of earlier writers of the same target that were killed are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o644 | (f.stat().st_mode & 0o111))
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def imported_config(ckpt_dir) -> dict | None:
    """An imported (plain HF) checkpoint's config.json as written; None for ours (the `mobilemoe` block)."""
    raw = json.loads((Path(ckpt_dir) / CONFIG_NAME).read_text())
    return None if arch.OWN_BLOCK in raw else raw


def imported_files(ckpt_dir) -> dict[str, bytes]:
    """The TOKENIZER_FILES an imported checkpoint has, to write back beside its weights."""
    d = Path(ckpt_dir)
    return {name: (d / name).read_bytes() for name in TOKENIZER_FILES if (d / name).is_file()}


def kept_config(raw: dict, cfg: MobileMoEConfig, dtype: torch.dtype, source: str = "source config") -> dict:
    """An imported model's own config.json `raw` for writing it back: as it was, with the new dtype.
    The model's config must still be the one `raw` describes."""
    try:
        same = arch.config_from_hf(raw, source).replace(name=cfg.name) == cfg
    except ConfigError:
        same = False
    if not same:
        raise CheckpointError(f"{source}: describes another model than the one being saved ({cfg.name}); "
                              f"cannot keep it as the config")
    keys = [k for k in ("torch_dtype", "dtype") if k in raw] or ["torch_dtype"]  # transformers 4 / 5 names
    return {**raw, **{k: str(dtype).removeprefix("torch.") for k in keys}}


def save_checkpoint(model: MobileMoE, out_dir, tokenizer=None, dtype: torch.dtype = torch.float32,
                    extra_files: dict[str, bytes] | None = None, base_config: dict | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) atomically to out_dir. base_config:
    the config.json of the imported checkpoint the model came from, written instead of the one the
    model's family would write (kept_config)."""
    config = (hf_config(model.config, dtype) if base_config is None
              else kept_config(base_config, model.config, dtype))
    sd = {k: v.to(dtype).cpu() for k, v in to_hf_state_dict(model).items()}

    def write(tmp: Path):
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "mobilemoe"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            write_hf_tokenizer_files(tokenizer, tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return atomic_dir(Path(out_dir), write)


def weight_files(d: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (one file, or the shards of an index)."""
    single, index = d / WEIGHTS_NAME, d / INDEX_NAME
    if single.is_file():
        return {}
    if not index.is_file():
        pickled = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
        hint = (f"; found {pickled[:2]}: pickle files are never read, re-save with safe_serialization=True"
                if pickled else "")
        raise CheckpointError(f"{single}: missing weights file (nor {INDEX_NAME}){hint}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
    files = {name: d / f for name, f in weight_map.items()}
    for f in sorted(set(files.values())):
        if not f.is_file() or f.parent != d:
            raise CheckpointError(f"{index}: shard '{f.name}' is missing from {d}")
    return files


def index_tensors(d: Path, expected: dict[str, tuple], cfg_path: Path) -> dict[str, Path]:
    """{HF tensor name: the file holding it} for the expected tensors, after checking every name and
    shape (errors name file and tensor); no tensor is read."""
    files = weight_files(d)
    by_file: dict[Path, list[str]] = {}
    if not files:  # one file: its own table of contents
        try:
            with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
                by_file[d / WEIGHTS_NAME] = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{d / WEIGHTS_NAME}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    else:
        for name, f in files.items():
            by_file.setdefault(f, []).append(name)
    names = {n for ns in by_file.values() for n in ns}
    optional = {"lm_head.weight"} if "lm_head.weight" not in expected else set()  # tied: may be stored too
    unused = {n for n in names if n.endswith(IGNORED_SUFFIXES)} | (names & optional)
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected) - unused)
    where = d / (WEIGHTS_NAME if not files else INDEX_NAME)
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors do not match {cfg_path} — missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    index = {}
    for path, file_names in sorted(by_file.items()):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in sorted(set(file_names) & set(expected)):
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(f"{path}: tensor '{name}' has shape {list(shape)}, "
                                              f"config expects {list(expected[name])}")
                    index[name] = path
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return index


def _read(path: Path, names) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None


def read_tensors(d: Path, expected: dict[str, tuple], cfg_path: Path) -> dict[str, torch.Tensor]:
    """Read the expected tensors after checking every name and shape (errors name file and tensor)."""
    by_file: dict[Path, list[str]] = {}
    for name, path in index_tensors(d, expected, cfg_path).items():
        by_file.setdefault(path, []).append(name)
    hf = {}
    for path, names in sorted(by_file.items()):
        hf.update(_read(path, names))
    return hf


class LazyCheckpoint:
    """A checkpoint's weights by our parameter name, each read from its safetensors file when asked for
    (as load_checkpoint would hold it, in `dtype`) and not kept: a build streams a model of any size
    tensor by tensor (compiler/params.py). Names and shapes are checked when it is opened, as
    load_checkpoint checks them."""

    def __init__(self, ckpt_dir, dtype: torch.dtype = torch.float32):
        d = Path(ckpt_dir)
        self.config = cfg = read_config(d)
        self.dtype = dtype
        self.index = index_tensors(d, expected_hf_shapes(cfg), d / CONFIG_NAME)
        self.tmap = dict(tensor_map(cfg))
        if cfg.tie_embeddings:
            self.tmap["lm_head.weight"] = self.tmap["embed.weight"]

    def __contains__(self, name) -> bool:
        return name in self.tmap

    def __iter__(self):
        return iter(self.tmap)

    def __len__(self) -> int:
        return len(self.tmap)

    def __getitem__(self, name) -> torch.Tensor:
        sd = from_hf({name: self.tmap[name]}, lambda hf: _read(self.index[hf], [hf])[hf])
        return sd[name].to(self.dtype)


def read_config(ckpt_dir) -> MobileMoEConfig:
    """The MobileMoEConfig of a checkpoint directory (ours or a supported HF architecture)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a checkpoint needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        cfg = arch.config_from_hf(raw, str(cfg_path))
        arch.family_for(cfg.arch, f"{cfg_path}: field 'arch'")  # a block naming an unknown family
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if not (isinstance(raw, dict) and arch.OWN_BLOCK in raw):
        cfg.name = d.resolve().name  # an imported model is named after its directory
    return cfg


def load_state(ckpt_dir) -> tuple[MobileMoEConfig, dict[str, torch.Tensor]]:
    """Read and validate a checkpoint: our config + our state_dict (float tensors as stored)."""
    cfg = read_config(ckpt_dir)
    d = Path(ckpt_dir)
    hf = read_tensors(d, expected_hf_shapes(cfg), d / CONFIG_NAME)
    return cfg, from_hf_state_dict(cfg, hf)


def load_checkpoint(ckpt_dir, dtype: torch.dtype = torch.float32, device="cpu") -> MobileMoE:
    cfg, sd = load_state(ckpt_dir)
    with torch.device("meta"):
        model = MobileMoE(cfg)
    model = model.to_empty(device=device)
    # non-persistent RoPE buffers are not in the file: recompute them
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta,
                                                                         cfg.rope_scaling()))
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(dtype).eval()
