"""mobilemoe/runtimes/params_file.py: params.safetensors read straight into TVM tensors."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mobilemoe.artifact import ArtifactError
from mobilemoe.runtimes.params_file import read_params

tvm = pytest.importorskip("tvm")


def test_every_dtype_reads_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    want = {"w_f32": torch.randn(33, 7, generator=g), "w_f16": torch.randn(5, 64, generator=g).half(),
            "w_bf16": torch.randn(3, 9, generator=g).bfloat16(), "codes": torch.randint(0, 255, (4, 96), generator=g,
                                                                                          dtype=torch.uint8),
            "i8": torch.randint(-128, 127, (17,), generator=g, dtype=torch.int8), "pos": torch.arange(6),
            "empty": torch.zeros(0, 4)}
    save_file(want, tmp_path / "p.safetensors", metadata={"format": "pt"})
    got = read_params(tmp_path / "p.safetensors", tvm.cpu())
    assert set(got) == set(want)
    for name, t in want.items():
        assert tuple(got[name].shape) == tuple(t.shape) and str(got[name].dtype) == str(t.dtype).split(".")[1]
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        mine = got[name].numpy() if t.dtype != torch.bfloat16 else \
            np.frombuffer(bytes(np.from_dlpack(got[name]._create_view(got[name].shape, "uint16"))), np.int16)
        np.testing.assert_array_equal(np.asarray(mine).reshape(-1), raw.numpy().reshape(-1))


def _file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_bad_files_are_named(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    with pytest.raises(ArtifactError, match="too short for a safetensors file"):
        read_params(tmp_path / "a", tvm.cpu())
    (tmp_path / "b").write_bytes(struct.pack("<Q", 999) + b"{}")
    with pytest.raises(ArtifactError, match="header length 999 does not fit"):
        read_params(tmp_path / "b", tvm.cpu())
    with pytest.raises(ArtifactError, match="header is not JSON"):
        read_params(_file(tmp_path / "c", b"{nope"), tvm.cpu())
    bad = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    with pytest.raises(ArtifactError, match=r"tensor 'w' \(F32 \[4\]\) has data_offsets \[0, 12\]: expected 16 bytes"):
        read_params(_file(tmp_path / "d", bad, b"\0" * 12), tvm.cpu())
    odd = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    with pytest.raises(ArtifactError, match=r"tensor 'w' has dtype 'C64'; expected one of F64"):
        read_params(_file(tmp_path / "e", odd, b"\0" * 8), tvm.cpu())
    short = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    with pytest.raises(ArtifactError, match=r"expected 16 bytes inside the file's 8"):
        read_params(_file(tmp_path / "f", short, b"\0" * 8), tvm.cpu())
