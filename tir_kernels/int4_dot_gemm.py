"""M-tiled INT4 x int8 dot-product GEMMs for prefill (m > 1 token rows): int4_matmul and the grouped
MoE expert GEMMs (moe_grouped.py's contract), on int4_dot.py's instruction and weight layout.

Numerics are int4_dot.py's (mobilemoe.quant.int8_int4_matmul): activations quantized per call to
int8 per group of 32, exact int32 sums per word, fp32 accumulation of ``dot * sw[n, g] * sx[g]``.

Activation layout (one call-time pass, ``quantize``): per token row i and word block b (``lanes``
packed words, the lanes of one dot), four int32 vectors side by side, one 4 * lanes * 4-byte line

    xq [M, K // (8 lanes), 4, lanes]  int32   0: bytes of q[8w + 0, 2, 4, 6] (even nibbles)
                                              1: bytes of q[8w + 1, 3, 5, 7] (odd nibbles)
                                              2: -8 * sum_i q[8w + i] (the zero point: the dot's start)
                                              3: sx of word w's group (float32 bits)

so a tile's activations are MT short sequential streams rather than 4 MT.

Tiling. The weights are interleaved by (rows, lanes) = int4_dot.interleave_for(isa, N, K): the
``lanes`` words of word block b of the ``rows`` rows of a row block are contiguous. The output is
computed in register tiles of 4 output rows x MT token rows (``_group_tile_macro``): for each word
block the 4 weight vectors are loaded and unpacked ONCE (``w & 0x0F0F0F0F``, ``(w >> 4) & 0x0F0F0F0F``)
and each feeds MT token rows (2 dots per row and token). A 128-bit lane of a dot result holds the 4
words of one weight group, so the 4 rows' results are transpose-added per 128-bit lane (4 two-source
shuffles, 3 adds: shufps on x86) into one int32 vector, lane 4j + r = row r's exact group sum, and
only then converted and scaled (the 4 rows' scales in that order, times the activation scales):
1 convert, 1 multiply, 1 FMA per 8 dots instead of per 2 (the fp32 work, not the unpacking, is what
kept int4_dot's blocks at ~30% of the dot peak). The MT accumulators hold 4 outputs per 128-bit lane;
they are folded to 4 outputs and stored as one vector. Row blocks of fewer than 4 rows (N % 4) use
``_tile_macro``: R rows x MT tokens, a per-lane fp32 accumulator each.
Token rows beyond the last whole tile run one at a time on 8-row blocks as int4_dot's GEMV, so m = 1 does
exactly the GEMV's work. int4_matmul runs in passes of CHUNK token rows (their int8 activations stay
in L2), each parallel over row blocks (the block's weights stay in L1 across the token tiles); the
grouped kernels run each non-empty expert's sorted rows, parallel over row blocks (as moe_grouped.py).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .dequant import GROUP_SIZE, NIBBLES_PER_WORD, check_int4_shape
from .int4_mmla import mmla_group_tile_macro, supports as mmla_supports
from .int4_rows import tile_macro as rows_tile_macro
from .int4_dot import LOW_NIBBLES, WORDS_PER_GROUP, DotISA, dot_pair, interleave_for, kernel_attrs, lane_scales, \
    lane_sum, pack4, row_result
from .launch import SERIAL_ROWS
from .moe_grouped import ARGS_ATTR
from .parse_cache import parsed_once

MT = 4  # token rows per register tile (this znver4 host: 2 -> 40%, 4 -> 50% of the dot peak, 6 / 8 ~ 4)
# row lanes (int4_rows.py, AVX2 on Zen 3, 1024 x 1024 at m = 128, one thread, interleaved runs):
# 2 -> 30, 3 -> 32, 4 -> 33, 6 -> 43, 8 -> 38 GMAC/s
MT_ROW_LANES = 6
CHUNK = 128  # token rows per pass over the weights (int4_matmul): 128 x K int8 activations stay in L2
R = 4  # output rows per register tile of _tile_macro (row blocks of fewer than 4 rows only)


def _quantize_macro(k: int, lanes: int):
    """TIR macro: x [m, k] (rows src(i)) -> xq [m, k // (8 lanes), 4, lanes] (the module doc's layout)."""
    kg = k // GROUP_SIZE

    @T.macro
    def quantize_row(x, xq, i):
        amax = T.alloc_buffer((1,), "float32", scope="global")
        q = T.alloc_buffer((8,), "int32", scope="global")
        for g in range(T.int64(kg)):
            amax[0] = T.float32(0)
            for j in range(GROUP_SIZE):
                amax[0] = T.max(amax[0], T.fabs(x[i, g * GROUP_SIZE + j]))
            inv: T.let = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            for wd in range(WORDS_PER_GROUP):
                wi: T.let = g * WORDS_PER_GROUP + wd
                for j in T.unroll(8):
                    q[j] = T.Cast("int32", T.round(x[i, wi * 8 + j] * inv))
                xq[i, wi // lanes, 0, wi % lanes] = pack4(q[0], q[2], q[4], q[6])
                xq[i, wi // lanes, 1, wi % lanes] = pack4(q[1], q[3], q[5], q[7])
                xq[i, wi // lanes, 2, wi % lanes] = (q[0] + q[1] + q[2] + q[3] + q[4] + q[5] + q[6]
                                                     + q[7]) * T.int32(-8)
                xq[i, wi // lanes, 3, wi % lanes] = T.reinterpret("int32", amax[0] / T.float32(127))

    @T.macro
    def quantize(x, xq, m):
        if m <= SERIAL_ROWS:  # decode: no parallel launch for a row's ~1 us of work
            for i in range(m):
                quantize_row(x, xq, i)
        else:
            for i in T.parallel(m):
                quantize_row(x, xq, i)

    return quantize


def _tile_macro(kw: int, lanes: int, rows: int, r_tile: int, m_tile: int, isa: DotISA):
    """TIR macro: acc[(r * m_tile + t) * lanes ..] = per-lane partial sums of weight row row0 + r
    (r < r_tile; row0 % r_tile == 0) of expert e (wf [E, N * kw] flat, interleaved by (rows, lanes);
    s [E, N, kw // 4]) against token row tok[t] (t < m_tile) of xq."""
    mask = tirx.Broadcast(tirx.const(LOW_NIBBLES, "uint32"), lanes)
    four = tirx.Broadcast(tirx.const(4, "uint32"), lanes)
    kb = kw // lanes
    fvec = f"float32x{lanes}"

    def a(r, t):
        return tirx.Ramp((r * m_tile + t) * lanes, 1, lanes)

    def xv(xq, tok, t, b, slot):
        return xq[tok[t], b, slot, tirx.Ramp(0, 1, lanes)]

    @T.macro
    def tile(acc, wf, s, e, row0, xq, tok):
        for r in T.unroll(r_tile):
            for t in T.unroll(m_tile):
                acc[a(r, t)] = T.Broadcast(T.float32(0), lanes)
        for b in range(T.int64(kb)):
            for r in T.unroll(r_tile):
                wv: T.let = wf[e, T.ramp((row0 // rows * kb + b) * (rows * lanes) + (row0 % rows + r) * lanes, 1, lanes)]
                lo: T.let = wv & mask
                hi: T.let = (wv >> four) & mask
                sw: T.let = lane_scales(s, e, row0 + r, b, lanes)
                for t in T.unroll(m_tile):
                    d2: T.let = dot_pair(isa, lanes, xv(xq, tok, t, b, 2), lo, xv(xq, tok, t, b, 0), hi,
                                         xv(xq, tok, t, b, 1))
                    acc[a(r, t)] = acc[a(r, t)] + T.Cast(fvec, d2) * (
                        sw * T.reinterpret(fvec, xv(xq, tok, t, b, 3)))

    return tile


def _quad_sum(d0, d1, d2, d3, lanes: int):
    """int32 x lanes: lane 4j + r = the sum of the 4 lanes of 128-bit lane j (one weight group) of d_r
    (a 4 x 4 transpose-add per 128-bit lane: 4 two-source shuffles + 3 adds, shufps on x86)."""
    def pick(a, b, first, second):  # per 128-bit lane j: a[4j + first], b[4j + first], ... as given
        idx = []
        for j in range(lanes // 4):
            idx += [4 * j + first[0], 4 * j + first[1], lanes + 4 * j + second[0], lanes + 4 * j + second[1]]
        return tirx.Shuffle([a, b], idx)

    p01 = pick(d0, d1, (0, 1), (0, 1)) + pick(d0, d1, (2, 3), (2, 3))  # [d0 0+2, d0 1+3, d1 0+2, d1 1+3]
    p23 = pick(d2, d3, (0, 1), (0, 1)) + pick(d2, d3, (2, 3), (2, 3))
    return pick(p01, p23, (0, 2), (0, 2)) + pick(p01, p23, (1, 3), (1, 3))


def _quad_scales(s, e, row0, b, lanes: int):
    """fp32 x lanes: lane 4j + r = the scale of row row0 + r, group b * lanes / 4 + j."""
    gpb = lanes // WORDS_PER_GROUP
    if gpb == 1:  # a concat of 4 scalars
        return tirx.Shuffle([tirx.Cast("float32", s[e, row0 + r, b]) for r in range(4)], [0, 1, 2, 3])
    vecs = [tirx.Cast(f"float32x{gpb}", s[e, row0 + r, tirx.Ramp(b * gpb, 1, gpb)]) for r in range(4)]
    return tirx.Shuffle(vecs, [r * gpb + j for j in range(gpb) for r in range(4)])


def _quad_out(vec, lanes: int):
    """float32 x 4: sum over the 128-bit lanes of vec (lane r: output row row0 + r)."""
    while lanes > 4:
        half = lanes // 2
        vec = tirx.Shuffle([vec], list(range(half))) + tirx.Shuffle([vec], list(range(half, lanes)))
        lanes = half
    return vec


def _group_tile_macro(kw: int, lanes: int, rows: int, m_tile: int, isa: DotISA):
    """TIR macro: acc[t * lanes ..] = the partial sums of weight rows row0 .. row0 + 3 (row0 % 4 == 0)
    of expert e against token row tok[t] (t < m_tile), lane 4j + r for row r and group j of each
    word block: each weight group's int32 sum is completed before the one convert / scale / FMA."""
    mask = tirx.Broadcast(tirx.const(LOW_NIBBLES, "uint32"), lanes)
    four = tirx.Broadcast(tirx.const(4, "uint32"), lanes)
    kb = kw // lanes
    fvec = f"float32x{lanes}"

    def xv(xq, tok, t, b, slot):
        return xq[tok[t], b, slot, tirx.Ramp(0, 1, lanes)]

    def word(wf, e, row0, b, r):
        return wf[e, tirx.Ramp((row0 // rows * kb + b) * (rows * lanes) + (row0 % rows + r) * lanes, 1, lanes)]

    def dots(xq, tok, t, b, lo, hi):
        return dot_pair(isa, lanes, xv(xq, tok, t, b, 2), lo, xv(xq, tok, t, b, 0), hi, xv(xq, tok, t, b, 1))

    @T.macro
    def tile(acc, wf, s, e, row0, xq, tok):
        for t in T.unroll(m_tile):
            acc[T.ramp(t * lanes, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
        for b in range(T.int64(kb)):
            w0: T.let = word(wf, e, row0, b, 0)
            w1: T.let = word(wf, e, row0, b, 1)
            w2: T.let = word(wf, e, row0, b, 2)
            w3: T.let = word(wf, e, row0, b, 3)
            l0: T.let = w0 & mask
            l1: T.let = w1 & mask
            l2: T.let = w2 & mask
            l3: T.let = w3 & mask
            h0: T.let = (w0 >> four) & mask
            h1: T.let = (w1 >> four) & mask
            h2: T.let = (w2 >> four) & mask
            h3: T.let = (w3 >> four) & mask
            sw: T.let = _quad_scales(s, e, row0, b, lanes)
            for t in T.unroll(m_tile):
                g: T.let = _quad_sum(dots(xq, tok, t, b, l0, h0), dots(xq, tok, t, b, l1, h1),
                                     dots(xq, tok, t, b, l2, h2), dots(xq, tok, t, b, l3, h3), lanes)
                acc[T.ramp(t * lanes, 1, lanes)] = acc[T.ramp(t * lanes, 1, lanes)] + T.Cast(fvec, g) * (
                    sw * T.reinterpret(fvec, xv(xq, tok, t, b, 3)))

    return tile


def group_tile(kw: int, lanes: int, rows: int, m_tile: int, isa: DotISA):
    """The 4-row group tile: smmla's where the ISA has it (int4_mmla.py), else the dot instruction's."""
    if lanes == 1:  # row lanes (int4_rows.py): the whole row block, lane r = row r
        return rows_tile_macro(kw, rows, m_tile, isa)
    if mmla_supports(isa, lanes, rows, m_tile):
        return mmla_group_tile_macro(kw, rows, m_tile, isa)
    return _group_tile_macro(kw, lanes, rows, m_tile, isa)


def _setup(kernel: str, n: int, k: int, isa: DotISA, r_tile: int):
    check_int4_shape(kernel, n, k, "float32")
    kw = k // NIBBLES_PER_WORD
    rows, lanes = interleave_for(isa, n, k)
    r_tile = min(r_tile, rows)
    while rows % r_tile:
        r_tile //= 2
    return kw, k // GROUP_SIZE, lanes, rows, r_tile


@parsed_once
def int4_matmul_dot_tiled(n: int, k: int, isa: DotISA, m_tile: int | None = None, r_tile: int = R,
                          chunk_rows: int = CHUNK) -> tirx.PrimFunc:
    """int4_matmul.py's kernel: (x [m, k] f32, w uint32 [n, k // 8] interleaved, scales fp16 [n, k // 32])
    -> y [m, n], M-tiled (the module doc)."""
    kw, kg, lanes, rows, r_tile = _setup("int4_matmul", n, k, isa, r_tile)
    m_tile = m_tile or (MT_ROW_LANES if lanes == 1 else MT)
    kb = kw // lanes
    chunk = max(1, chunk_rows // m_tile)  # token tiles per chunk
    quantize = _quantize_macro(k, lanes)
    rl = lanes == 1  # row lanes: one tile covers the row block (int4_rows.py)
    tile = None if rl else _tile_macro(kw, lanes, rows, r_tile, m_tile, isa)
    single = group_tile(kw, lanes, rows, 1, isa) if rl else _tile_macro(kw, lanes, rows, rows, 1, isa)  # m = 1
    gtile = group_tile(kw, lanes, rows, m_tile, isa)
    quads = rows % 4 == 0
    acc_len = m_tile * rows if rl else max(rows, m_tile * r_tile) * lanes

    @T.prim_func(private=True)
    def func(x_handle: T.handle, w: T.Buffer((T.int64(n), T.int64(kw)), "uint32"),
             s: T.Buffer((T.int64(n), T.int64(kg)), "float16"), y_handle: T.handle):
        T.func_attr(kernel_attrs("int4_matmul", isa))
        m = T.int64()
        x = T.match_buffer(x_handle, (m, T.int64(k)), "float32")
        y = T.match_buffer(y_handle, (m, T.int64(n)), "float32")
        wf = T.decl_buffer((T.int64(1), T.int64(n * kw)), "uint32", data=w.data)
        s3 = T.decl_buffer((T.int64(1), T.int64(n), T.int64(kg)), "float16", data=s.data)
        xq = T.alloc_buffer((m, T.int64(kb), T.int64(4), T.int64(lanes)), "int32")
        quantize(x, xq, m)
        for c in range((m // m_tile + chunk - 1) // chunk):  # token chunks: their activations stay in L2
            for nb in T.parallel(T.int64(n // rows)):  # a row block: its weights stay in L1
                acc = T.alloc_buffer((acc_len,), "float32", scope="global")
                tok = T.alloc_buffer((m_tile,), "int64", scope="global")
                for it in range(c * chunk, T.min(c * chunk + chunk, m // m_tile)):
                    for t in T.unroll(m_tile):
                        tok[t] = it * m_tile + t
                    if rl:
                        gtile(acc, wf, s3, T.int64(0), nb * rows, xq, tok)
                        for t in T.unroll(m_tile):
                            y[it * m_tile + t, T.ramp(nb * rows, 1, rows)] = acc[T.ramp(t * rows, 1, rows)]
                    elif quads:
                        for h in range(rows // 4):
                            gtile(acc, wf, s3, T.int64(0), nb * rows + h * 4, xq, tok)
                            for t in T.unroll(m_tile):
                                y[it * m_tile + t, T.ramp(nb * rows + h * 4, 1, 4)] = _quad_out(
                                    acc[T.ramp(t * lanes, 1, lanes)], lanes)
                    else:
                        for h in range(rows // r_tile):
                            tile(acc, wf, s3, T.int64(0), nb * rows + h * r_tile, xq, tok)
                            for r in T.unroll(r_tile):
                                for t in T.unroll(m_tile):
                                    y[it * m_tile + t, nb * rows + h * r_tile + r] = lane_sum(
                                        acc[T.ramp((r * m_tile + t) * lanes, 1, lanes)], lanes)
        if m % m_tile > 0:
            for nb in T.parallel(T.int64(n // rows)):
                acc1 = T.alloc_buffer((rows * lanes,), "float32", scope="global")  # (row lanes: rows x 1)
                tok1 = T.alloc_buffer((1,), "int64", scope="global")
                for i in range(m // m_tile * m_tile, m):  # the remainder (all of m = 1) one row at a time
                    tok1[0] = i
                    single(acc1, wf, s3, T.int64(0), nb * rows, xq, tok1)
                    for r in T.unroll(rows):
                        y[i, nb * rows + r] = row_result(acc1, r, lanes)

    return func


@parsed_once
def moe_grouped_dot(op: str, num_experts: int, n: int, k: int, top_k: int, isa: DotISA, m_tile: int | None = None,
                    r_tile: int = R) -> tirx.PrimFunc:
    """moe_grouped.py's moe_grouped_{op}_int4 (op "gate_up" or "down_combine", same signature; codes
    interleaved) on the dot instruction: the activations (x [T, k] for gate_up, the sorted rows
    a [T * top_k, k] for down_combine) are quantized once, then each non-empty expert's rows run in
    M tiles of its sorted rows (gate_up gathers token order[r] // top_k), parallel over row blocks;
    down_combine owns whole output columns per task and adds each row's rw-weighted result into its
    token in expert order (no races, deterministic)."""

    down = op == "down_combine"
    if op not in ("gate_up", "down_combine"):
        raise ValueError(f"moe_grouped_dot: op must be gate_up or down_combine, got {op!r}")
    name = f"moe_grouped_{op}_int4"
    kw, kg, lanes, rows, r_tile = _setup(name, n, k, isa, r_tile)
    m_tile = m_tile or (MT_ROW_LANES if lanes == 1 else MT)
    kb = kw // lanes
    quantize = _quantize_macro(k, lanes)
    rl = lanes == 1  # row lanes: one tile covers the row block (int4_rows.py)
    tile = None if rl else _tile_macro(kw, lanes, rows, r_tile, m_tile, isa)
    single = group_tile(kw, lanes, rows, 1, isa) if rl else _tile_macro(kw, lanes, rows, rows, 1, isa)
    gtile = group_tile(kw, lanes, rows, m_tile, isa)
    quads = rows % 4 == 0
    acc_len = m_tile * rows if rl else max(rows, m_tile * r_tile) * lanes
    attrs = {**kernel_attrs(name, isa), ARGS_ATTR: {"num_experts": num_experts, "n": n, "k": k, "top_k": top_k}}
    E = num_experts

    def src(order, r):  # the activation row of sorted row r
        return T.Cast("int64", r) if down else T.Cast("int64", order[r] // top_k)

    @T.macro
    def emit(y, rw, order, r, col, val):  # sorted row r's output column col
        if down:
            f: T.let = order[r]
            y[f // top_k, col] = y[f // top_k, col] + rw[f // top_k, f % top_k] * val
        else:
            y[r, col] = val

    @T.macro
    def body(x, offsets, order, rw, w, s, y, t, xrows):
        wf = T.decl_buffer((T.int64(E), T.int64(n * kw)), "uint32", data=w.data)
        xq = T.alloc_buffer((xrows, T.int64(kb), T.int64(4), T.int64(lanes)), "int32")
        quantize(x, xq, xrows)
        if down:
            for i in T.parallel(t):
                for j in range(T.int64(n)):
                    y[i, j] = T.float32(0)
        for e in range(T.int64(E)):
            lo: T.let = offsets[e]
            cnt: T.let = offsets[e + 1] - lo
            if cnt > 0:
                for nb in T.parallel(T.int64(n // rows)):
                    acc = T.alloc_buffer((acc_len,), "float32", scope="global")
                    tok = T.alloc_buffer((m_tile,), "int64", scope="global")
                    for it in range(cnt // m_tile):
                        for q in T.unroll(m_tile):
                            tok[q] = src(order, lo + it * m_tile + q)
                        if rl:
                            gtile(acc, wf, s, e, nb * rows, xq, tok)
                            for q in T.unroll(m_tile):
                                emit(y, rw, order, lo + it * m_tile + q, T.ramp(nb * rows, 1, rows),
                                     acc[T.ramp(q * rows, 1, rows)])
                        elif quads:
                            for h in range(rows // 4):
                                gtile(acc, wf, s, e, nb * rows + h * 4, xq, tok)
                                for q in T.unroll(m_tile):
                                    emit(y, rw, order, lo + it * m_tile + q, T.ramp(nb * rows + h * 4, 1, 4),
                                         _quad_out(acc[T.ramp(q * lanes, 1, lanes)], lanes))
                        else:
                            for h in range(rows // r_tile):
                                tile(acc, wf, s, e, nb * rows + h * r_tile, xq, tok)
                                for r in T.unroll(r_tile):
                                    for q in T.unroll(m_tile):
                                        emit(y, rw, order, lo + it * m_tile + q, nb * rows + h * r_tile + r,
                                             lane_sum(acc[T.ramp((r * m_tile + q) * lanes, 1, lanes)], lanes))
                    for i in range(cnt // m_tile * m_tile, cnt):  # ragged rest, one row at a time
                        tok[0] = src(order, lo + i)
                        single(acc, wf, s, e, nb * rows, xq, tok)
                        for r in T.unroll(rows):
                            emit(y, rw, order, lo + i, nb * rows + r, row_result(acc, r, lanes))

    W, S = (T.int64(E), T.int64(n), T.int64(kw)), (T.int64(E), T.int64(n), T.int64(kg))
    if down:
        @T.prim_func(private=True)
        def func(a_handle: T.handle, offsets: T.Buffer((E + 1,), "int32"), order_handle: T.handle,
                 rw_handle: T.handle, w: T.Buffer(W, "uint32"), s: T.Buffer(S, "float16"), y_handle: T.handle):
            T.func_attr(attrs)
            t = T.int64()
            a = T.match_buffer(a_handle, (t * top_k, T.int64(k)), "float32")
            order = T.match_buffer(order_handle, (t * top_k,), "int32")
            rw = T.match_buffer(rw_handle, (t, T.int64(top_k)), "float32")
            y = T.match_buffer(y_handle, (t, T.int64(n)), "float32")
            body(a, offsets, order, rw, w, s, y, t, t * top_k)
    else:
        @T.prim_func(private=True)
        def func(x_handle: T.handle, offsets: T.Buffer((E + 1,), "int32"), order_handle: T.handle,
                 w: T.Buffer(W, "uint32"), s: T.Buffer(S, "float16"), y_handle: T.handle):
            T.func_attr(attrs)
            t = T.int64()
            x = T.match_buffer(x_handle, (t, T.int64(k)), "float32")
            order = T.match_buffer(order_handle, (t * top_k,), "int32")
            y = T.match_buffer(y_handle, (t * top_k, T.int64(n)), "float32")
            body(x, offsets, order, None, w, s, y, t, t)
    return func
