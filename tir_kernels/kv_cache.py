"""The in-place KV cache's kernels (mobilemoe/kv_cache.py): the slot write and prefix attention.

    kv_write(k [1, nkv, D, C], v [1, nkv, C, D], k_new [1, nkv, D, S], v_new [1, nkv, S, D], pos [1, S])
        writes k_new / v_new at slots pos of k / v, in place (R.call_tir_inplace: outputs = k, v)
    prefix_attention(q [1, nh, S, D], k, v, pos [1, S]) -> out [1, nh, S, D]
        attention of each token s at position pos[s] over cache slots 0..pos[s] (grouped-query:
        the nh / nkv query heads of a KV head together), reading only those slots; decode's
        kernel has S = 1 static, a budgeted artifact's in-place prefill (compiler/residency.py) S
        symbolic, its (KV head, token) pairs in parallel

prefix_attention is one pass over the valid prefix in blocks of BLOCK slots with an online softmax
(running max and sum, the accumulator rescaled when the max grows): per block and query head, the
scores are BLOCK-lane vector FMAs down the transposed key rows, exp is softmax.py's polynomial
(exp_le0, vectorized), masked slots (past p in the last block) get probability 0, and each value
row is added in D-lane vectors. The block count is read from pos at run time, so a cache of
capacity C costs what p + 1 slots cost; C must be a multiple of BLOCK (the runtime allocates it
so). KV heads run in parallel. No temporaries are assigned inside the parallel body (int4_dot.py's
_STACK_NOTE): the small per-head buffers live on the stack. Scheduled by hand
(``tirx.is_scheduled``), CPU only; compiler/importer.py maps the custom ops onto these kernels.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from mobilemoe.kv_cache import BLOCK

from .softmax import exp_le0, lane_reduce
from .parse_cache import parsed_once

WRITE, ATTEND = "kv_write", "prefix_attention"
_NEG = -3.4028234663852886e38


def _check(nkv: int, d: int, rep: int = 1) -> None:
    if not all(isinstance(x, int) and x > 0 for x in (nkv, d, rep)):
        raise ValueError(f"kv cache kernels: expected positive static nkv, head_dim, group size, got {nkv}, {d}, {rep}")


@parsed_once
def kv_write(nkv: int, d: int, dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc (k, v, k_new, v_new, pos) writing the S new slots into k and v (no outputs: in place)."""
    _check(nkv, d)

    @T.prim_func(private=True)
    def func(k_h: T.handle, v_h: T.handle, kn_h: T.handle, vn_h: T.handle, pos_h: T.handle):
        T.func_attr({"mobilemoe.kernel": WRITE, "op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        c = T.int64()
        s = T.int64()
        k = T.match_buffer(k_h, (T.int64(1), T.int64(nkv), T.int64(d), c), dtype)
        v = T.match_buffer(v_h, (T.int64(1), T.int64(nkv), c, T.int64(d)), dtype)
        kn = T.match_buffer(kn_h, (T.int64(1), T.int64(nkv), T.int64(d), s), dtype)
        vn = T.match_buffer(vn_h, (T.int64(1), T.int64(nkv), s, T.int64(d)), dtype)
        pos = T.match_buffer(pos_h, (T.int64(1), s), "int64")
        for i in range(s):
            assert pos[0, i] < c, "kv_write: a position past the KV cache's capacity"
            for g in range(T.int64(nkv)):
                for e in range(T.int64(d)):
                    k[0, g, e, pos[0, i]] = kn[0, g, e, i]
                for e in range(T.int64(d)):
                    v[0, g, pos[0, i], e] = vn[0, g, i, e]

    return func


@parsed_once
def prefix_attention(nkv: int, rep: int, d: int, block: int = BLOCK, queries: int | None = 1) -> tirx.PrimFunc:
    """PrimFunc (q, k, v, pos) -> out: each of `queries` tokens' attention over cache slots 0..pos
    (float32); queries=None: a symbolic token count (prefill into the in-place cache)."""
    _check(nkv, d, rep)
    if queries is not None and queries != 1:
        raise ValueError(f"prefix_attention: queries must be 1 (decode) or None (symbolic), got {queries}")
    nh, b, scale = nkv * rep, block, float(d) ** -0.5
    # register tiles (AVX2's 16 vector registers): rc query heads x sl score slots, rc heads x dl value lanes
    rc = next(x for x in (4, 2, 1) if rep % x == 0)
    sl = next(x for x in (16, 8, 4, 2, 1) if b % x == 0)
    dl = next(x for x in (16, 8, 4, 2, 1) if d % x == 0)
    # the token count: decode's static 1 (the loops over it fold away) or a symbol bound by q's shape
    sq = tirx.Var("sq", "int64") if queries is None else tirx.IntImm("int64", 1)

    def head(gi):  # the KV head and the token of parallel iteration gi (inline: no let in the parallel body)
        return gi // sq

    def tok(gi):
        return gi % sq

    def lanes_b(start):
        return tirx.Ramp(start, 1, b)

    def lanes_d():
        return tirx.Ramp(0, 1, d)

    def bcast(x, n):
        return tirx.Broadcast(x, n)

    @T.prim_func(private=True)
    def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, pos_h: T.handle, out_h: T.handle):
        T.func_attr({"mobilemoe.kernel": ATTEND, "op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        c = T.int64()
        q = T.match_buffer(q_h, (T.int64(1), T.int64(nh), sq, T.int64(d)), "float32")
        k = T.match_buffer(k_h, (T.int64(1), T.int64(nkv), T.int64(d), c), "float32")
        v = T.match_buffer(v_h, (T.int64(1), T.int64(nkv), c, T.int64(d)), "float32")
        pos = T.match_buffer(pos_h, (T.int64(1), sq), "int64")
        out = T.match_buffer(out_h, (T.int64(1), T.int64(nh), sq, T.int64(d)), "float32")
        for gi in T.parallel(T.int64(nkv) * sq):
            s = T.alloc_buffer((rep, b), "float32")  # default scope: on the stack (int4_dot._STACK_NOTE)
            acc = T.alloc_buffer((rep, d), "float32")
            st = T.alloc_buffer((rep, 3), "float32")  # running max, running sum, this block's max
            for r in range(rep):
                st[r, 0] = T.float32(_NEG)
                st[r, 1] = T.float32(0)
                acc[r, lanes_d()] = bcast(T.float32(0), d)
            for blk in range((pos[0, tok(gi)] + T.int64(b)) // T.int64(b)):
                # scores of the block: register tiles of rc heads x sl slots, each key vector loaded once per
                # tile and used by its rc heads (the sum over e in order, as the one-head loop had it)
                for rg in range(rep // rc):
                    for sh in T.unroll(b // sl):
                        for r in T.unroll(rc):
                            s[rg * rc + r, T.ramp(sh * sl, 1, sl)] = bcast(T.float32(0), sl)
                        for e in range(d):
                            for r in T.unroll(rc):
                                s[rg * rc + r, T.ramp(sh * sl, 1, sl)] = s[rg * rc + r, T.ramp(sh * sl, 1, sl)] + bcast(
                                    q[0, head(gi) * rep + rg * rc + r, tok(gi), e] * T.float32(scale), sl) * k[
                                    0, head(gi), e, T.ramp(blk * b + sh * sl, 1, sl)]
                for r in range(rep):  # online softmax: running max and sum, the accumulator rescaled
                    s[r, lanes_b(0)] = T.Select(lanes_b(blk * b) <= bcast(pos[0, tok(gi)], b), s[r, lanes_b(0)],
                                                bcast(T.float32(_NEG), b))
                    st[r, 2] = T.max(st[r, 0], lane_reduce(s[r, lanes_b(0)], b, tirx.Max))
                    st[r, 1] = st[r, 1] * exp_le0(st[r, 0] - st[r, 2], 1)
                    acc[r, lanes_d()] = acc[r, lanes_d()] * bcast(exp_le0(st[r, 0] - st[r, 2], 1), d)
                    s[r, lanes_b(0)] = T.Select(lanes_b(blk * b) <= bcast(pos[0, tok(gi)], b),
                                                exp_le0(s[r, lanes_b(0)] - bcast(st[r, 2], b), b),
                                                bcast(T.float32(0), b))
                    st[r, 1] = st[r, 1] + lane_reduce(s[r, lanes_b(0)], b, tirx.Add)
                    st[r, 0] = st[r, 2]
                # values: register tiles of rc heads x dl lanes, each value vector loaded once per tile
                for rg in range(rep // rc):
                    for dh in T.unroll(d // dl):
                        for j in range(b):
                            for r in T.unroll(rc):
                                acc[rg * rc + r, T.ramp(dh * dl, 1, dl)] = acc[rg * rc + r, T.ramp(dh * dl, 1, dl)] + bcast(
                                    s[rg * rc + r, j], dl) * v[0, head(gi), blk * b + j, T.ramp(dh * dl, 1, dl)]
            for r in range(rep):
                out[0, head(gi) * rep + r, tok(gi), lanes_d()] = acc[r, lanes_d()] / bcast(st[r, 1], d)

    return func
