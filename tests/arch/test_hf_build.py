"""Imported HF checkpoints through compiler.build: the host INT4 artifact agrees with PyTorch running
the same INT4 weights on the held-out text (top-1 >= 0.99), the ONNX fallback with PyTorch (1e-4)
and with the TVM artifact (top-1 >= 0.99), and the android-arm64 build links.

Every architecture runs by default with fp32 activations on both sides (`--quant int4-f32` and ORT's
accuracy level 0: the same arithmetic, so "agrees" means the same program); qwen2_moe (q/k/v bias,
softmax-then-top-k routing, sigmoid-gated shared expert, sharded checkpoint) also runs the default
`--quant int4` artifact, whose int8 activations (this CPU's dot-product kernels) are checked against
PyTorch quantizing the same activations. That int8 build of the other eight is marked slow
(`pytest -m slow tests/arch`): on a tiny random model the top two logits are often closer than int8
activations move them, so its next tokens against the fp32 ONNX graph are printed, not held to 0.99.
"""
import subprocess
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mobilemoe.artifact import read_manifest
from compiler.build import build
from compiler.run import main as run_main
from mobilemoe.checkpoint import load_checkpoint
from mobilemoe.model import MoE
from mobilemoe.quant import GROUP_SIZE, dequantize_int4, quantize_act_int8, quantize_int4, sqnr
from mobilemoe.runtimes import load_artifact
from tests.arch.hf_models import CHATML, save_tiny
from tests.compiler.test_build import real_text_ids, teacher_forced_logits, torch_step

pytest.importorskip("transformers")

OTHERS = ["olmoe", "granitemoeshared", "granitemoe", "qwen3_moe", "mixtral", "llama", "qwen2", "qwen3"]


def fake_int8(x: torch.Tensor) -> torch.Tensor:
    """x as the dot-product kernels see it: int8 per group of 32 (mobilemoe.quant), dequantized."""
    q, scale = quantize_act_int8(x.float().contiguous())
    return (q.float().unflatten(-1, (-1, GROUP_SIZE)) * scale[..., None]).flatten(-2)


def _gather_int8(moe, x, w, ids):
    """MoE._gather with int8 activations into both expert matmuls, as the INT4 dot kernels."""
    g = torch.einsum("nh,nkih->nki", fake_int8(x), moe.w1[ids])
    u = torch.einsum("nh,nkih->nki", fake_int8(x), moe.w3[ids])
    y = torch.einsum("nki,nkhi->nkh", fake_int8(F.silu(g) * u), moe.w2[ids])
    return torch.einsum("nkh,nk->nh", y, w)


