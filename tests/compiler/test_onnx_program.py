"""The ONNX fallback is the exported program translated (compiler/backends/onnx_program.py), not a
second decoder: no architecture option is read by the ONNX code, an option it has never seen reaches
the graph through the program alone, and what it cannot translate is named."""
import ast
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compiler.backends import onnx_patterns
from compiler.backends.onnx import OnnxExportError, check_config, export_onnx
from compiler.backends.onnx_program import UnsupportedOp, translate
from mobilemoe.config import MobileMoEConfig
from mobilemoe.model import MobileMoE, RMSNorm
from mobilemoe.quant import dequantize_int4, quantize_int4

BACKENDS = Path(__file__).resolve().parents[2] / "compiler" / "backends"
# what the ONNX code may read from the config: the graph's interface and QMoE's block-size check
INTERFACE_FIELDS = {"name", "num_layers", "is_moe", "hidden_size", "expert_hidden"}


def test_onnx_code_reads_no_architecture_option():
    """A hand-written decoder would read cfg.num_heads, cfg.qk_norm, cfg.rope_theta...: none may appear."""
    fields = {f.name for f in dataclasses.fields(MobileMoEConfig)} | {"is_moe", "head_dim"}
    used = {}
    for path in sorted(BACKENDS.glob("onnx*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in fields - INTERFACE_FIELDS:
                used.setdefault(node.attr, []).append(f"{path.name}:{node.lineno}")
    assert not used, f"the ONNX backend reads architecture options (a second decoder?): {used}"


class SoftCap(torch.nn.Module):
    """Gemma-2-style logit soft-capping: an option no registry entry and no ONNX code knows."""

    def __init__(self, head, cap: float):
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, x):
        return self.cap * torch.tanh(self.head(x) / self.cap)


class OffsetNorm(RMSNorm):
    """Gemma-style norm, (1 + w) * normed: not the RMSNorm pattern, so it stays plain ops."""

    def forward(self, x):
        xf = x.float()
        return (1 + self.weight) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))


def ort_prefill(path: Path, cfg, ids) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.asarray([ids], np.int64), "positions": np.arange(len(ids), dtype=np.int64)[None]}
    for i in range(cfg.num_layers):
        feed[f"past_key_values.{i}.key"] = np.zeros((1, cfg.num_kv_heads, cfg.head_dim, 0), np.float32)
        feed[f"past_key_values.{i}.value"] = np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    return s.run(["logits"], feed)[0][0]


def test_an_option_the_onnx_code_never_saw_reaches_the_graph(tmp_path):
    torch.manual_seed(0)
    cfg = dataclasses.replace(MobileMoEConfig.from_name("test-moe"), qk_norm="head", qkv_bias=True)
    model = MobileMoE(cfg).eval()
    model.lm_head = SoftCap(model.lm_head, 3.0)
    for layer in model.layers:
        layer.ffn_norm.__class__ = OffsetNorm
    export_onnx(model, tmp_path / "model.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert "Tanh" in ops  # the soft cap, from the program
    # q/k norms per head: 2 per layer, fused; the attention norms (after a residual add but the first);
    # the offset ffn norms are plain Pow/ReduceMean/... ops
    assert ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization") == 2 * 2 + 2 + 1
    with torch.no_grad():  # PyTorch running the INT4 weights the graph holds
        for name, p in model.named_parameters():
            if "router" not in name and p.dim() >= 2:
                p.copy_(dequantize_int4(*quantize_int4(p)))
        ids = [0, 5, 17, 42, 9, 3]
        ref = model(torch.tensor([ids]), last_only=True)[0][0, -1].numpy()
    got = ort_prefill(tmp_path / "model.onnx", cfg, ids)
    assert np.abs(got - ref).max() <= 1e-4 and np.abs(ref).max() <= 3.0


def test_an_op_without_translation_is_named():
    class CumSum(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)
    ep = torch.export.export(CumSum(), (torch.zeros(1, 4),))
    with pytest.raises(UnsupportedOp, match=r"no translation for aten.cumsum.default .*build a TVM target instead"):
        translate(ep, lambda name: None, {}, 0, ["x"], ["y"], "t")


def test_einsum_as_matmul():
    assert onnx_patterns.as_matmul("bgrsd,bgdt->bgrst", None, None) == [2]  # keys broadcast over the group
    assert onnx_patterns.as_matmul("bgrst,bgtd->bgrsd", None, None) == [2]
    assert onnx_patterns.as_matmul("nh,eih->nei", None, None) is None  # not a batched matmul: Einsum
    assert onnx_patterns.as_matmul("bij,bjk->bik", None, None) == []


def test_qmoe_block_size_is_checked():
    cfg = dataclasses.replace(MobileMoEConfig.from_name("test-moe"), expert_hidden=48)
    with pytest.raises(OnnxExportError, match=r"expert_hidden = 48 must be a multiple of the INT4 group size 32"):
        check_config(cfg)
