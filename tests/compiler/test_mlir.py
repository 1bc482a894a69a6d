"""The MLIR export (torch-mlir) verified with IREE: numerics vs PyTorch, artifact contents, bad input."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("torch_mlir", reason="torch-mlir is not installed: pip install -e '.[mlir]'")
pytest.importorskip("iree.compiler", reason="iree-base-compiler is not installed: pip install -e '.[mlir]'")
pytest.importorskip("iree.runtime", reason="iree-base-runtime is not installed: pip install -e '.[mlir]'")

from compiler.backends.mlir import IREE_TARGETS, MlirExportError, export_mlir, topk_as_iterated_max  # noqa: E402
from compiler.build import build  # noqa: E402
from mobilemoe.artifact import ArtifactError, verify  # noqa: E402
from mobilemoe.checkpoint import load_checkpoint  # noqa: E402
from mobilemoe.runtimes import load_artifact  # noqa: E402
from mobilemoe.runtimes.iree import IreeRuntime  # noqa: E402
from targets.android_arm64 import API_LEVEL  # noqa: E402
from test_build import real_text_ids, teacher_forced_logits, torch_step  # noqa: E402


@pytest.fixture(scope="module")
def mlir_host(ckpt, tmp_path_factory):
    """The test-moe MLIR artifact with the host IREE module only (the arm64 compile is in a slow test)."""
    return build(ckpt, "mlir", tmp_path_factory.mktemp("mlir") / "mlir-host", iree_targets=("host",), verbose=False)


def test_iree_matches_pytorch_on_real_text(ckpt, mlir_host):
    model = load_checkpoint(ckpt)
    rt = load_artifact(mlir_host)
    assert isinstance(rt, IreeRuntime)
    ids = real_text_ids(model.config.vocab_size, 64)
    got = teacher_forced_logits(rt.step, ids)  # one prefill of 24 tokens, then 40 decode steps
    ref = teacher_forced_logits(torch_step(model), ids)
    err = np.abs(got - ref).max()
    print(f"IREE (host, float32) vs PyTorch: max logit error {err:.2e} over {len(got)} positions")
    assert err <= 1e-3


def test_generate_and_kv_shape(mlir_host):
    rt = load_artifact(mlir_host)
    c = rt.config
    _, kv = rt.prefill([0, 5, 9])
    _, kv = rt.decode(7, kv)
    assert tuple(kv.shape) == (c.num_layers, 2, 1, c.num_kv_heads, 4, c.head_dim)
    ids, stats = rt.generate([0, 5, 9], max_new_tokens=4)
    assert len(ids) == 4 and all(0 <= i < c.vocab_size for i in ids)
    with pytest.raises(ValueError, match=r"token ids \[512\] are outside the model's vocabulary"):
        rt.prefill([1, 512])


def test_weights_live_outside_the_mlir_and_vmfb(mlir_host):
    manifest = verify(mlir_host)
    assert manifest["backend"] == "iree" and manifest["target"]["name"] == "mlir"
    names = manifest["entry_points"]["decode"]["params"]
    assert names[0] == "embed.weight" and "lm_head.weight" not in names  # tied: one argument
    assert {"model.linalg.mlir", "prefill.stablehlo.mlir", "decode.stablehlo.mlir", "params.safetensors",
            "iree-host.vmfb", "tokenizer.json", "config.json"} <= set(manifest["files"])
    weight_bytes = (mlir_host / "params.safetensors").stat().st_size
    for name in ("model.linalg.mlir", "prefill.stablehlo.mlir", "decode.stablehlo.mlir"):
        text = (mlir_host / name).read_text()
        assert "dense_resource" not in text and "dialect_resources" not in text, name
        for entry in re.findall(r"func\.func (?:\w+ )?@(\w+)\((.*?)\) ->", text):
            assert len(re.findall(r"%arg\d+:", entry[1])) == 3 + len(names), (name, entry[0])
    assert "linalg.matmul" in (mlir_host / "model.linalg.mlir").read_text()
    assert "stablehlo.dot_general" in (mlir_host / "prefill.stablehlo.mlir").read_text()
    assert "tm_tensor" not in (mlir_host / "model.linalg.mlir").read_text()  # topk lowered without sort
    vmfb = (mlir_host / "iree-host.vmfb").read_bytes()
    assert b"embedded-elf-x86_64" in vmfb and len(vmfb) < weight_bytes
    assert manifest["iree"]["modules"]["host"]["flags"] == ["--iree-hal-target-backends=llvm-cpu",
                                                             *IREE_TARGETS["host"][1]]


@pytest.mark.parametrize("shape,k,dim,largest",
                         [((5, 8), 2, -1, True), ((3, 16), 4, 1, False), ((4, 6, 3), 2, 1, True)])
def test_topk_as_iterated_max_equals_topk(shape, k, dim, largest):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    v, i = topk_as_iterated_max(x, k, dim, largest)
    rv, ri = torch.topk(x, k, dim, largest)
    assert torch.equal(v, rv) and torch.equal(i, ri)


def test_topk_as_iterated_max_ties_take_the_lowest_index():
    x = torch.tensor([[0.1, 1.5, 1.5, 1.5, -2.0]])
    v, i = topk_as_iterated_max(x, 2)
    assert v.tolist() == [[1.5, 1.5]] and i.tolist() == [[1, 2]]  # PyTorch leaves the order of ties unspecified


def test_missing_host_module_is_refused(mlir_host, tmp_path):
    copy = shutil.copytree(mlir_host, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["iree"]["modules"]["host"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="iree.modules has no 'host' module"):
        load_artifact(copy)


@pytest.mark.slow
def test_cli_builds_android_arm64_module(ckpt, tmp_path):
    from compiler.build import main
    main(["--target", "mlir", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a")])
    manifest = verify(tmp_path / "a")
    assert set(manifest["iree"]["modules"]) == {"host", "android-arm64"}
    flags = manifest["iree"]["modules"]["android-arm64"]["flags"]
    assert f"--iree-llvmcpu-target-triple=aarch64-linux-android{API_LEVEL}" in flags
    assert b"embedded-elf-arm_64" in (tmp_path / "a" / "iree-android-arm64.vmfb").read_bytes()


@pytest.mark.slow
def test_unsupported_op_names_op_and_layer(ckpt, tmp_path):
    model = load_checkpoint(ckpt)
    model.layers[1].attn_norm.forward = lambda x: torch.sort(x, dim=-1, stable=True)[0]
    with pytest.raises(MlirExportError, match=r"op 'aten\.sort\.stable' \(from layer 'model\.layers\.1\.attn_norm'\) "
                                              r"cannot be lowered by torch-mlir to linalg-on-tensors"):
        export_mlir(model)


@pytest.mark.slow
def test_failed_iree_compile_leaves_no_artifact(monkeypatch, ckpt, tmp_path):
    import compiler.backends.mlir as mlir_export
    monkeypatch.setitem(mlir_export.IREE_TARGETS, "host", ("iree-host.vmfb", ("--no-such-iree-flag",)))
    with pytest.raises(MlirExportError, match="iree-compile for 'host'"):
        build(ckpt, "mlir", tmp_path / "out", iree_targets=("host",), verbose=False)
    assert list(tmp_path.iterdir()) == []
