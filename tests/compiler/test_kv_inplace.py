"""The in-place KV cache (mobilemoe/kv_cache.py, tir_kernels/kv_cache.py): long decode equals the
reference, the buffers are written in place, and a steady-state step allocates nothing."""
import numpy as np
import pytest
import torch

from compiler.build import build
from compiler.generation import kernel_time, minor_faults
from mobilemoe.checkpoint import load_checkpoint, save_checkpoint
from mobilemoe.config import MobileMoEConfig
from mobilemoe.model import MobileMoE
from mobilemoe.runtimes import load_artifact

PROMPT, STEPS = 1000, 300


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    """test-moe with 64-wide heads (512 bytes per cached position and layer) and room for 1300 tokens."""
    torch.manual_seed(0)
    cfg = MobileMoEConfig.from_name("test-moe").replace(name="test-moe-long", head_dim=64, max_seq_len=1536)
    return save_checkpoint(MobileMoE(cfg), tmp_path_factory.mktemp("kv") / "ckpt")


@pytest.fixture(scope="module")
def inplace_float(long_ckpt):
    return build(long_ckpt, "host", long_ckpt.parent / "inplace", quant="none", verbose=False)


@pytest.fixture(scope="module")
def grow_float(long_ckpt):
    return build(long_ckpt, "host", long_ckpt.parent / "grow", quant="none", verbose=False, kv_cache="grow")


def _address(t) -> int:
    return np.from_dlpack(t).ctypes.data


def test_inplace_decode_equals_reference_300_steps_past_1000_tokens(long_ckpt, inplace_float):
    model = load_checkpoint(long_ckpt).float().eval()
    prompt = [int(i) for i in np.random.default_rng(0).integers(3, model.config.vocab_size, PROMPT)]
    ref, tokens = [], []
    with torch.no_grad():  # the PyTorch reference: functional cache, greedy
        logits, kv = model(torch.tensor([prompt]), kv=None, last_only=True)
        for _ in range(STEPS):
            tokens.append(int(logits[0, -1].argmax()))
            logits, kv = model(torch.tensor([[tokens[-1]]]), kv=kv, last_only=True)
            ref.append(logits[0, -1].numpy())
    rt = load_artifact(inplace_float)
    assert rt.kv_inplace
    _, kv = rt.prefill(prompt)
    assert kv.capacity is not None and kv.capacity >= PROMPT + STEPS
    buffers = [_address(t) for t in kv.values]
    got = []
    for t in tokens:
        logits, kv = rt.decode(t, kv)
        got.append(np.array(logits))
    got, ref = np.stack(got), np.stack(ref)
    err = np.abs(got - ref).max()
    print(f"in-place decode vs PyTorch, {STEPS} steps past {PROMPT} tokens: max logit error {err:.2e}")
    assert err <= 1e-3 and (got.argmax(-1) == ref.argmax(-1)).all()
    assert [_address(t) for t in kv.values] == buffers  # every step wrote the same buffers
    assert kv.length == PROMPT + STEPS and kv.numpy().shape[4] == PROMPT + STEPS


def test_inplace_and_grow_artifacts_agree(inplace_float, grow_float):
    outs = []
    for path in (inplace_float, grow_float):
        rt = load_artifact(path)
        logits, kv = rt.prefill(list(range(3, 200)))
        seq = [np.array(logits)]
        for _ in range(40):  # past the first capacity's end: the cache moves once
            logits, kv = rt.decode(int(np.argmax(logits)), kv)
            seq.append(np.array(logits))
        logits, kv = rt.prefill(list(range(7, 30)), kv)  # a second prompt after decoding (chat turns)
        seq.append(np.array(logits))
        for _ in range(3):
            logits, kv = rt.decode(int(np.argmax(logits)), kv)
            seq.append(np.array(logits))
        assert kv.length == 197 + 40 + 23 + 3
        outs.append(np.stack(seq))
    assert np.abs(outs[0] - outs[1]).max() <= 1e-4


