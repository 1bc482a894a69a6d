"""TVM TIR kernels for mobilemoe.quant's INT4 weights (layout g32_sym_u32k8), the grouped prefill MoE
kernels (INT4 and float), and their CPU schedules."""

from .dequant import dequant_int4
from .int4_matmul import int4_matmul
from .moe_gemv import moe_gemv, moe_gemv_per_slot, moe_gemv_weighted_sum
from .moe_grouped import moe_grouped_down_combine, moe_grouped_gate_up, moe_route_plan, schedule_grouped
from .schedules import schedule_int4_kernels, schedule_row_reduction

__all__ = [
    "dequant_int4",
    "int4_matmul",
    "moe_gemv",
    "moe_gemv_per_slot",
    "moe_gemv_weighted_sum",
    "moe_grouped_down_combine",
    "moe_grouped_gate_up",
    "moe_route_plan",
    "schedule_grouped",
    "schedule_int4_kernels",
    "schedule_row_reduction",
]
