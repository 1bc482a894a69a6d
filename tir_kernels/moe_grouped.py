"""Grouped MoE expert kernels for prefill: tokens sorted by expert, one GEMM per non-empty expert.

The per-token GEMV kernels (moe_gemv.py) re-read and re-dequantize an expert's weights for every
(token, slot) routed to it. For T tokens (T dynamic) x top_k slots these kernels instead
  1. plan:  ``moe_route_plan(ids [T, k]) -> (offsets int32 [E + 1], order int32 [T * k])``, a stable
     counting sort: sorted row r holds flat slot ``order[r] = t * k + j``; expert e owns rows
     ``offsets[e] .. offsets[e + 1]`` (``offsets[E] = T * k``);
  2. gate/up: ``moe_grouped_gate_up(x [T, K], offsets, order, W13) -> y [T * k, N]`` (sorted rows)
        y[r, :] = x[order[r] // k] @ W13[e(r)]^T
  3. down + combine: ``moe_grouped_down_combine(a [T * k, K], offsets, order, rw [T, k], W2) -> y [T, N]``
        y[t, :] = sum over rows r of token t: rw[t, order[r] % k] * (a[r] @ W2[e(r)]^T)
Experts with no rows are skipped (loop bounds come from offsets), so their weights are never read.
Weights are stacked ``[E, N, K]`` floats, or mobilemoe.quant's INT4 layout with a leading expert dim
(codes uint32 [E, N, K // 8], fp16 scales [E, N, K // 32]; kernel name suffix ``_int4``).

Two forms of each GEMM, one contract:
- naive (``lanes=None``, what the passes emit): serial loops; the reference, and target-independent.
- scheduled (``schedule_grouped``, from ScheduleInt4Kernels with the target's vector width): the
  activations are copied once into schedules.py's word-lane layout [rows, K / (8 lanes), 8, lanes];
  then for each non-empty expert, in parallel over blocks of ROWS output columns, the block's
  weights are dequantized ONCE into a per-thread tile [ROWS, K] (16 KB at K = 1024; the fp32 expert
  weight is never materialised) and reused by all of the expert's rows, M_TILE at a time, from
  ROWS x M_TILE vector accumulators. A ragged last tile repeats its last row and drops the copies.
  down + combine owns whole output columns per thread, so the scatter-add of the rows into their
  tokens has no races, and sums each token's slots in expert order (deterministic).
On CPUs with an int8 dot instruction, SelectDotKernels replaces the INT4 forms with
int4_dot_gemm.moe_grouped_dot (same signature and contract, int8 activations, interleaved codes).
"""

from tvm import tirx
from tvm.script import tirx as T

from mobilemoe.quant import interleaved_index

from .dequant import GROUP_SIZE, NIBBLES_PER_WORD, check_int4_shape, dequant_int4
from .moe_gemv import INDEX_DTYPES
from .parse_cache import parsed_once

WEIGHT_FORMATS = ("float32", "int4")
KERNELS = {f"moe_grouped_{op}{sfx}": op for op in ("gate_up", "down_combine") for sfx in ("", "_int4")}
ARGS_ATTR = "mobilemoe.kernel_args"
ROWS = 4  # output columns per register block (as schedules.py)
M_TILE = 4  # sorted rows per register block: each dequantized weight vector feeds M_TILE FMAs


