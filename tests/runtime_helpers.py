"""Shared by the runtime tests: a logits trace that exercises prefill and many decode steps."""
import numpy as np


def logits_trace(rt, prompt, steps: int) -> np.ndarray:
    """Logits of a prefill and `steps` decodes, each feeding the second-best token (varied text)."""
    logits, kv = rt.prefill(prompt)
    out = [logits.copy()]
    for _ in range(steps):
        logits, kv = rt.decode(int(np.argsort(logits)[-2]), kv)
        out.append(logits.copy())
    return np.stack(out)
