"""Checkpoint I/O: a directory that Hugging Face transformers (and llama.cpp's converter) opens.

    <dir>/config.json         HF config (GraniteMoeSharedForCausalLM for MoE, LlamaForCausalLM for
                              dense) + our own config under the "mobilemoe" key
    <dir>/model.safetensors   weights under HF names (below), float32 or bfloat16
    <dir>/tokenizer.json      (+ tokenizer_config.json) when a tokenizer is given

HF tensor names (layer i) and how they map to ours:
    model.embed_tokens.weight                              embed.weight            [V, H]
    lm_head.weight (only when not tied)                     lm_head.weight          [V, H]
    model.norm.weight                                       norm.weight             [H]
    model.layers.i.input_layernorm.weight                   layers.i.attn_norm.weight
    model.layers.i.post_attention_layernorm.weight          layers.i.ffn_norm.weight
    model.layers.i.self_attn.{q,k,v,o}_proj.weight          layers.i.attn.w{q,k,v,o}.weight
  MoE (GraniteMoeShared):
    model.layers.i.block_sparse_moe.router.layer.weight     layers.i.moe.router.weight   [E, H]
    model.layers.i.block_sparse_moe.input_linear.weight     cat(moe.w1, moe.w3, dim=1)   [E, 2I, H]
    model.layers.i.block_sparse_moe.output_linear.weight    moe.w2                       [E, H, I]
    model.layers.i.shared_mlp.input_linear.weight           cat(shared.w1, shared.w3)    [2S, H]
    model.layers.i.shared_mlp.output_linear.weight          shared.w2                    [H, S]
  dense (Llama):
    model.layers.i.mlp.{gate,up,down}_proj.weight           layers.i.ffn.w{1,3,2}.weight

Writes are atomic: everything goes to a temp dir beside the target, then one rename. Only JSON and
safetensors are read: nothing is unpickled.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, MobileMoEConfig
from .model import MobileMoE, rope_table

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or disagrees with its config (message names which)."""


# ---------------------------------------------------------------------------- name mapping
def to_hf_state_dict(model: MobileMoE) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = layer.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
        for ours, hf in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            sd[p + f"self_attn.{hf}.weight"] = getattr(layer.attn, ours).weight
        if layer.moe is None:
            for ours, hf in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                sd[p + f"mlp.{hf}.weight"] = getattr(layer.ffn, ours).weight
            continue
        moe = layer.moe
        sd[p + "block_sparse_moe.router.layer.weight"] = moe.router.weight
        sd[p + "block_sparse_moe.input_linear.weight"] = torch.cat([moe.w1, moe.w3], dim=1)
        sd[p + "block_sparse_moe.output_linear.weight"] = moe.w2
        if moe.shared is not None:
            sd[p + "shared_mlp.input_linear.weight"] = torch.cat([moe.shared.w1.weight, moe.shared.w3.weight])
            sd[p + "shared_mlp.output_linear.weight"] = moe.shared.w2.weight
    return {k: v.detach().contiguous() for k, v in sd.items()}


def from_hf_state_dict(cfg: MobileMoEConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of to_hf_state_dict: HF names -> our state_dict (shapes checked by the caller)."""
    sd = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    sd["lm_head.weight"] = hf["model.embed_tokens.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    I, S = cfg.expert_hidden, cfg.shared_expert_hidden
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        sd[q + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        sd[q + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        for ours, name in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            sd[q + f"attn.{ours}.weight"] = hf[p + f"self_attn.{name}.weight"]
        if not cfg.is_moe:
            for ours, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                sd[q + f"ffn.{ours}.weight"] = hf[p + f"mlp.{name}.weight"]
            continue
        sd[q + "moe.router.weight"] = hf[p + "block_sparse_moe.router.layer.weight"]
        gate_up = hf[p + "block_sparse_moe.input_linear.weight"]
        sd[q + "moe.w1"], sd[q + "moe.w3"] = gate_up[:, :I].clone(), gate_up[:, I:].clone()
        sd[q + "moe.w2"] = hf[p + "block_sparse_moe.output_linear.weight"]
        if S:
            gu = hf[p + "shared_mlp.input_linear.weight"]
            sd[q + "moe.shared.w1.weight"], sd[q + "moe.shared.w3.weight"] = gu[:S].clone(), gu[S:].clone()
            sd[q + "moe.shared.w2.weight"] = hf[p + "shared_mlp.output_linear.weight"]
    return sd


def expected_hf_shapes(cfg: MobileMoEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape: computed from the config."""
    with torch.device("meta"):
        model = MobileMoE(cfg)
    return {k: tuple(v.shape) for k, v in to_hf_state_dict(model).items()}


def hf_config(cfg: MobileMoEConfig, dtype: torch.dtype) -> dict:
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.is_moe:
        arch = {
            "architectures": ["GraniteMoeSharedForCausalLM"], "model_type": "granitemoeshared",
            "intermediate_size": cfg.expert_hidden, "shared_intermediate_size": cfg.shared_expert_hidden,
            "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
            "router_aux_loss_coef": cfg.router_aux_loss_coef, "embedding_multiplier": 1.0,
            "logits_scaling": 1.0, "residual_multiplier": 1.0, "attention_multiplier": 1.0 / math.sqrt(cfg.head_dim),
        }
    else:
        arch = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "intermediate_size": cfg.ffn_hidden,
                "mlp_bias": False}
    return {**arch, **common, "mobilemoe": cfg.to_dict()}


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


def save_checkpoint(model: MobileMoE, out_dir, tokenizer=None, dtype: torch.dtype = torch.float32,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) atomically to out_dir."""
    sd = {k: v.to(dtype).cpu() for k, v in to_hf_state_dict(model).items()}
    config = hf_config(model.config, dtype)

    def write(tmp: Path):
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "mobilemoe"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            from .tokenizer import write_hf_tokenizer_files
            write_hf_tokenizer_files(tokenizer, tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return atomic_dir(Path(out_dir), write)


def load_state(ckpt_dir) -> tuple[MobileMoEConfig, dict[str, torch.Tensor]]:
    """Read and validate a checkpoint: our config + our state_dict (float tensors as stored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a checkpoint needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "mobilemoe" not in raw:
        raise CheckpointError(f"{cfg_path}: no 'mobilemoe' block; expected a config written by save_checkpoint")
    try:
        cfg = MobileMoEConfig.from_dict(raw["mobilemoe"], source=f"{cfg_path}:mobilemoe")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if not w_path.is_file():
        raise CheckpointError(f"{w_path}: missing weights file")
    expected = expected_hf_shapes(cfg)
    hf = {}
    try:
        with safe_open(str(w_path), framework="pt") as f:
            names = set(f.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(f"{w_path}: tensors do not match {cfg_path} — missing {missing[:5]}"
                                      f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
            for name in sorted(names):
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(f"{w_path}: tensor '{name}' has shape {list(shape)}, "
                                          f"config expects {list(expected[name])}")
                hf[name] = f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{w_path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return cfg, from_hf_state_dict(cfg, hf)


def load_checkpoint(ckpt_dir, dtype: torch.dtype = torch.float32, device="cpu") -> MobileMoE:
    cfg, sd = load_state(ckpt_dir)
    with torch.device("meta"):
        model = MobileMoE(cfg)
    model = model.to_empty(device=device)
    # non-persistent RoPE buffers are not in the file: recompute them
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta))
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(dtype).eval()