@parsed_once
def moe_route_plan(num_experts: int, top_k: int, index_dtype: str = "int64") -> tirx.PrimFunc:
    """PrimFunc ids [T, top_k] -> (offsets int32 [E + 1], order int32 [T * top_k]): stable counting sort."""
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"moe_route_plan: expert ids must be one of {INDEX_DTYPES}, got {index_dtype!r}")
    E, k = num_experts, top_k

    @T.prim_func(private=True, s_tir=True)
    def func(ids_handle: T.handle, offsets: T.Buffer((E + 1,), "int32"), order_handle: T.handle):
        T.func_attr({"mobilemoe.kernel": "moe_route_plan", "op_pattern": 8, "tirx.noalias": True,
                     "tirx.is_scheduled": True})  # serial: E + 2 T k steps
        t = T.int64()
        ids = T.match_buffer(ids_handle, (t, k), index_dtype)
        order = T.match_buffer(order_handle, (t * k,), "int32")
        with T.sblock("root"):  # Relax analyses expect a root block
            cursor = T.alloc_buffer((E + 1,), "int32")
            for e in range(E + 1):
                cursor[e] = 0
            for r in range(t * k):  # cursor[e + 1] = rows of expert e
                cursor[T.Cast("int32", ids[r // k, r % k]) + 1] += 1
            for e in range(E):
                cursor[e + 1] += cursor[e]
            for e in range(E + 1):
                offsets[e] = cursor[e]
            for r in range(t * k):  # in flat order: stable within an expert
                e = T.Cast("int32", ids[r // k, r % k])
                order[cursor[e]] = T.Cast("int32", r)
                cursor[e] += 1

    return func


def _fits(k: int, lanes: int) -> int:
    """Word lanes (at most 8: 2 scale groups a vector) dividing K into whole blocks, 0 if none (K % 32)."""
    lanes = min(lanes, 8)
    while lanes >= 4 and k % (NIBBLES_PER_WORD * lanes):
        lanes //= 2
    return lanes if lanes >= 4 else 0


@parsed_once
def _grouped(op: str, num_experts: int, n: int, k: int, top_k: int, weights: str, lanes: int | None,
             interleave: tuple[int, int] | None = None):
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"moe_grouped_{op}: weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    int4 = weights == "int4"
    name = f"moe_grouped_{op}" + ("_int4" if int4 else "")
    if int4:
        check_int4_shape(name, n, k, "float32")
    if num_experts <= 0 or not 0 < top_k <= num_experts:
        raise ValueError(f"{name}: need 0 < top_k <= num_experts, got {top_k} of {num_experts}")
    E, N, K, down = num_experts, n, k, op == "down_combine"
    attrs = {"mobilemoe.kernel": name, "op_pattern": 8, "tirx.noalias": True,
             ARGS_ATTR: {"num_experts": E, "n": N, "k": K, "top_k": top_k}}
    if lanes is not None:
        attrs["tirx.is_scheduled"] = True
        lanes = _fits(K, lanes)  # 0: K % 32 != 0 (float weights only), stays naive
    rows = ROWS
    while N % rows:
        rows //= 2
    KB = K // (NIBBLES_PER_WORD * lanes) if lanes else 0
    tiled = bool(lanes)  # TVMScript's static `if` needs a bool

    KW = K // NIBBLES_PER_WORD
    il_rows, il_lanes = interleave or (1, KW)  # (1, KW): interleaved_index is the row-major index

    def word(w, e, j, wi):  # packed word (j, wi) of expert e, in the (possibly interleaved) layout
        p = interleaved_index(j, wi, KW, il_rows, il_lanes)
        return w[e, p // KW, p % KW] if interleave else w[e, j, wi]

    def weight(w, s, e, j, kk):  # fp32 weight [e, j, kk]
        if int4:
            return dequant_int4(word(w, e, j, kk // NIBBLES_PER_WORD), s[e, j, kk // GROUP_SIZE], kk)
        return w[e, j, kk]

    def group_scale(s, e, j, b, lane):  # the scale of word b * lanes + lane (4 words per group)
        if lanes == 4:
            return s[e, j, b]
        return T.Select(lane < 4, s[e, j, 2 * b], s[e, j, 2 * b + 1])

    def lane_sum(acc, jj, m):
        return sum((acc[jj, m, lane] for lane in range(1, lanes)), acc[jj, m, 0])

    @T.macro
    def naive(x, offsets, order, rw, w, s, y, t):
        acc = T.alloc_buffer((1,), "float32", scope="local")
        if down:
            for i, j in T.grid(t, N):
                y[i, j] = T.float32(0)
        for e in range(E):
            for r in range(offsets[e], offsets[e + 1]):
                tok = order[r] // top_k
                for j in range(N):
                    acc[0] = T.float32(0)
                    for kk in range(K):
                        if down:
                            acc[0] += x[r, kk] * weight(w, s, e, j, kk)
                        else:
                            acc[0] += x[tok, kk] * weight(w, s, e, j, kk)
                    if down:
                        y[tok, j] += rw[tok, order[r] % top_k] * acc[0]
                    else:
                        y[r, j] = acc[0]

    @T.macro
    def fill(wt, w, s, e, j0):  # wt[jj, b, i, l] = weight[e, j0 + jj, 8 * (b * lanes + l) + i]
        for jj, b in T.grid(rows, KB):
            for i in T.unroll(NIBBLES_PER_WORD):
                for lane in T.vectorized(lanes):
                    if int4:
                        wt[jj, b, i, lane] = dequant_int4(
                            word(w, e, j0 + jj, b * lanes + lane), group_scale(s, e, j0 + jj, b, lane), i)
                    else:
                        wt[jj, b, i, lane] = w[e, j0 + jj, (b * lanes + lane) * NIBBLES_PER_WORD + i]

    @T.macro
    def scheduled(x, offsets, order, rw, w, s, y, t):
        xw = T.alloc_buffer((x.shape[0], KB, NIBBLES_PER_WORD, lanes), "float32")
        for i in T.parallel(x.shape[0]):  # word-lane layout, once per call
            for b, nib in T.grid(KB, NIBBLES_PER_WORD):
                for lane in T.vectorized(lanes):
                    xw[i, b, nib, lane] = x[i, (b * lanes + lane) * NIBBLES_PER_WORD + nib]
        if down:
            for i in T.parallel(t):
                for j in range(N):
                    y[i, j] = T.float32(0)
        for e in range(E):
            lo = offsets[e]
            cnt = offsets[e + 1] - lo
            if cnt > 0:  # one parallel launch per non-empty expert: its rows stay in cache across blocks
                for jb in T.parallel(N // rows):
                    wt = T.alloc_buffer((rows, KB, NIBBLES_PER_WORD, lanes), "float32", scope="local")
                    acc = T.alloc_buffer((rows, M_TILE, lanes), "float32", scope="local")
                    src = T.alloc_buffer((M_TILE,), "int32", scope="local")  # rows of xw
                    fill(wt, w, s, e, jb * rows)
                    for it in range((cnt + M_TILE - 1) // M_TILE):  # ragged last tile: clamp, no guard
                        for m in T.unroll(M_TILE):
                            if down:
                                src[m] = lo + T.min(it * M_TILE + m, cnt - 1)
                            else:
                                src[m] = order[lo + T.min(it * M_TILE + m, cnt - 1)] // top_k
                        for jj, m in T.grid(rows, M_TILE):
                            for lane in T.vectorized(lanes):
                                acc[jj, m, lane] = T.float32(0)
                        for b in range(KB):  # rows x M_TILE accumulators stay in vector registers
                            for i in T.unroll(NIBBLES_PER_WORD):
                                for jj in T.unroll(rows):
                                    for m in T.unroll(M_TILE):
                                        for lane in T.vectorized(lanes):
                                            acc[jj, m, lane] += wt[jj, b, i, lane] * xw[src[m], b, i, lane]
                        for m in T.unroll(M_TILE):
                            if it * M_TILE + m < cnt:
                                for jj in T.unroll(rows):
                                    if down:
                                        f = order[lo + it * M_TILE + m]
                                        y[f // top_k, jb * rows + jj] += (
                                            rw[f // top_k, f % top_k] * lane_sum(acc, jj, m))
                                    else:
                                        y[lo + it * M_TILE + m, jb * rows + jj] = lane_sum(acc, jj, m)

    @T.macro
    def body(x, offsets, order, rw, w, s, y, t):
        if tiled:
            scheduled(x, offsets, order, rw, w, s, y, t)
        else:
            naive(x, offsets, order, rw, w, s, y, t)

    W, S = (E, N, K // NIBBLES_PER_WORD), (E, N, K // GROUP_SIZE)
    if not down and int4:
        @T.prim_func(private=True, s_tir=True)
        def func(x_handle: T.handle, offsets: T.Buffer((E + 1,), "int32"), order_handle: T.handle,
                 w: T.Buffer(W, "uint32"), s: T.Buffer(S, "float16"), y_handle: T.handle):
            T.func_attr(attrs)
            t = T.int64()
            x = T.match_buffer(x_handle, (t, K), "float32")
            order = T.match_buffer(order_handle, (t * top_k,), "int32")
            y = T.match_buffer(y_handle, (t * top_k, N), "float32")
            with T.sblock("root"):  # Relax analyses expect a root block
                body(x, offsets, order, None, w, s, y, t)
    elif not down:
        @T.prim_func(private=True, s_tir=True)
        def func(x_handle: T.handle, offsets: T.Buffer((E + 1,), "int32"), order_handle: T.handle,
                 w: T.Buffer((E, N, K), "float32"), y_handle: T.handle):
            T.func_attr(attrs)
            t = T.int64()
            x = T.match_buffer(x_handle, (t, K), "float32")
            order = T.match_buffer(order_handle, (t * top_k,), "int32")
            y = T.match_buffer(y_handle, (t * top_k, N), "float32")
            with T.sblock("root"):  # Relax analyses expect a root block
                body(x, offsets, order, None, w, None, y, t)
    elif int4:
        @T.prim_func(private=True, s_tir=True)
        def func(a_handle: T.handle, offsets: T.Buffer((E + 1,), "int32"), order_handle: T.handle,
                 rw_handle: T.handle, w: T.Buffer(W, "uint32"), s: T.Buffer(S, "float16"), y_handle: T.handle):
            T.func_attr(attrs)
            t = T.int64()
            a = T.match_buffer(a_handle, (t * top_k, K), "float32")
            order = T.match_buffer(order_handle, (t * top_k,), "int32")
            rw = T.match_buffer(rw_handle, (t, top_k), "float32")
            y = T.match_buffer(y_handle, (t, N), "float32")
            with T.sblock("root"):  # Relax analyses expect a root block
                body(a, offsets, order, rw, w, s, y, t)
    else:
        @T.prim_func(private=True, s_tir=True)
        def func(a_handle: T.handle, offsets: T.Buffer((E + 1,), "int32"), order_handle: T.handle,
                 rw_handle: T.handle, w: T.Buffer((E, N, K), "float32"), y_handle: T.handle):
            T.func_attr(attrs)
            t = T.int64()
            a = T.match_buffer(a_handle, (t * top_k, K), "float32")
            order = T.match_buffer(order_handle, (t * top_k,), "int32")
            rw = T.match_buffer(rw_handle, (t, top_k), "float32")
            y = T.match_buffer(y_handle, (t, N), "float32")
            with T.sblock("root"):  # Relax analyses expect a root block
                body(a, offsets, order, rw, w, None, y, t)
    return func


def moe_grouped_gate_up(num_experts: int, n: int, k: int, top_k: int, weights: str = "int4",
                        lanes: int | None = None, interleave: tuple[int, int] | None = None) -> tirx.PrimFunc:
    """PrimFunc (x [T, k], offsets, order, W [E, n, k] | (codes, scales)) -> y [T * top_k, n], sorted rows.
    interleave=(rows, lanes): INT4 codes in mobilemoe.quant's interleaved word order."""
    return _grouped("gate_up", num_experts, n, k, top_k, weights, lanes, interleave)


def moe_grouped_down_combine(num_experts: int, n: int, k: int, top_k: int, weights: str = "int4",
                             lanes: int | None = None, interleave: tuple[int, int] | None = None) -> tirx.PrimFunc:
    """PrimFunc (a [T * top_k, k] sorted rows, offsets, order, rw [T, top_k], W) -> y [T, n]."""
    return _grouped("down_combine", num_experts, n, k, top_k, weights, lanes, interleave)


def schedule_grouped(func: tirx.PrimFunc, lanes: int, interleave: tuple[int, int] | None = None) -> tirx.PrimFunc:
    """The scheduled form of a naive grouped kernel (rebuilt from its attrs) for `lanes` word lanes
    (and, given, codes in the interleaved layout)."""
    name = str(func.attrs["mobilemoe.kernel"])
    if name not in KERNELS:
        raise ValueError(f"schedule_grouped: {name!r} is not a grouped kernel; known: {sorted(KERNELS)}")
    args = {key: int(v) for key, v in func.attrs[ARGS_ATTR].items()}
    weights = "int4" if name.endswith("_int4") else "float32"
    return _grouped(KERNELS[name], weights=weights, lanes=lanes, interleave=interleave, **args)
