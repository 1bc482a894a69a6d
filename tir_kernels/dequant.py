"""The INT4 dequantization of mobilemoe.quant's layout, as a TIR expression shared by every kernel.

``w[n, k] = (((word[n, k // 8] >> 4 * (k % 8)) & 15) - 8) * float(scale[n, k // 32])`` (layout
``INT4_LAYOUT``). Kernels inline it into their reduction, so no fp32 weight is ever materialised.
"""

from tvm import tirx

from mobilemoe.quant import BITS, GROUP_SIZE, INT4_LAYOUT, NIBBLES_PER_WORD, ZERO_CODE

PACKED_DTYPE = "uint32"
SCALE_DTYPE = "float16"
NIBBLE_MASK = (1 << BITS) - 1

__all__ = [
    "GROUP_SIZE",
    "INT4_LAYOUT",
    "NIBBLES_PER_WORD",
    "PACKED_DTYPE",
    "SCALE_DTYPE",
    "check_int4_shape",
    "dequant_int4",
]


def dequant_int4(word: tirx.Expr, scale: tirx.Expr, k: tirx.Expr) -> tirx.Expr:
    """fp32 weight at input index k, given the uint32 word holding k and the fp16 scale of k's group."""
    shift = tirx.Cast(PACKED_DTYPE, (k % NIBBLES_PER_WORD) * BITS)
    nibble = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(NIBBLE_MASK, PACKED_DTYPE))
    scale_f32 = tirx.Cast("float32", scale)
    # (u - 8) * s written as u * s - 8 * s: every term is exact in fp32 (4-bit x fp16 mantissa), so
    # the value is identical, and LLVM emits one fused multiply-subtract instead of an integer add,
    # a convert and a multiply.
    u = tirx.Cast("float32", tirx.Cast("int32", nibble))
    return u * scale_f32 - scale_f32 * tirx.const(float(ZERO_CODE), "float32")


def check_int4_shape(kernel: str, n: int, k: int, dtype: str) -> None:
    """Raise ValueError unless [n, k] is a valid INT4 weight shape for a kernel with `dtype` activations."""
    if n <= 0 or k <= 0 or k % GROUP_SIZE:
        raise ValueError(
            f"{kernel}: weight [N={n}, K={k}] needs N > 0 and K a positive multiple of {GROUP_SIZE} "
            f"({INT4_LAYOUT})"
        )
    if dtype != "float32":
        raise ValueError(f"{kernel}: activations must be float32, got {dtype!r}")
