"""Imported HF checkpoints through compiler.build: the host INT4 artifact agrees with PyTorch running
the same INT4 weights on the held-out text (top-1 >= 0.99), and the android-arm64 build links.

One architecture runs by default (qwen2_moe: q/k/v bias, softmax-then-top-k routing, sigmoid-gated
shared expert, sharded checkpoint); the others are marked slow (~40 s each): `pytest -m slow tests/arch`.
"""
import subprocess

import numpy as np
import pytest
import torch

from compiler.build import build
from mobilemoe.checkpoint import load_checkpoint
from mobilemoe.quant import dequantize_int4, quantize_int4, sqnr
from mobilemoe.runtime import load_artifact
from targets import TargetError, get_target
from tests.arch.hf_models import save_tiny
from tests.compiler.test_build import real_text_ids, teacher_forced_logits, torch_step

pytest.importorskip("transformers")

SLOW = ["olmoe", "granitemoeshared", "granitemoe", "qwen3_moe", "mixtral", "llama", "qwen2", "qwen3"]


def int4_reference(ckpt):
    """Our PyTorch model with every weight the artifact stores as INT4 replaced by its dequantization
    (the router stays float, as in QuantizeInt4Weights)."""
    model = load_checkpoint(ckpt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" not in name and p.dim() >= 2 and p.shape[-1] % 32 == 0:
                p.copy_(dequantize_int4(*quantize_int4(p)))
    return model


def check_host_int4(model_type, tmp_path):
    ckpt = save_tiny(model_type, tmp_path / model_type)
    art = build(ckpt, "host", tmp_path / "host", verbose=False)
    model, rt = int4_reference(ckpt), load_artifact(art)
    ids = real_text_ids(model.config.vocab_size)
    got = teacher_forced_logits(rt.step, ids)
    ref = teacher_forced_logits(torch_step(model), ids)
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    db = sqnr(torch.from_numpy(ref), torch.from_numpy(got))
    print(f"{model_type}: host INT4 artifact vs PyTorch INT4: top-1 {agree:.4f} over {len(got)} positions, "
          f"logits SQNR {db:.1f} dB, max error {np.abs(got - ref).max():.2e}")
    assert agree >= 0.99, agree
    return ckpt


def test_host_int4_qwen2_moe(tmp_path):
    check_host_int4("qwen2_moe", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", SLOW)
def test_host_int4_slow(tmp_path, model_type):
    check_host_int4(model_type, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe"])
def test_android_arm64_links(tmp_path, model_type):
    try:
        get_target("android-arm64").check_toolchain()
    except TargetError as e:
        pytest.skip(f"android-arm64 cross toolchain missing on this machine: {e}")
    ckpt = save_tiny(model_type, tmp_path / model_type)
    lib = build(ckpt, "android-arm64", tmp_path / "android", verbose=False) / "lib.so"
    r = subprocess.run(["readelf", "-h", str(lib)], capture_output=True, text=True, check=True)
    assert "AArch64" in r.stdout and "DYN (Shared object file)" in r.stdout
