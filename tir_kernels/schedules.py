"""CPU schedules for the INT4 kernels (int4_matmul.py, moe_gemv.py), found by their func attr.

Every kernel block is a reduction ``y[.., n] += x[.., k] * dequant(w[n, k])`` (moe_gemv_weighted_sum
also reduces over the top-k slots). The schedule keeps that computation and changes only the loops
and one activation copy:

- vector lanes are ``lanes`` consecutive packed words of one row (8 for 256-bit+ SIMD, 4 for 128-bit
  NEON/SSE, where 8 would spill; 4 also when K % 64 != 0): one vector load brings them, and nibble
  ``i`` of all of them is ``(words >> 4i) & 15``, a shift by a constant. The 8 nibbles are
  unrolled, so unpacking needs no per-lane shift table or broadcast;
- the matching activations ``x[8 * word + i]`` are strided, so the kernel first copies x (once per
  call, [.., K] floats) into the layout ``[.., K / (8 * lanes), 8 (nibble), lanes (word)]``, making
  every activation load contiguous;
- the scales of a vector are those of its lanes' groups (2 per vector at 8 lanes), loaded once per
  row and word block: the reduction runs word block by word block (64 or 32 k);
- N is split into blocks of ``rows`` output rows, run in parallel (outermost loop). The rows are
  unrolled, so each activation vector feeds ``rows`` independent FMA chains, and the partial sums
  stay in registers (rfactor over the lane) until one final lane sum per output;
- int4_matmul's tiled block (rows of X in tiles of M_TILE) also unrolls the tile inside the row loop:
  each dequantized weight vector is used for M_TILE rows of X (prefill), from ``rows x M_TILE x
  lanes`` register accumulators.

The grouped prefill kernels (moe_grouped.py) have data-dependent loop bounds (rows per expert), which
s_tir schedules cannot take: their scheduled form is written by hand in the same layout and rebuilt
for the target's lanes (moe_grouped.schedule_grouped).
"""

from tvm import IRModule, s_tir, tirx
from tvm.target import Target, codegen

from . import moe_grouped
from .dequant import NIBBLES_PER_WORD

# kernel -> its reduction blocks as (name, index of the N loop, whether the loop before N is an
# M tile to unroll). K is always the last loop.
KERNEL_BLOCKS = {
    "int4_matmul": [("matmul", 2, True), ("matmul_tail", 1, False)],
    "moe_gemv": [("moe_gemv", 2, False)],
    "moe_gemv_per_slot": [("moe_gemv", 2, False)],
    "moe_gemv_weighted_sum": [("moe_gemv", 1, False)],
}
DEFAULT_ROWS = 4  # output rows per register block (also with int4_matmul's M tile of 4)
DEFAULT_LANES = 8


