"""compiler.build end to end on the test model: numerics vs PyTorch, artifact contents, bad input."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common import decode_bytes, param_shapes
from mobilemoe.artifact import ArtifactError, read_manifest, verify
from compiler.build import build
from mobilemoe.checkpoint import load_checkpoint
from mobilemoe.config import MobileMoEConfig
from mobilemoe.quant import dequantize_int4, quantize_int4, sqnr
from mobilemoe.runtimes import load_artifact
from mobilemoe.tokenizer import load_tokenizer
from targets import TargetError, get_target

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "heldout_sample.txt"


# ckpt (the test-moe checkpoint), host_int4 and android_arm64 (its artifacts) come from tests/conftest.py:
# shared with test_onnx.py, which compares the ONNX Runtime artifact against the same TVM artifact,
# and with the integration tests.


@pytest.fixture(scope="module")
def host_float(ckpt, tmp_path_factory):
    return build(ckpt, "host", tmp_path_factory.mktemp("host-float") / "art", quant="none", verbose=False)


def real_text_ids(vocab: int, n: int = 160) -> list[int]:
    ids = load_tokenizer().encode(SAMPLE.read_text()).ids
    return [0] + [i % vocab for i in ids[: n - 1]]


def teacher_forced_logits(step, ids, chunk=24):
    """Logits predicting ids[i+1] for every i: one prefill of `chunk` tokens, then decode steps."""
    logits, kv = step(ids[:chunk], None)
    out = [np.asarray(logits)]
    for t in ids[chunk:]:
        logits, kv = step([t], kv)
        out.append(np.asarray(logits))
    return np.stack(out)


def torch_step(model):
    def step(ids, kv):
        with torch.no_grad():
            logits, kv = model(torch.tensor([ids]), kv=kv, last_only=True)
        return logits[0, -1].numpy(), kv
    return step


def test_float_artifact_matches_pytorch(ckpt, host_float):
    model = load_checkpoint(ckpt)
    rt = load_artifact(host_float)
    ids = real_text_ids(model.config.vocab_size, 64)
    got = teacher_forced_logits(rt.step, ids)
    ref = teacher_forced_logits(torch_step(model), ids)
    err = np.abs(got - ref).max()
    print(f"float artifact vs PyTorch: max logit error {err:.2e}")
    assert err <= 1e-3


def test_int4_artifact_top1_agreement_on_real_text(ckpt, host_int4):
    model = load_checkpoint(ckpt)
    with torch.no_grad():  # PyTorch running the same INT4 weights
        for name, p in model.named_parameters():
            if "router" not in name and p.dim() >= 2:
                p.copy_(dequantize_int4(*quantize_int4(p)))
    rt = load_artifact(host_int4)
    ids = real_text_ids(model.config.vocab_size)
    got = teacher_forced_logits(rt.step, ids)
    ref = teacher_forced_logits(torch_step(model), ids)
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    acts = read_manifest(host_int4)["quantization"]["activations"]
    db = sqnr(torch.from_numpy(ref), torch.from_numpy(got))
    print(f"INT4 artifact ({acts} activations) vs PyTorch INT4 (fp32 activations): top-1 agreement "
          f"{agree:.4f} over {len(got)} positions, max logit error {np.abs(got - ref).max():.2e}, "
          f"logits SQNR {db:.1f} dB")
    assert agree >= 0.98 and db >= 25


def test_manifest_and_dump_ir(host_int4):
    manifest = verify(host_int4)
    assert manifest["backend"] == "tvm" and manifest["target"]["name"] == "host"
    assert [p["phase"] for p in manifest["pipeline"]] == ["moe", "quantize", "cleanup", "legalize", "schedule", "lower"]
    assert manifest["quantization"]["format"] == "g32_sym_u32k8"
    dec = manifest["entry_points"]["decode"]
    c = manifest["config"]
    layers = [f"{kind}_{i}" for i in range(c["num_layers"]) for kind in "kv"]
    assert [i["name"] for i in dec["inputs"]] == ["tokens", "positions", *layers]
    k0, v0 = dec["inputs"][2:4]  # keys transposed: [1, nkv, D, P]
    assert k0["shape"][:3] == [1, c["num_kv_heads"], c["head_dim"]] and v0["shape"][3] == c["head_dim"]
    assert any(n.endswith("__q4") for n in dec["params"]) and not any(n.endswith("moe_w1") for n in dec["params"])
    # every layer part shows in the kernel calls: the importer's parts (model modules, MoE operand
    # roles) carried through fusion and packing (passes/common.py param_parts)
    for entry in ("prefill", "decode"):
        parts = {part for _, part, _ in manifest["entry_points"][entry]["kernel_calls"]}
        assert parts == {"attention", "router", "routed experts", "shared expert", "other"}, (entry, parts)
    # bench/common.py counts decode bytes by those parts (the routed experts' top_k / E, one embedding row)
    shapes = param_shapes(host_int4)
    routed = {n.split("_moe_")[-1] for n, (_, _, part) in shapes.items() if part == "routed experts"}
    assert routed == {"w13__q4", "w13__s", "w2__q4", "w2__s"}
    cfg = MobileMoEConfig.from_dict(c)
    b = decode_bytes(shapes, cfg, ctx=100)
    assert b["routed_experts"] == 2 * 8 * 3 * 64 * 32 * 0.5625 * 2 / 8 and b["embedding_row"] == 36  # test-moe
    assert set(manifest["files"]) >= {"lib.so", "params.safetensors", "config.json"}
    dumps = sorted(p.name for p in Path(f"{host_int4}-ir").iterdir())
    for name in ("FuseExpertGateUp", "PackMoEExpertsInt4", "SparseMoEDispatch", "FuseSiblingMatmuls",
                 "QuantizeInt4Weights", "LegalizeOps", "ScheduleInt4Kernels"):
        assert any(name in d for d in dumps), name
    assert "pass_timing.txt" in dumps


def test_tampered_artifact_is_refused(host_int4, tmp_path):
    import shutil
    copy = Path(shutil.copytree(host_int4, tmp_path / "copy"))
    data = bytearray((copy / "params.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "params.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="params.safetensors: sha256 .* does not match"):
        load_artifact(copy)


def test_android_arm64_shared_object(android_arm64):
    out = android_arm64
    lib = out / "lib.so"
    r = subprocess.run(["readelf", "-h", "-d", "-S", str(lib)], capture_output=True, text=True, check=True)
    assert r.stderr == "", r.stderr  # readelf clean: no warnings
    assert "AArch64" in r.stdout and "DYN (Shared object file)" in r.stdout
    for lib_name in ("libc.so", "libm.so", "libtvm_ffi.so"):
        assert f"Shared library: [{lib_name}]" in r.stdout
    with pytest.raises(ArtifactError, match="built for target 'android-arm64'"):
        load_artifact(out)


def test_android_i8mm_build_runs_prefill_on_smmla(ckpt, android_arm64, tmp_path):
    from targets.arm64_isa import count_instructions

    plain = count_instructions(android_arm64 / "lib.so")
    i8mm = count_instructions(build(ckpt, "android-arm64-i8mm", tmp_path / "android-i8mm", verbose=False) / "lib.so")
    assert plain["smmla"] == 0 and plain["sdot"] > 0
    assert i8mm["smmla"] > 0 and i8mm["sdot"] > 0  # prefill tiles on smmla, decode GEMVs on sdot


def test_unknown_target_lists_known(ckpt, tmp_path):
    with pytest.raises(TargetError, match="unknown target 'iphone'; known targets: android-arm64, android-arm64-i8mm, linux-arm64, host, android-adreno, android-mali, onnx, mlir"):
        build(ckpt, "iphone", tmp_path / "x", verbose=False)
    assert not (tmp_path / "x").exists()


def test_missing_toolchain_names_package(monkeypatch, ckpt, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ziglang" else real(name, *a))
    with pytest.raises(TargetError, match="'ziglang' .* not installed .*pip install ziglang==0.17.1"):
        build(ckpt, "android-arm64", tmp_path / "x", verbose=False)
    assert not (tmp_path / "x").exists()


def test_failed_link_leaves_no_partial_artifact(monkeypatch, ckpt, tmp_path):
    import dataclasses
    import targets
    spec = get_target("linux-arm64")
    broken = dataclasses.replace(spec, toolchain=dataclasses.replace(spec.toolchain, flags=("-shared", "-Wl,--no-such-flag")))
    monkeypatch.setitem(targets.TARGETS, "linux-arm64", broken)
    with pytest.raises(TargetError, match="linking .* failed"):
        build(ckpt, "linux-arm64", tmp_path / "out", verbose=False)
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor a temp dir is left


def test_unsupported_op_names_op_and_layer(ckpt):
    from compiler.importer import ImportError_, import_model
    model = load_checkpoint(ckpt)
    norm = model.layers[1].attn_norm
    norm.forward = lambda x: torch.lgamma(x.abs() + 1)
    with pytest.raises(ImportError_, match="op 'lgamma.default' \\(from layer 'model.layers.1.attn_norm'\\)"):
        import_model(model)


def test_runtime_rejects_out_of_vocab_ids(host_int4):
    rt = load_artifact(host_int4)
    with pytest.raises(ValueError, match=r"token ids \[512\] are outside the model's vocabulary \[0, 512\)"):
        rt.prefill([1, 512])


def test_run_cli_generates(host_int4, capsys):
    from compiler.run import main
    main(["--artifact", str(host_int4), "--prompt", "a", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert captured.out.startswith("a") and "decode" in captured.err and "tok/s" in captured.err
