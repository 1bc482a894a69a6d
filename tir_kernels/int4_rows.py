"""Row lanes: INT4 dot kernels for CPUs without an int8 dot instruction (x86 AVX2: Zen 3, Haswell..).

int4_dot.py's layout gives each vector lane one WORD of one row (lanes words of a row side by side),
so a lane's dot covers 8 weights of one group, and every vector of every row needs its own
convert, scale and FMA (or, in int4_dot_gemm.py, a 4-row transpose-add first). Without a dot
instruction each of those dots is itself three instructions (pmaddubsw, pmaddwd, add), and the
kernel ran at ~4 multiply-adds per instruction.

Here each lane is one ROW: the weights are interleaved by (rows, 1) (mobilemoe.quant.interleave_int4:
word j of ``rows`` consecutive rows side by side, then word j + 1), so one vector load brings word j
of ``rows`` rows and the activation word is the same for every lane (a broadcast). A group of 32
weights is 4 words; per token row its ``rows`` group sums take

    8 pmaddubsw (u8 codes x s8 activations, int16 pair sums, |2 * 15 * 127| = 3810 each)
    7 int16 adds (8 * 3810 = 30480 < 2^15: the whole group's pairs add exactly in int16)
    1 pmaddwd with ones (int16 pairs -> int32: lane r = row r's exact group sum)
    1 add of the zero point (-8 * sum of the group's activations: the same for every row)
    1 convert, 1 multiply (row scales x the activation scale), 1 FMA

for ``32 * rows`` multiply-adds, ~2.5x fewer instructions than the word-lane kernels, with the
weights' unpacking (and, w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F) shared by the token rows of a
tile, and no horizontal sums at all: lane r of the accumulator is output row r. With a dot
instruction (vpdpbusd) the same shape is 8 dots from the zero point, and the ISA keeps its word-lane
kernels (DotISA.row_lanes says which layout an ISA's kernels read).

Numerics are int4_dot.py's (mobilemoe.quant.int8_int4_matmul): int8 activations per group of 32,
exact int32 group sums, fp32 accumulation of ``sum * sw[n, g] * sx[g]`` (here one fp32 add per group
and row instead of one per word).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

WORDS = 4  # words per weight group (32 nibbles)


def _s16(isa, v: int, w, x):
    """int16 x 2v: pmaddubsw of v weight words (codes 0..15) and v broadcast activation words."""
    b = f"int8x{4 * v}"
    return tirx.call_llvm_pure_intrin(f"int16x{2 * v}", isa.intrinsics[v][0], tirx.reinterpret(b, w),
                                      tirx.reinterpret(b, x))


def group_sum(isa, v: int, zero, los, his, evens, odds):
    """int32 x v: lane r = sum over the group's 4 words j of row r's codes x activations, plus `zero`.

    los / his: the 4 words' low / high nibbles (uint32 x v, one row per lane); evens / odds: the 4
    activation words (int32 scalars: bytes of q[8j + 0, 2, 4, 6] / q[8j + 1, 3, 5, 7])."""
    bcast = [(tirx.Broadcast(e, v), tirx.Broadcast(o, v)) for e, o in zip(evens, odds)]
    intrinsic = isa.intrinsics[v]
    if not isinstance(intrinsic, tuple):  # a dot instruction: 8 dots from the zero point
        acc = zero
        b = f"int8x{4 * v}"
        for lo, hi, (e, o) in zip(los, his, bcast):
            for w, x in ((lo, e), (hi, o)):
                acc = tirx.call_llvm_pure_intrin(f"int32x{v}", intrinsic, acc, tirx.reinterpret(b, w),
                                                 tirx.reinterpret(b, x))
        return acc
    pairs = [_s16(isa, v, w, x) for lo, hi, (e, o) in zip(los, his, bcast) for w, x in ((lo, e), (hi, o))]
    while len(pairs) > 1:  # a tree of int16 adds (exact: see the module doc)
        pairs = [a + b for a, b in zip(pairs[0::2], pairs[1::2])]
    ones = tirx.Broadcast(tirx.const(1, "int16"), 2 * v)
    return zero + tirx.call_llvm_pure_intrin(f"int32x{v}", intrinsic[1], pairs[0], ones)


def row_scales(s, e, row0, g, v: int):
    """float32 x v: the scales of rows row0 .. row0 + v - 1 in group g. The scales (s [E, N, K // 32])
    are interleaved (v, 1) like the codes (int4_dot.scales_interleave_for): group g of the row block
    starting at row0 is the v values at flat offset row0 * (K // 32) + g * v of the expert, one load
    (written as an index into row row0 that runs past its K // 32: the flattened offset is the same)."""
    return tirx.Cast(f"float32x{v}", s[e, row0, tirx.Ramp(g * v, 1, v)])


def nibbles(wf, e, row0, rows: int, kw: int, j):
    """(low, high) nibbles of word j of rows row0 .. row0 + rows - 1 (wf [E, N * kw] interleaved (rows, 1))."""
    mask = tirx.Broadcast(tirx.const(0x0F0F0F0F, "uint32"), rows)
    w = wf[e, tirx.Ramp((row0 // rows * kw + j) * rows, 1, rows)]
    return w & mask, (w >> tirx.Broadcast(tirx.const(4, "uint32"), rows)) & mask


def block_macro(kw: int, rows: int, isa):
    """int4_dot._block_macro's contract for row lanes: acc[r] (r < rows) = row row0 + r of expert e
    against activation row i of (xe, xo, xc, xs) [m, kw] (int4_dot.py's per-word layout)."""
    v = rows

    @T.macro
    def block(acc, w, s, e, row0, xe, xo, xc, xs, i):
        acc[T.ramp(0, 1, v)] = T.Broadcast(T.float32(0), v)
        for g in range(T.int64(kw // WORDS)):
            acc[T.ramp(0, 1, v)] = acc[T.ramp(0, 1, v)] + T.Cast(f"float32x{v}", group_sum(
                isa, v, T.Broadcast(xc[i, g * 4] + xc[i, g * 4 + 1] + xc[i, g * 4 + 2] + xc[i, g * 4 + 3], v),
                [nibbles(w, e, row0, rows, kw, g * 4 + j)[0] for j in range(WORDS)],
                [nibbles(w, e, row0, rows, kw, g * 4 + j)[1] for j in range(WORDS)],
                [xe[i, g * 4 + j] for j in range(WORDS)], [xo[i, g * 4 + j] for j in range(WORDS)])
            ) * (row_scales(s, e, row0, g, v) * T.Broadcast(xs[i, g * 4], v))

    return block


def tile_macro(kw: int, rows: int, m_tile: int, isa):
    """int4_dot_gemm's tile contract for row lanes: acc[t * rows + r] = row row0 + r of expert e against
    token row tok[t] (t < m_tile) of xq [M, kw, 4, 1] (int4_dot_gemm's layout with one word per block:
    per word, the even and odd activation bytes, the zero point and the scale's bits)."""
    v = rows

    def x(xq, tok, t, j, slot):
        return xq[tok[t], j, slot, 0]

    @T.macro
    def tile(acc, wf, s, e, row0, xq, tok):
        for t in T.unroll(m_tile):
            acc[T.ramp(t * v, 1, v)] = T.Broadcast(T.float32(0), v)
        for g in range(T.int64(kw // WORDS)):
            l0: T.let = nibbles(wf, e, row0, rows, kw, g * 4)[0]
            h0: T.let = nibbles(wf, e, row0, rows, kw, g * 4)[1]
            l1: T.let = nibbles(wf, e, row0, rows, kw, g * 4 + 1)[0]
            h1: T.let = nibbles(wf, e, row0, rows, kw, g * 4 + 1)[1]
            l2: T.let = nibbles(wf, e, row0, rows, kw, g * 4 + 2)[0]
            h2: T.let = nibbles(wf, e, row0, rows, kw, g * 4 + 2)[1]
            l3: T.let = nibbles(wf, e, row0, rows, kw, g * 4 + 3)[0]
            h3: T.let = nibbles(wf, e, row0, rows, kw, g * 4 + 3)[1]
            sw: T.let = row_scales(s, e, row0, g, v)
            for t in T.unroll(m_tile):
                acc[T.ramp(t * v, 1, v)] = acc[T.ramp(t * v, 1, v)] + T.Cast(f"float32x{v}", group_sum(
                    isa, v, T.Broadcast(x(xq, tok, t, g * 4, 2) + x(xq, tok, t, g * 4 + 1, 2)
                                        + x(xq, tok, t, g * 4 + 2, 2) + x(xq, tok, t, g * 4 + 3, 2), v),
                    [l0, l1, l2, l3], [h0, h1, h2, h3],
                    [x(xq, tok, t, g * 4 + j, 0) for j in range(WORDS)],
                    [x(xq, tok, t, g * 4 + j, 1) for j in range(WORDS)])
                ) * (sw * T.Broadcast(T.reinterpret("float32", x(xq, tok, t, g * 4, 3)), v))

    return tile
