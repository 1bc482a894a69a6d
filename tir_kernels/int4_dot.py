"""INT4 weights x int8 activations through the CPU's integer dot-product instruction.

    x86 AVX512-VNNI  vpdpbusd   llvm.x86.avx512.vpdpbusd.{512,256,128}   u8 x s8 -> s32, 4 per lane
    x86 AVX2         vpmaddubsw + vpmaddwd (ones) + vpaddd               the same sum in three (no VNNI)
    arm64 dotprod    sdot       llvm.aarch64.neon.sdot.v4i32.v16i8      s8 x s8 -> s32, 4 per lane
    arm64 i8mm       smmla      llvm.aarch64.neon.smmla.v4i32.v16i8     s8 2x8 @ 8x2 -> s32 2x2 (GEMM tiles:
                                                                        int4_mmla.py; GEMVs use sdot)

Weights are mobilemoe.quant's codes (uint32 [N, K // 8], nibble i of word w is k = 8w + i) with the
words in its interleaved order for (rows, lanes) = interleave_for(isa, N, K) (interleave_int4: the
``lanes`` words of ``rows`` rows in turn, one sequential stream), and fp16 scales [N, K // 32]. Activations are quantized per call to int8, symmetric, per group of 32
(the weight groups): ``sx[g] = max|x[g]| / 127``, ``q[k] = round(x[k] * (127 / max|x[g]|))``
(mobilemoe.quant.quantize_act_int8 is the reference). Then, with u the weight codes,

    y[n] = sum_g sw[n, g] * sx[g] * sum_{k in g} q[k] * (u[n, k] - 8)

and the inner sum is exact in int32. The codes feed the dot instruction with two ALU ops: per word,
``word & 0x0F0F0F0F`` holds the codes of k = 8w + {0, 2, 4, 6} as 4 bytes and ``(word >> 4) &
0x0F0F0F0F`` those of k = 8w + {1, 3, 5, 7}. So the activations are stored, once per call, as

    xe [m, K // 8] int32   bytes q[8w + 0], q[8w + 2], q[8w + 4], q[8w + 6]  (little endian)
    xo [m, K // 8] int32   bytes q[8w + 1], q[8w + 3], q[8w + 5], q[8w + 7]
    xc [m, K // 8] int32   -8 * sum_{i<8} q[8w + i]   (the zero point; the dot's initial value)
    xs [m, K // 8] f32     sx of word w's group

and a vector of ``lanes`` words of one weight row takes: 1 load, 3 ALU ops, 2 dots, 1 convert, the
row's scales (``lanes // 4`` fp16 values, widened and repeated 4 times), 1 multiply and 1 FMA, for
``32 * lanes`` multiply-adds. Each lane accumulates in fp32, and the lanes are summed once per row.

Row lanes (DotISA.row_lanes: X86_AVX2). Without a dot instruction each dot above is itself three
instructions, so the AVX2 kernels read another layout: codes interleaved (rows, 1) (one row per
vector lane, the activation word broadcast) and the scales interleaved (rows, 1) too
(scales_interleave_for, applied by compiler/params.py); a weight group's 8 pmaddubsw add up in int16
and widen once (int4_rows.py). Same numerics, ~2.5x fewer instructions; dot_layout() gives both
orders of a weight.

The row loop is split into blocks of ``rows`` output rows (unrolled: independent accumulators; the
interleaved layout makes their words one stream), and the blocks run in parallel; for m > 1 every block loops over the rows of x, with the
weights of the block still in L1. The build's int4_matmul is int4_dot_gemm.py's M-tiled GEMM instead (it
shares this layout and, for m = 1, these blocks); int4_matmul_dot is kept as its reference and baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target, codegen

from mobilemoe.quant import interleave_int4

from .dequant import GROUP_SIZE, NIBBLES_PER_WORD, check_int4_shape
from .int4_rows import block_macro as rows_block_macro
from .launch import SERIAL_ROWS
from .parse_cache import parsed_once

# _STACK_NOTE. Inside a parallel loop, a TVMScript name assigned a value (``wv = w[...]``) becomes a
# buffer, and TVM 0.27 gives each non-"global" buffer of a parallel body (``scope="local"`` too) a
# TVMBackendAllocWorkspace / FreeWorkspace pair per iteration. So the kernels here assign no
# temporaries and allocate their small per-block buffers in the default ("global") scope, which is
# lowered to the stack: one 8-row block of a [1024, 1024] GEMV went from 6 workspace calls to none,
# and the expert GEMVs from ~13 to ~25 GB/s (one znver4 core, CPU time, L3-resident weights).
LOW_NIBBLES = 0x0F0F0F0F
WORDS_PER_GROUP = GROUP_SIZE // NIBBLES_PER_WORD  # 4
ROWS = 8  # output rows per unrolled block (8 read 21.8 GB/s on znver4, 4: 17)
WSUM_TASKS = 8  # parallel tasks of moe_gemv_weighted_sum (each a run of row blocks): even for 1, 2, 4, 8 threads


@dataclass(frozen=True, eq=False)  # hashed by identity (the ISAs are module constants): parse_cache.py keys on it
class DotISA:
    """An integer dot-product instruction family: lanes (int32 accumulators per vector) -> intrinsic."""

    name: str
    # lanes -> LLVM intrinsic name (args: acc int32xL, weights int8x4L, acts int8x4L), or, for a CPU
    # without a dot instruction, the pair (u8 x s8 -> int16 pair sums, int16 pairs -> int32): dot_acc
    intrinsics: dict
    mmla: str = ""  # a 2x8 by 8x2 int8 matrix multiply-accumulate (int4_mmla.py's GEMM tiles), if any
    row_lanes: bool = False  # the kernels read the weights interleaved (rows, 1): one row per lane (int4_rows.py)

    def lanes_for(self, words: int) -> int:
        """The widest vector whose lane count divides the words per row (K // 8)."""
        for lanes in sorted(self.intrinsics, reverse=True):
            if words % lanes == 0:
                return lanes
        raise ValueError(f"{self.name}: no vector width divides {words} words per row")


X86_VNNI = DotISA("avx512-vnni", {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256",
                                   4: "llvm.x86.avx512.vpdpbusd.128"})
# AVX2 without VNNI (Zen 3, Haswell..Comet Lake): vpmaddubsw + vpmaddwd (ones), as llama.cpp's Q4_0 x Q8_0 does
X86_AVX2 = DotISA("avx2", {8: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
                            4: ("llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd")}, row_lanes=True)
ARM_DOTPROD = DotISA("arm-dotprod", {4: "llvm.aarch64.neon.sdot.v4i32.v16i8"})
# Armv8.6 i8mm (Cortex-X3/A715 on, e.g. Snapdragon 8 Gen 2): sdot for GEMVs, smmla for the GEMM tiles
ARM_I8MM = DotISA("arm-i8mm", {4: "llvm.aarch64.neon.sdot.v4i32.v16i8"}, mmla="llvm.aarch64.neon.smmla.v4i32.v16i8")


def dot_isa(target: Target | None) -> DotISA | None:
    """The dot-product ISA of an llvm target, or None (then the fp32 kernels are used)."""
    if target is None or target.kind.name != "llvm":
        return None
    if codegen.target_has_features(["avx512vnni", "avx512vl"], target):
        return X86_VNNI
    if codegen.target_has_features(["avx2"], target):
        return X86_AVX2
    if codegen.target_has_features(["dotprod", "i8mm"], target):
        return ARM_I8MM
    if codegen.target_has_features(["dotprod"], target):
        return ARM_DOTPROD
    return None


def dot_acc(isa: DotISA, lanes: int, acc, weights, acts):
    """acc + per-lane dot of 4 weight bytes (0..15) with 4 signed activation bytes.

    Without a dot instruction (X86_AVX2) the same sum takes two: pmaddubsw adds the two u8 x s8
    products of each byte pair into int16 (saturating, but |2 * 15 * 127| = 3810 never reaches 2^15),
    pmaddwd with ones adds the int16 pairs into int32; then the add. Exact, like the dot."""
    as_bytes = f"int8x{4 * lanes}"
    w, x = tirx.reinterpret(as_bytes, weights), tirx.reinterpret(as_bytes, acts)
    intrinsic = isa.intrinsics[lanes]
    if isinstance(intrinsic, tuple):
        pairs, quads = intrinsic
        s16 = tirx.call_llvm_pure_intrin(f"int16x{2 * lanes}", pairs, w, x)
        ones = tirx.Broadcast(tirx.const(1, "int16"), 2 * lanes)
        return acc + tirx.call_llvm_pure_intrin(f"int32x{lanes}", quads, s16, ones)
    return tirx.call_llvm_pure_intrin(f"int32x{lanes}", intrinsic, acc, w, x)


def dot_pair(isa: DotISA, lanes: int, acc, lo, even, hi, odd):
    """acc + the dots of a word's two nibble halves (lo codes x even activations, hi x odd): one word's
    8 products per lane. With a dot instruction, two dots. Without one (X86_AVX2) the two pmaddubsw
    int16 pair sums are added in int16 first (|2 * 2 * 15 * 127| = 7620 < 2^15: exact) and widened by
    one pmaddwd: 2 pmaddubsw + 1 add + 1 pmaddwd + 1 add instead of 2 x 3."""
    intrinsic = isa.intrinsics[lanes]
    if not isinstance(intrinsic, tuple):
        return dot_acc(isa, lanes, dot_acc(isa, lanes, acc, lo, even), hi, odd)
    pairs, quads = intrinsic
    as_bytes = f"int8x{4 * lanes}"

    def s16(w, x):
        return tirx.call_llvm_pure_intrin(f"int16x{2 * lanes}", pairs, tirx.reinterpret(as_bytes, w),
                                          tirx.reinterpret(as_bytes, x))

    ones = tirx.Broadcast(tirx.const(1, "int16"), 2 * lanes)
    return acc + tirx.call_llvm_pure_intrin(f"int32x{lanes}", quads, s16(lo, even) + s16(hi, odd), ones)


def lane_scales(s, e, row, block, lanes: int):
    """fp32 x lanes: the weight scale of each lane's group (lane l of word block b: group (b*lanes + l) // 4)."""
    groups = lanes // WORDS_PER_GROUP
    if groups == 1:
        return tirx.Broadcast(tirx.Cast("float32", s[e, row, block]), lanes)
    vec = tirx.Cast(f"float32x{groups}", s[e, row, tirx.Ramp(block * groups, 1, groups)])
    return tirx.Shuffle([vec] * WORDS_PER_GROUP, [lane // WORDS_PER_GROUP for lane in range(lanes)])


def lane_sum(vec, lanes: int):
    """Sum of the lanes of a float32 vector (a halving tree of shuffles)."""
    while lanes > 1:
        half = lanes // 2
        lo = tirx.Shuffle([vec], list(range(half)))
        hi = tirx.Shuffle([vec], list(range(half, lanes)))
        vec, lanes = lo + hi, half
    return vec


def pack4(q0, q1, q2, q3):
    """4 int32 values in [-127, 127] -> one int32 of their bytes, q0 in the lowest."""
    byte = tirx.const(255, "int32")
    return ((q0 & byte) | ((q1 & byte) << 8) | ((q2 & byte) << 16) | (q3 << 24))


def _quantize_macro(k: int):
    """TIR macro: quantize x [m, k] into xe, xo, xc, xs (the layout of the module doc); rows in parallel,
    except for a few rows (decode), where a parallel launch costs more than the work (launch.py)."""
    kg = k // GROUP_SIZE

    @T.macro
    def quantize_row(x, xe, xo, xc, xs, i):
        amax = T.alloc_buffer((1,), "float32", scope="global")
        q = T.alloc_buffer((8,), "int32", scope="global")
        for g in range(T.int64(kg)):
            amax[0] = T.float32(0)
            for j in range(GROUP_SIZE):
                amax[0] = T.max(amax[0], T.fabs(x[i, g * GROUP_SIZE + j]))
            for wd in range(WORDS_PER_GROUP):
                for j in T.unroll(8):
                    q[j] = T.Cast("int32", T.round(x[i, (g * WORDS_PER_GROUP + wd) * 8 + j] * T.if_then_else(
                        amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))))
                xe[i, g * WORDS_PER_GROUP + wd] = pack4(q[0], q[2], q[4], q[6])
                xo[i, g * WORDS_PER_GROUP + wd] = pack4(q[1], q[3], q[5], q[7])
                xc[i, g * WORDS_PER_GROUP + wd] = (q[0] + q[1] + q[2] + q[3] + q[4] + q[5] + q[6] + q[7]) * T.int32(-8)
                xs[i, g * WORDS_PER_GROUP + wd] = amax[0] / T.float32(127)

    @T.macro
    def quantize(x, xe, xo, xc, xs, m):
        if m <= SERIAL_ROWS:
            for i in range(m):
                quantize_row(x, xe, xo, xc, xs, i)
        else:
            for i in T.parallel(m):
                quantize_row(x, xe, xo, xc, xs, i)

    return quantize


def _block_macro(kw: int, lanes: int, rows: int, isa: DotISA):
    """TIR macro: acc[r * lanes : (r + 1) * lanes] = the per-lane partial sums of rows row0 .. row0 + rows
    of expert e's weights (w [E, N * kw] flat, interleaved by (rows, lanes); s [E, N, kw // 4]) against
    activation row i of (xe, xo, xc, xs)."""
    mask = tirx.Broadcast(tirx.const(LOW_NIBBLES, "uint32"), lanes)
    four = tirx.Broadcast(tirx.const(4, "uint32"), lanes)

    def ramp(b):
        return tirx.Ramp(b * lanes, 1, lanes)

    def word(w, e, row0, b, r):
        # rows row0.. (row0 % rows == 0) in mobilemoe.quant's interleaved layout: the lanes words of
        # row r of word block b are contiguous, then those of row r + 1
        return w[e, tirx.Ramp((row0 // rows * (kw // lanes) + b) * (rows * lanes) + r * lanes, 1, lanes)]

    @T.macro
    def block(acc, w, s, e, row0, xe, xo, xc, xs, i):
        for r in T.unroll(rows):
            acc[T.ramp(r * lanes, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
        for b in range(T.int64(kw // lanes)):
            for r in T.unroll(rows):
                # one expression, no assigned temporaries (see _STACK_NOTE)
                acc[T.ramp(r * lanes, 1, lanes)] = acc[T.ramp(r * lanes, 1, lanes)] + T.Cast(
                    f"float32x{lanes}",
                    dot_pair(isa, lanes, xc[i, ramp(b)], word(w, e, row0, b, r) & mask, xe[i, ramp(b)],
                             (word(w, e, row0, b, r) >> four) & mask, xo[i, ramp(b)])
                ) * (lane_scales(s, e, row0 + r, b, lanes) * xs[i, ramp(b)])

    return block


def interleave_for(isa: DotISA, n: int, k: int, rows: int = ROWS) -> tuple[int, int]:
    """(rows, lanes) of the interleaved layout (mobilemoe.quant.interleave_int4) the dot kernels read
    an [n, k] INT4 weight in: every kernel reading that weight must agree, so it is a function of
    the shape and the ISA alone."""
    while n % rows:
        rows //= 2
    if isa.row_lanes and rows in isa.intrinsics:  # one row per lane (int4_rows.py): a vector of rows
        return rows, 1
    return rows, isa.lanes_for(k // NIBBLES_PER_WORD)


def scales_interleave_for(isa: DotISA, n: int, k: int) -> tuple[int, int] | None:
    """The (rows, 1) interleaving of an [n, k] weight's scales [n, k // 32] when the ISA's kernels read
    one row per lane (int4_rows.py: the rows' scales of a group are then one contiguous load), else None
    (row-major scales)."""
    rows, lanes = interleave_for(isa, n, k)
    return (rows, 1) if lanes == 1 else None


def dot_layout(isa: DotISA, packed, scales):
    """(codes, scales) of one INT4 weight (row-major packed codes [..., N, K // 8], scales [..., N, K // 32];
    torch or numpy) in the order the ISA's dot kernels read them: what compiler/params.py writes."""
    n, k = packed.shape[-2], packed.shape[-1] * NIBBLES_PER_WORD
    s_layout = scales_interleave_for(isa, n, k)
    return interleave_int4(packed, *interleave_for(isa, n, k)), (interleave_int4(scales, *s_layout) if s_layout
                                                                   else scales)


def _setup(kernel: str, n: int, k: int, isa: DotISA, rows: int):
    check_int4_shape(kernel, n, k, "float32")
    kw = k // NIBBLES_PER_WORD
    rows, lanes = interleave_for(isa, n, k, rows)
    block = rows_block_macro(kw, rows, isa) if lanes == 1 else _block_macro(kw, lanes, rows, isa)
    return kw, k // GROUP_SIZE, lanes, rows, _quantize_macro(k), block


def row_result(acc, r, lanes: int):
    """Output row r of a block's accumulator: the sum of its lanes, or (row lanes) its lane r."""
    return acc[r] if lanes == 1 else lane_sum(acc[tirx.Ramp(r * lanes, 1, lanes)], lanes)


def kernel_attrs(kernel: str, isa: DotISA) -> dict:
    """The function attributes of a scheduled dot-product kernel: its name, the ISA, op_pattern 8, noalias."""
    return {"mobilemoe.kernel": kernel, "mobilemoe.dot": isa.name, "op_pattern": 8, "tirx.noalias": True,
            "tirx.is_scheduled": True}


@parsed_once
def int4_matmul_dot(n: int, k: int, isa: DotISA, rows: int = ROWS) -> tirx.PrimFunc:
    """int4_matmul.py's kernel: (x [m, k] f32, w uint32 [n, k // 8], scales fp16 [n, k // 32]) -> y [m, n]."""
    kw, kg, lanes, rows, quantize, block = _setup("int4_matmul", n, k, isa, rows)

    @T.prim_func(private=True)
    def func(x_handle: T.handle, w: T.Buffer((T.int64(n), T.int64(kw)), "uint32"),
             s: T.Buffer((T.int64(n), T.int64(kg)), "float16"), y_handle: T.handle):
        T.func_attr(kernel_attrs("int4_matmul", isa))
        m = T.int64()
        x = T.match_buffer(x_handle, (m, T.int64(k)), "float32")
        y = T.match_buffer(y_handle, (m, T.int64(n)), "float32")
        w3 = T.decl_buffer((T.int64(1), T.int64(n * kw)), "uint32", data=w.data)
        s3 = T.decl_buffer((T.int64(1), T.int64(n), T.int64(kg)), "float16", data=s.data)
        xe = T.alloc_buffer((m, T.int64(kw)), "int32")
        xo = T.alloc_buffer((m, T.int64(kw)), "int32")
        xc = T.alloc_buffer((m, T.int64(kw)), "int32")
        xs = T.alloc_buffer((m, T.int64(kw)), "float32")
        quantize(x, xe, xo, xc, xs, m)
        for nb in T.parallel(T.int64(n // rows)):
            acc = T.alloc_buffer((rows * lanes,), "float32", scope="global")
            for i in range(m):
                block(acc, w3, s3, T.int64(0), nb * rows, xe, xo, xc, xs, i)
                for r in T.unroll(rows):
                    y[i, nb * rows + r] = row_result(acc, r, lanes)

    return func


@parsed_once
def moe_gemv_dot(num_experts: int, n: int, k: int, top_k: int, isa: DotISA, per_slot: bool = False,
                 index_dtype: str = "int32", rows: int = ROWS) -> tirx.PrimFunc:
    """moe_gemv.py's moe_gemv (x [T, k]) or, per_slot, moe_gemv_per_slot (x [T, top_k, k]):
    (x, ids [T, top_k], w [E, n, k // 8], scales [E, n, k // 32]) -> y [T, top_k, n]."""
    kernel = "moe_gemv_per_slot" if per_slot else "moe_gemv"
    kw, kg, lanes, rows, quantize, block = _setup(kernel, n, k, isa, rows)
    nblocks = n // rows

    def xrows(t):  # rows of x to quantize
        return t * top_k if per_slot else t

    @T.prim_func(private=True)
    def func(x_handle: T.handle, ids_handle: T.handle,
             w: T.Buffer((T.int64(num_experts), T.int64(n), T.int64(kw)), "uint32"),
             s: T.Buffer((T.int64(num_experts), T.int64(n), T.int64(kg)), "float16"), y_handle: T.handle):
        T.func_attr(kernel_attrs(kernel, isa))
        t = T.int64()
        x = T.match_buffer(x_handle, ((t, T.int64(top_k), T.int64(k)) if per_slot else (t, T.int64(k))))
        ids = T.match_buffer(ids_handle, (t, T.int64(top_k)), index_dtype)
        y = T.match_buffer(y_handle, (t, T.int64(top_k), T.int64(n)), "float32")
        x2 = T.decl_buffer((xrows(t), T.int64(k)), "float32", data=x.data)
        wf = T.decl_buffer((T.int64(num_experts), T.int64(n * kw)), "uint32", data=w.data)
        xe = T.alloc_buffer((xrows(t), T.int64(kw)), "int32")
        xo = T.alloc_buffer((xrows(t), T.int64(kw)), "int32")
        xc = T.alloc_buffer((xrows(t), T.int64(kw)), "int32")
        xs = T.alloc_buffer((xrows(t), T.int64(kw)), "float32")
        quantize(x2, xe, xo, xc, xs, xrows(t))
        # ONE parallel loop over every (token, slot, row block): one launch per call, not one per slot
        # (decode: top_k launches -> 1); no scalar assignments in its body (see moe_gemv_weighted_sum_dot)
        for p in T.parallel(t * T.int64(top_k * nblocks)):
            acc = T.alloc_buffer((rows * lanes,), "float32", scope="global")
            block(acc, wf, s, T.Cast("int64", ids[p // (top_k * nblocks), p // nblocks % top_k]),
                  p % nblocks * rows, xe, xo, xc, xs, p // nblocks if per_slot else p // (top_k * nblocks))
            for r in T.unroll(rows):
                y[p // (top_k * nblocks), p // nblocks % top_k, p % nblocks * rows + r] = row_result(acc, r, lanes)

    return func


@parsed_once
def moe_gemv_weighted_sum_dot(num_experts: int, n: int, k: int, top_k: int, isa: DotISA,
                              index_dtype: str = "int32", rows: int = ROWS) -> tirx.PrimFunc:
    """moe_gemv.py's moe_gemv_weighted_sum: (x [T, top_k, k], ids [T, top_k], routing weights
    [T, top_k], w [E, n, k // 8], scales [E, n, k // 32]) -> y [T, n] = sum_j rw[t, j] * (x[t, j] @ W[ids[t, j]]^T)."""
    kw, kg, lanes, rows, quantize, block = _setup("moe_gemv_weighted_sum", n, k, isa, rows)
    nblocks = n // rows
    chunks = min(nblocks, WSUM_TASKS)
    per = -(-nblocks // chunks)  # row blocks per task

    @T.prim_func(private=True)
    def func(x_handle: T.handle, ids_handle: T.handle, rw_handle: T.handle,
             w: T.Buffer((T.int64(num_experts), T.int64(n), T.int64(kw)), "uint32"),
             s: T.Buffer((T.int64(num_experts), T.int64(n), T.int64(kg)), "float16"), y_handle: T.handle):
        T.func_attr(kernel_attrs("moe_gemv_weighted_sum", isa))
        t = T.int64()
        x = T.match_buffer(x_handle, (t, T.int64(top_k), T.int64(k)), "float32")
        ids = T.match_buffer(ids_handle, (t, T.int64(top_k)), index_dtype)
        rw = T.match_buffer(rw_handle, (t, T.int64(top_k)), "float32")
        y = T.match_buffer(y_handle, (t, T.int64(n)), "float32")
        x2 = T.decl_buffer((t * top_k, T.int64(k)), "float32", data=x.data)
        wf = T.decl_buffer((T.int64(num_experts), T.int64(n * kw)), "uint32", data=w.data)
        xe = T.alloc_buffer((t * top_k, T.int64(kw)), "int32")
        xo = T.alloc_buffer((t * top_k, T.int64(kw)), "int32")
        xc = T.alloc_buffer((t * top_k, T.int64(kw)), "int32")
        xs = T.alloc_buffer((t * top_k, T.int64(kw)), "float32")
        quantize(x2, xe, xo, xc, xs, t * top_k)
        # (no scalar assignments in the parallel body: TVMScript makes each a 1-element buffer, which a
        # parallel lambda allocates from the workspace pool per iteration: 12 -> 20 GB/s without them)
        # Each task owns a run of `per` row blocks and reads them expert after expert (one stream of
        # per * rows rows at a time), adding into y in slot order (the old order: bit-identical). Before,
        # each row block ran over the top_k experts in turn, top_k short streams interleaved: 7.7 -> 9.8 GB/s
        # (Zen 3, 1 thread, cold weights: 17 layers x 32 experts, top-4)
        for ti in range(t):
            for c in T.parallel(T.int64(chunks)):
                acc = T.alloc_buffer((rows * lanes,), "float32", scope="global")
                for nb in range(c * per, T.min(c * per + per, T.int64(nblocks))):
                    for r in T.unroll(rows):
                        y[ti, nb * rows + r] = T.float32(0)
                for j in range(top_k):
                    for nb in range(c * per, T.min(c * per + per, T.int64(nblocks))):
                        block(acc, wf, s, T.Cast("int64", ids[ti, j]), nb * rows, xe, xo, xc, xs, ti * top_k + j)
                        for r in T.unroll(rows):
                            y[ti, nb * rows + r] = y[ti, nb * rows + r] + rw[ti, j] * row_result(acc, r, lanes)

    return func
