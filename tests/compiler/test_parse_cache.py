"""tir_kernels/parse_cache.py: a kernel factory parses once per arguments; other arguments, other kernels."""
from tir_kernels import int4_dot, int4_matmul
from tir_kernels.kv_cache import prefix_attention


def test_same_arguments_same_primfunc():
    assert int4_matmul(64, 96) is int4_matmul(64, 96)
    assert int4_matmul(64, 96) is not int4_matmul(96, 64)
    assert prefix_attention(2, 2, 16, queries=None) is prefix_attention(2, 2, 16, queries=None)
    assert prefix_attention(2, 2, 16, queries=None) is not prefix_attention(2, 2, 16)


def test_dot_isa_keys_by_identity():
    """DotISA holds a dict (unhashable by value): the module's ISA constants key the cache by identity."""
    avx2 = int4_dot.int4_matmul_dot(64, 64, int4_dot.X86_AVX2)
    assert avx2 is int4_dot.int4_matmul_dot(64, 64, int4_dot.X86_AVX2)
    assert avx2 is not int4_dot.int4_matmul_dot(64, 64, int4_dot.X86_VNNI)
    assert str(avx2.attrs["mobilemoe.dot"]) == "avx2"
