"""UseGpuInt4Matmul: our CPU INT4 matmul swapped for its one-block GPU form (GPU lowering, before the
dlight rules).

Before:
    int4_matmul (tir_kernels/int4_matmul.py): rows in whole tiles + a tail, two blocks for a CPU schedule
After:
    int4_matmul_gpu (tir_kernels/int4_matmul_gpu.py) of the same N, K: the same parameters (x, w, s, y),
    so the Relax calls stay as they are; one block "matmul" that dlight's GPU rules schedule. The
    PrimFunc's other attributes (global_symbol, ...) are kept.

Other PrimFuncs are left alone.
"""
from __future__ import annotations

import tvm
from tvm import tirx

from tir_kernels.dequant import NIBBLES_PER_WORD
from tir_kernels.int4_matmul import KERNEL as CPU_KERNEL
from tir_kernels.int4_matmul_gpu import int4_matmul_gpu


def _weight_shape(func: tirx.PrimFunc) -> tuple[int, int]:
    """(N, K) of an int4_matmul from its packed-code parameter w [N, K // 8]."""
    w = func.params[1]  # a Buffer parameter (TVM 0.27 PrimFuncs take buffers directly)
    return int(w.shape[0]), int(w.shape[1]) * NIBBLES_PER_WORD


@tvm.transform.module_pass(opt_level=0, name="UseGpuInt4Matmul")
class UseGpuInt4Matmul:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and func.attrs and str(func.attrs.get("mobilemoe.kernel", "")) == CPU_KERNEL:
                gpu = int4_matmul_gpu(*_weight_shape(func))
                for key, value in func.attrs.items():
                    if key not in ("mobilemoe.kernel", "op_pattern"):
                        gpu = gpu.with_attr(key, value)
                out[gv] = gpu
        return out