def int4_reference(ckpt, int8_activations: bool):
    """Our PyTorch model running what the artifact runs: every weight it stores as INT4 replaced by
    its dequantization (the router stays float, as in QuantizeInt4Weights) and, where the artifact
    uses the int8 dot-product kernels, every input of those matmuls quantized to int8 per group."""
    model = load_checkpoint(ckpt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" not in name and p.dim() >= 2 and p.shape[-1] % GROUP_SIZE == 0:
                p.copy_(dequantize_int4(*quantize_int4(p)))
    if int8_activations:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "router" not in name:
                mod.register_forward_pre_hook(lambda m, args: (fake_int8(args[0]),))
            elif isinstance(mod, MoE):
                mod.impl = "gather"
                mod._gather = partial(_gather_int8, mod)
    return model


def check_host_int4(ckpt, art, tmp_path):
    """The host INT4 artifact `art` of `ckpt` vs PyTorch running the same INT4 weights (and, where the
    artifact's kernels take int8 activations, quantizing the same activations), then the ONNX fallback."""
    model_type = ckpt.name
    int8 = read_manifest(art)["quantization"]["activations"].startswith("int8")
    model, rt = int4_reference(ckpt, int8), load_artifact(art)
    ids = real_text_ids(model.config.vocab_size)
    got = teacher_forced_logits(rt.step, ids)
    ref = teacher_forced_logits(torch_step(model), ids)
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    db = sqnr(torch.from_numpy(ref), torch.from_numpy(got))
    print(f"{model_type}: host INT4 artifact vs PyTorch INT4 ({'int8' if int8 else 'fp32'} activations): top-1 {agree:.4f} over {len(got)} positions, "
          f"logits SQNR {db:.1f} dB, max error {np.abs(got - ref).max():.2e}")
    assert agree >= 0.99 and db >= 40, (agree, db)
    check_onnx(ckpt, tmp_path, got, ids, same_arithmetic=not int8)
    return ckpt


def check_onnx(ckpt, tmp_path, tvm_logits, ids, same_arithmetic: bool):
    """The ONNX fallback, translated from the same exported program: PyTorch running the INT4 weights
    (fp32 activations, as ORT's accuracy_level 0) to 1e-4, and the TVM artifact's next tokens >= 0.99
    where the artifact computes with fp32 activations too (printed against an int8-activation one)."""
    rt = load_artifact(build(ckpt, "onnx", tmp_path / "onnx", verbose=False))
    got = teacher_forced_logits(rt.step, ids)
    ref = teacher_forced_logits(torch_step(int4_reference(ckpt, False)), ids)
    vs_tvm = float((got.argmax(-1) == tvm_logits.argmax(-1)).mean())
    print(f"{ckpt.name}: ONNX vs PyTorch INT4 max error {np.abs(got - ref).max():.2e}; top-1 vs the TVM artifact "
          f"({'fp32' if same_arithmetic else 'int8'} activations) {vs_tvm:.4f}")
    assert np.abs(got - ref).max() <= 1e-4
    assert vs_tvm >= (0.99 if same_arithmetic else 0.95), vs_tvm


def test_host_int4_qwen2_moe(qwen2_moe_ckpt, qwen2_moe_host, tmp_path, capsys):
    """qwen2_moe_ckpt / qwen2_moe_host (tests/conftest.py): its checkpoint carries a chat template"""
    check_host_int4(qwen2_moe_ckpt, qwen2_moe_host, tmp_path)
    assert (qwen2_moe_host / "chat_template.jinja").read_text() == CHATML  # the artifact keeps its format
    capsys.readouterr()
    run_main(["--artifact", str(qwen2_moe_host), "--prompt", "a", "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert out.out.startswith("a") and "tok/s" in out.err
    run_main(["--artifact", str(qwen2_moe_host), "--prompt", "a", "--max-new-tokens", "4", "--chat"])
    out = capsys.readouterr()
    assert out.out.startswith("a") and "tok/s" in out.err


@pytest.mark.parametrize("model_type", OTHERS)
def test_host_int4_f32(tmp_path, model_type):
    """Each other architecture: the fp32-activation INT4 artifact vs PyTorch, then vs the ONNX fallback."""
    ckpt = save_tiny(model_type, tmp_path / model_type)
    check_host_int4(ckpt, build(ckpt, "host", tmp_path / "host", quant="int4-f32", verbose=False), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", OTHERS)
def test_host_int4_slow(tmp_path, model_type):
    ckpt = save_tiny(model_type, tmp_path / model_type)
    check_host_int4(ckpt, build(ckpt, "host", tmp_path / "host", verbose=False), tmp_path)


@pytest.mark.parametrize("model_type", ["qwen2_moe", pytest.param("olmoe", marks=pytest.mark.slow)])
def test_android_arm64_links(tmp_path, model_type, request):
    ckpt = (request.getfixturevalue("qwen2_moe_ckpt") if model_type == "qwen2_moe"
            else save_tiny(model_type, tmp_path / model_type))
    lib = build(ckpt, "android-arm64", tmp_path / "android", verbose=False) / "lib.so"
    r = subprocess.run(["readelf", "-h", str(lib)], capture_output=True, text=True, check=True)
    assert "AArch64" in r.stdout and "DYN (Shared object file)" in r.stdout
