"""The GEMM register tile of int4_dot_gemm.py on Arm's i8mm matrix instruction (smmla).

    smmla  Vd.4S, Vn.16B, Vm.16B    d[2i + j] += sum_{k < 8} n[8i + k] * m[8j + k]   (i, j < 2)

One smmla multiplies a 2 x 8 block of int8 activations (two token rows) by an 8 x 2 block of
weights (two output rows, stored as their two 8-byte rows) into the 2 x 2 int32 outputs: 32
multiply-adds, where sdot does 16. Phones with i8mm (Armv8.6-A: Cortex-X3 / A715 and later, e.g.
Snapdragon 8 Gen 2) run it at sdot's rate, so prefill's GEMM tiles do twice the work per
instruction. Targets that list ``+i8mm`` get int4_dot.ARM_I8MM; its GEMVs (decode, m = 1, and the
remainder token rows) stay on sdot.

Layouts are int4_dot_gemm.py's, unchanged: weights interleaved by (rows, lanes = 4), so word block b
of a row is its 4 words = one group of 32 codes; activations ``xq [M, K // 32, 4, 4]`` (even
nibbles' bytes, odd nibbles' bytes, the -8 * sum zero point per word, the scale). For a pair of
weight rows (r0, r1) and a pair of tokens (t0, t1), per word block:

    weights  lo = w & 0x0F0F0F0F, hi = (w >> 4) & 0x0F0F0F0F (bytes of codes k = 8w + {0,2,4,6} / {1,3,5,7})
             B_lo01 = [lo_r0 words 0, 1 | lo_r1 words 0, 1]   (zip of 64-bit halves), B_lo23, B_hi01, B_hi23
    tokens   A_e01 = [xq even t0 words 0, 1 | t1 words 0, 1], A_e23, A_o01, A_o23
    d = smmla(smmla(smmla(smmla(z, A_e01, B_lo01), A_e23, B_lo23), A_o01, B_hi01), A_o23, B_hi23)

with z = [c_t0, c_t0, c_t1, c_t1], c_t the token's block zero point (its 4 words' sum), so d holds
the exact int32 group sums [t0 r0, t0 r1, t1 r0, t1 r1]; one convert and one FMA by
[s_r0 sx_t0, s_r1 sx_t0, s_r0 sx_t1, s_r1 sx_t1] add them to the fp32 accumulator. A tile is 4
weight rows x ``m_tile`` tokens (2 x m_tile / 2 accumulators); it fills int4_dot_gemm's group-tile
accumulator contract (acc[t * 4 + r]: token t, row row0 + r), so the callers are the same.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .int4_dot import LOW_NIBBLES, DotISA

LANES = 4  # int32 words per 128-bit vector: one weight group per word block


def supports(isa: DotISA, lanes: int, rows: int, m_tile: int) -> bool:
    """Whether the smmla tile applies: an ISA with mmla, 4-word blocks, row quads, token pairs."""
    return bool(isa.mmla) and lanes == LANES and rows % 4 == 0 and m_tile % 2 == 0


def _zip(a, b, high: bool):
    """int32x4: the low (or high) 64-bit halves of a and b side by side (zip1 / zip2 .2d)."""
    return tirx.Shuffle([a, b], [2, 3, 6, 7] if high else [0, 1, 4, 5])


EMULATED = "emulated"  # DotISA.mmla for smmla's arithmetic in plain vector TIR (tests on any host)


def _mmla(isa: DotISA, acc, acts, weights):
    if isa.mmla == EMULATED:
        return acc + _mmla_reference(acts, weights)
    return tirx.call_llvm_pure_intrin("int32x4", isa.mmla, acc, tirx.reinterpret("int8x16", acts),
                                      tirx.reinterpret("int8x16", weights))


def _mmla_reference(acts, weights):
    """smmla's product in vector TIR: [sum_k a[8i + k] * b[8j + k] for (i, j) in (0,0), (0,1), (1,0), (1,1)]."""
    a = tirx.Cast("int32x16", tirx.reinterpret("int8x16", acts))
    b = tirx.Cast("int32x16", tirx.reinterpret("int8x16", weights))
    ij = [(i, j) for i in range(2) for j in range(2)]
    prod = tirx.Shuffle([a, a], [8 * i + k for i, _ in ij for k in range(8)]) * \
        tirx.Shuffle([b, b], [8 * j + k for _, j in ij for k in range(8)])  # int32x32: 4 groups of 8
    size = 8
    while size > 1:  # sum each group of `size` lanes by halves
        half, groups = size // 2, 4
        lo = [g * size + k for g in range(groups) for k in range(half)]
        hi = [g * size + half + k for g in range(groups) for k in range(half)]
        prod = tirx.Shuffle([prod], lo) + tirx.Shuffle([prod], hi)
        size = half
    return prod


def _pair(v0, v1, a: int, b: int):
    """[v0[a], v0[b], v1[a], v1[b]]."""
    return tirx.Shuffle([v0, v1], [a, b, 4 + a, 4 + b])