def lanes_for(target: Target | None) -> int:
    """Packed words per vector: one SIMD register of fp32 (4 for 128-bit NEON/SSE), at most 8."""
    if target is None:
        return DEFAULT_LANES
    bits = codegen.llvm_get_vector_width(target)
    return max(4, min(DEFAULT_LANES, bits // 32))


def _word_lane_layout(ndim: int, lanes: int) -> tirx.IndexMap:
    """[.., K] -> [.., K / (8 * lanes), 8, lanes]: element (b, i, l) is k = 8 * (b * lanes + l) + i."""

    def index(*idx):
        k = idx[-1]
        block = NIBBLES_PER_WORD * lanes
        return (*idx[:-1], k // block, k % NIBBLES_PER_WORD, k // NIBBLES_PER_WORD % lanes)

    return tirx.IndexMap.from_func(index, ndim=ndim)


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _schedule_block(sch, block, n_pos: int, m_tiled: bool, rows: int, lanes: int):
    """Tile one reduction block; returns its row-block loop (to parallelise) and a finishing step."""
    loops = sch.get_loops(block)
    batch, n_loop, k_loop = loops[:n_pos], loops[n_pos], loops[-1]
    reduce_outer = loops[n_pos + 1 : -1]  # moe_gemv_weighted_sum's top-k slots
    while _extent(sch, n_loop) % rows:  # a ragged block would need a guard: no registers then
        rows //= 2
    m_tile = [batch.pop()] if m_tiled else []

    # [batch.., N, (slot,) K] -> [N / rows, batch.., (slot,) K / (8 lanes), 8, rows, (tile,) lanes]
    n_outer, n_inner = sch.split(n_loop, [None, rows])
    k_block, k_lane, k_nibble = sch.split(k_loop, [None, lanes, NIBBLES_PER_WORD])
    sch.reorder(n_outer, *batch, *reduce_outer, k_block, k_nibble, n_inner, *m_tile, k_lane)

    # Partial sums per lane live in registers for one (batch.., row block).
    out_ndim = len(sch.get(block).writes[0].region)
    partial = sch.rfactor(k_lane, factor_axis=out_ndim)
    # rfactor gives the partial-sum block a fresh copy of the loop nest, in the order set above.
    loops = sch.get_loops(partial)
    inner = loops[len(loops) - 4 - len(m_tile) :]  # k_block, k_nibble, n_inner, (tile,) k_lane
    n_outer, batch = loops[0], loops[1 : len(batch) + 1]
    reduce_outer = loops[len(batch) + 1 : -len(inner)]
    k_block, k_nibble, n_inner, k_lane = inner[0], inner[1], inner[2], inner[-1]
    sch.reverse_compute_at(block, batch[-1] if batch else n_outer)
    sch.set_scope(partial, 0, "local")
    for loop in (k_nibble, n_inner, *inner[3:-1]):
        sch.unroll(loop)
    sch.vectorize(k_lane)
    # Zero the partial sums before their reduction loop, after sch.parallel (which checks the
    # undecomposed reduction).
    init_loop = reduce_outer[0] if reduce_outer else k_block
    return n_outer, lambda: sch.decompose_reduction(partial, init_loop)


def schedule_row_reduction(
    func: tirx.PrimFunc, rows: int = DEFAULT_ROWS, lanes: int = DEFAULT_LANES
) -> tirx.PrimFunc:
    """Schedule one INT4 kernel PrimFunc (see the module docstring); returns the scheduled PrimFunc."""
    kernel = str(func.attrs["mobilemoe.kernel"])
    if kernel not in KERNEL_BLOCKS:
        raise ValueError(f"no INT4 schedule for kernel {kernel!r}; known: {sorted(KERNEL_BLOCKS)}")
    blocks = KERNEL_BLOCKS[kernel]
    sch = s_tir.Schedule(func)
    first = sch.get_sblock(blocks[0][0])
    while _extent(sch, sch.get_loops(first)[-1]) % (NIBBLES_PER_WORD * lanes):  # K % 32 == 0
        lanes //= 2

    # Activations in word-lane layout, copied once per call (for every block) before the N loops.
    x_index = [r.source.name for r in sch.get(first).reads].index("x")  # .source: the buffer
    x_copy = sch.cache_read(first, x_index, "global")
    x_ndim = len(sch.get(x_copy).writes[0].region)
    sch.transform_layout(x_copy, ("write", 0), _word_lane_layout(x_ndim, lanes))

    row_loops, finish = zip(
        *(
            _schedule_block(sch, sch.get_sblock(name), n_pos, m_tiled, rows, lanes)
            for name, n_pos, m_tiled in blocks
        )
    )
    # One parallel loop over row blocks for all blocks (int4_matmul's tiles and tail): one thread
    # launch, and TIR's CSE then keeps the lanes' scale-index vector a constant inside the parallel
    # body; hoisted out of it, LLVM no longer sees a constant and loads scales lane by lane.
    sch.parallel(sch.merge(*row_loops) if len(row_loops) > 1 else row_loops[0])
    for step in finish:
        step()
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_int4_kernels(mod: IRModule, target: Target | None = None) -> IRModule:
    """Schedule every unscheduled PrimFunc of `mod` that carries a known ``mobilemoe.kernel`` attr
    (KERNEL_BLOCKS, or a grouped kernel of moe_grouped.KERNELS).

    The target (an llvm CPU target) sets the vector lanes from its SIMD width (lanes_for); without
    one, 8 lanes. Returns a new IRModule; `mod` is left as it was.
    """
    if target is not None and target.kind.name != "llvm":
        raise ValueError(f"schedule_int4_kernels: CPU (llvm) targets only, got {target.kind.name!r}")
    lanes = lanes_for(target)
    scheduled = {}
    for gv, func in mod.functions.items():
        if (
            isinstance(func, tirx.PrimFunc)
            and func.attrs is not None
            and "mobilemoe.kernel" in func.attrs
            and not func.attrs.get("tirx.is_scheduled", False)
            # the embedding (one spatial block) is left to the generic rules
            and (str(func.attrs["mobilemoe.kernel"]) in KERNEL_BLOCKS
                 or str(func.attrs["mobilemoe.kernel"]) in moe_grouped.KERNELS)
        ):
            if str(func.attrs["mobilemoe.kernel"]) in moe_grouped.KERNELS:
                scheduled[gv] = moe_grouped.schedule_grouped(func, lanes)
            else:
                scheduled[gv] = schedule_row_reduction(func, lanes=lanes)
    mod = IRModule(dict(mod.functions), mod.attrs)
    for gv, func in scheduled.items():
        mod[gv] = func
    return mod
