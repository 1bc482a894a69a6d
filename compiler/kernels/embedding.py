"""INT4 embedding lookup: rows of a packed table, dequantized on the fly (the tied LM head's table).

    embedding_int4(ids [T] int64, w uint32 [V, H // 8], s fp16 [V, H // 32]) -> [T, H] float32
    y[t, h] = dequant(w[ids[t], h // 8], s[ids[t], h // 32], h)      (layout of mobilemoe.quant)
"""
from __future__ import annotations

from tvm import te

from .dequant import GROUP_SIZE, NIBBLES_PER_WORD, dequant_int4


def embedding_int4(ids: te.Tensor, w: te.Tensor, s: te.Tensor) -> te.Tensor:
    (T,) = ids.shape
    H = w.shape[1] * NIBBLES_PER_WORD
    return te.compute((T, H), lambda t, h: dequant_int4(w[ids[t], h // NIBBLES_PER_WORD],
                                                        s[ids[t], h // GROUP_SIZE], h), name="embedding_int4")
