"""TVM TIR kernels for mobilemoe.quant's INT4 weights (layout g32_sym_u32k8) and their CPU schedules."""

from .dequant import dequant_int4
from .int4_matmul import int4_matmul
from .moe_gemv import moe_gemv, moe_gemv_per_slot, moe_gemv_weighted_sum
from .schedules import schedule_int4_kernels, schedule_row_reduction

__all__ = [
    "dequant_int4",
    "int4_matmul",
    "moe_gemv",
    "moe_gemv_per_slot",
    "moe_gemv_weighted_sum",
    "schedule_int4_kernels",
    "schedule_row_reduction",
]
