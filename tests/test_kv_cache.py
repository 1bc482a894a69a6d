"""mobilemoe/kv_cache.py: the in-place cache form in PyTorch (eager) equals the growing cache."""
import pytest
import torch

from mobilemoe import kv_cache


def test_inplace_forward_equals_functional_cache(tiny_moe):
    ids = torch.randint(3, tiny_moe.config.vocab_size, (1, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = tiny_moe(ids)
        cache = kv_cache.empty_cache(tiny_moe.config, 2 * kv_cache.BLOCK)
        got = []
        for t in range(ids.shape[1]):
            logits, cache = tiny_moe(ids[:, t:t + 1], torch.tensor([[t]]), cache, inplace=True)
            got.append(logits[0, -1])
    assert torch.allclose(torch.stack(got), ref[0], atol=1e-5)
    assert cache[0][0].shape[-1] == 2 * kv_cache.BLOCK  # the capacity never changes


def test_prefix_attention_reads_only_the_valid_prefix():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 16, 64), torch.randn(1, 2, 64, 16)
    pos = torch.tensor([[20]])
    out = kv_cache.prefix_attention(q, k, v, pos)
    k2, v2 = k.clone(), v.clone()
    k2[..., 21:], v2[:, :, 21:] = float("nan"), float("nan")  # slots past the position: never read
    assert torch.equal(kv_cache.prefix_attention(q, k2, v2, pos), out)


def test_inplace_needs_positions_and_a_layered_cache(tiny_moe):
    with pytest.raises(ValueError, match="inplace"):
        tiny_moe(torch.zeros(1, 1, dtype=torch.int64), None, kv_cache.empty_cache(tiny_moe.config, 32), inplace=True)


def test_capacity_is_whole_blocks():
    assert kv_cache.capacity_for(1) == kv_cache.BLOCK and kv_cache.capacity_for(4096) == 4096
    assert kv_cache.capacity_for(1000) % kv_cache.BLOCK == 0 and kv_cache.capacity_for(1000) >= 1000