def test_no_allocation_per_steady_state_step(inplace_float, grow_float):
    counts = {}
    for name, path in (("inplace", inplace_float), ("grow", grow_float)):
        rt = load_artifact(path)
        logits, kv = rt.prefill(list(range(3, 131)))
        token = int(np.argmax(logits))
        for _ in range(4):  # warm-up: the pool and the first pages
            logits, kv = rt.decode(token, kv)
            token = int(np.argmax(logits))
        counts[name] = kernel_time(rt, kv, token, steps=24)["new_storage_per_step"]
        faults = minor_faults()
        for _ in range(32):
            logits, kv = rt.decode(token, kv)
            token = int(np.argmax(logits))
        counts[name + " faults"] = minor_faults() - faults
    print(f"new storage requests per step: {counts}")
    assert sum(counts["inplace"]) == 0  # counted: every request is served by the pool, no new memory
    assert sum(counts["grow"]) > 0  # the growing cache needs new memory (the counter sees it)
    assert counts["inplace faults"] <= 2  # page faults over 32 steady-state steps (Python's own, at most)


# the kernel's register tiles: rep 3 -> 1 head per tile, 4 -> one tile of 4, 8 -> two tiles of 4; d 24 -> 8 lanes
@pytest.mark.parametrize("nkv,rep,d", [(2, 3, 16), (1, 4, 64), (2, 8, 24)])
def test_prefix_attention_kernel_for_a_prompt_chunk_equals_the_op(nkv, rep, d):
    """The symbolic-token kernel (the in-place prefill): each token attends to slots 0..its
    position; stale slots past the last position (finite: the runtime zeroes a new cache) change nothing."""
    import tvm
    from mobilemoe import kv_cache
    from tir_kernels.kv_cache import prefix_attention
    cap = 3 * kv_cache.BLOCK
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, nkv * rep, 7, d)).astype("float32")
    k = rng.standard_normal((1, nkv, d, cap)).astype("float32")
    v = rng.standard_normal((1, nkv, cap, d)).astype("float32")
    pos = np.arange(40, 47, dtype="int64")[None]  # a chunk of 7 tokens across the second block boundary
    k[..., 47:], v[:, :, 47:] = 1e4, -1e4  # stale slots
    want = kv_cache.prefix_attention(*map(torch.from_numpy, (q, k, v, pos))).numpy()
    f = prefix_attention(nkv, rep, d, queries=None).with_attr("global_symbol", "main")
    lib = tvm.tirx.build(tvm.IRModule({"main": f}), target="llvm")
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (q, k, v, pos)] + [tvm.runtime.empty(q.shape, "float32", dev)]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), want, rtol=1e-5, atol=1e-5)
    # decode's kernel (one token, static): the chunk's last token alone
    f1 = prefix_attention(nkv, rep, d, queries=1).with_attr("global_symbol", "main")
    lib1 = tvm.tirx.build(tvm.IRModule({"main": f1}), target="llvm")
    one = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (q[:, :, -1:], k, v, pos[:, -1:])]
    one.append(tvm.runtime.empty(q[:, :, -1:].shape, "float32", dev))
    lib1["main"](*one)
    np.testing.assert_allclose(one[-1].numpy(), want[:, :, -1:], rtol=1e-5, atol=1e-5)


def test_kv_write_refuses_a_position_past_the_capacity():
    """A write past the cache's end is an error from the kernel, never a write out of bounds."""
    import tvm
    from tir_kernels.kv_cache import kv_write
    lib = tvm.tirx.build(tvm.IRModule({"main": kv_write(2, 16).with_attr("global_symbol", "main")}), target="llvm")
    k, v = np.zeros((1, 2, 16, 32), "float32"), np.zeros((1, 2, 32, 16), "float32")
    args = [tvm.runtime.tensor(a) for a in (k, v, np.ones((1, 2, 16, 3), "float32"), np.ones((1, 2, 3, 16), "float32"))]
    lib["main"](*args, tvm.runtime.tensor(np.array([[5, 6, 7]], "int64")))
    assert np.from_dlpack(args[0])[0, :, :, 5:8].all() and not np.from_dlpack(args[0])[0, :, :, 8:].any()
    with pytest.raises(Exception, match="kv_write: a position past the KV cache's capacity"):
        lib["main"](*args, tvm.runtime.tensor(np.array([[30, 31, 32]], "int64")))