def mmla_group_tile_macro(kw: int, rows: int, m_tile: int, isa: DotISA):
    """TIR macro with int4_dot_gemm._group_tile_macro's contract on smmla (the module doc):
    acc[t * 4 + r] = token tok[t]'s output of weight row row0 + r (r < 4; row0 % 4 == 0) of expert e,
    t < m_tile (even); wf [E, N * kw] interleaved by (rows, 4), s [E, N, kw // 4], xq as int4_dot_gemm."""
    mask = tirx.Broadcast(tirx.const(LOW_NIBBLES, "uint32"), LANES)
    four = tirx.Broadcast(tirx.const(4, "uint32"), LANES)
    kb = kw // LANES
    pairs = m_tile // 2

    def word(wf, e, row0, b, r):
        return wf[e, tirx.Ramp((row0 // rows * kb + b) * (rows * LANES) + (row0 % rows + r) * LANES, 1, LANES)]

    def xv(xq, tok, t, b, slot):
        return xq[tok[t], b, slot, tirx.Ramp(0, 1, LANES)]

    def zero_point(xq, tok, p, b):
        """[c_t0, c_t0, c_t1, c_t1]: each token's 4-word block zero point, summed by pairs of lanes."""
        v0, v1 = xv(xq, tok, 2 * p, b, 2), xv(xq, tok, 2 * p + 1, b, 2)
        h = _pair(v0, v1, 0, 1) + _pair(v0, v1, 2, 3)  # [v0 0+2, v0 1+3, v1 0+2, v1 1+3]
        return tirx.Shuffle([h], [0, 0, 2, 2]) + tirx.Shuffle([h], [1, 1, 3, 3])

    def act_scales(xq, tok, p, b):  # [sx_t0, sx_t0, sx_t1, sx_t1]
        return tirx.reinterpret("float32x4", _pair(xv(xq, tok, 2 * p, b, 3), xv(xq, tok, 2 * p + 1, b, 3), 0, 0))

    def row_scales(s, e, row0, b, q):  # [s_r0, s_r1, s_r0, s_r1] of row pair q
        r0 = tirx.Cast("float32", s[e, row0 + 2 * q, b])
        r1 = tirx.Cast("float32", s[e, row0 + 2 * q + 1, b])
        return tirx.Shuffle([r0, r1, r0, r1], [0, 1, 2, 3])

    def acc_at(q, p):  # the accumulator of row pair q, token pair p (inside the tile's 4 * m_tile floats)
        return tirx.Ramp((p * 2 + q) * LANES, 1, LANES)

    @T.macro
    def tile(acc, wf, s, e, row0, xq, tok):
        for p in T.unroll(pairs):
            for q in T.unroll(2):
                acc[acc_at(q, p)] = T.Broadcast(T.float32(0), LANES)
        for b in range(T.int64(kb)):
            w0: T.let = word(wf, e, row0, b, 0)
            w1: T.let = word(wf, e, row0, b, 1)
            w2: T.let = word(wf, e, row0, b, 2)
            w3: T.let = word(wf, e, row0, b, 3)
            bl0: T.let = _zip(w0 & mask, w1 & mask, False)  # rows 0, 1: even nibbles, words 0-1
            bl1: T.let = _zip(w0 & mask, w1 & mask, True)  # words 2-3
            bh0: T.let = _zip((w0 >> four) & mask, (w1 >> four) & mask, False)
            bh1: T.let = _zip((w0 >> four) & mask, (w1 >> four) & mask, True)
            cl0: T.let = _zip(w2 & mask, w3 & mask, False)  # rows 2, 3
            cl1: T.let = _zip(w2 & mask, w3 & mask, True)
            ch0: T.let = _zip((w2 >> four) & mask, (w3 >> four) & mask, False)
            ch1: T.let = _zip((w2 >> four) & mask, (w3 >> four) & mask, True)
            sw0: T.let = row_scales(s, e, row0, b, 0)
            sw1: T.let = row_scales(s, e, row0, b, 1)
            for p in T.unroll(pairs):
                e0: T.let = xv(xq, tok, 2 * p, b, 0)
                e1: T.let = xv(xq, tok, 2 * p + 1, b, 0)
                o0: T.let = xv(xq, tok, 2 * p, b, 1)
                o1: T.let = xv(xq, tok, 2 * p + 1, b, 1)
                ae0: T.let = _zip(e0, e1, False)
                ae1: T.let = _zip(e0, e1, True)
                ao0: T.let = _zip(o0, o1, False)
                ao1: T.let = _zip(o0, o1, True)
                z: T.let = zero_point(xq, tok, p, b)
                sx: T.let = act_scales(xq, tok, p, b)
                d0: T.let = _mmla(isa, _mmla(isa, _mmla(isa, _mmla(isa, z, ae0, bl0), ae1, bl1), ao0, bh0), ao1, bh1)
                d1: T.let = _mmla(isa, _mmla(isa, _mmla(isa, _mmla(isa, z, ae0, cl0), ae1, cl1), ao0, ch0), ao1, ch1)
                acc[acc_at(0, p)] = acc[acc_at(0, p)] + T.Cast("float32x4", d0) * (sw0 * sx)
                acc[acc_at(1, p)] = acc[acc_at(1, p)] + T.Cast("float32x4", d1) * (sw1 * sx)
        for p in T.unroll(pairs):  # [t0 r0, t0 r1, t1 r0, t1 r1] x 2 row pairs -> acc[t * 4 + r]
            a0: T.let = acc[acc_at(0, p)]
            a1: T.let = acc[acc_at(1, p)]
            acc[T.ramp(2 * p * LANES, 1, LANES)] = _pair(a0, a1, 0, 1)
            acc[T.ramp((2 * p + 1) * LANES, 1, LANES)] = _pair(a0, a1, 2, 3)

    return tile
