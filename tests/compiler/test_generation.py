"""compiler/generation.py: decode measured as generation runs (no timing assertions: benchmarks are scripts)."""
import numpy as np

from compiler.generation import describe, generation, kernel_time, measure_context, prompt_cache, single_step
from mobilemoe.runtimes import load_artifact


class FakeModel:
    """step(ids, kv): kv is the tuple of tokens so far; logits put the argmax at (last token + 1) % V."""
    vocab = 50

    def __init__(self):
        self.calls = []

    def step(self, ids, kv):
        kv = (kv or ()) + tuple(ids)
        self.calls.append(kv)
        logits = np.zeros(self.vocab, np.float32)
        logits[(ids[-1] + 1) % self.vocab] = 1.0
        return logits, kv


def test_generation_runs_consecutive_steps_from_the_same_depth():
    m = FakeModel()
    kv, token = prompt_cache(m.step, m.vocab, context=5)
    assert len(kv) == 5 and token == (kv[-1] + 1) % m.vocab
    m.calls.clear()
    g = generation(m.step, kv, token, steps=7, repeats=3, warmup=1)
    assert len(m.calls) == 4 * 7  # warm-up + 3 repeats, 7 steps each
    for run in range(4):
        depths = [len(c) for c in m.calls[run * 7:(run + 1) * 7]]
        assert depths == list(range(6, 13))  # each run starts at the prompt's depth; the cache grows
        fed = [c[-1] for c in m.calls[run * 7:(run + 1) * 7]]
        assert fed == [(token + i) % m.vocab for i in range(7)]  # the argmax fed back, as greedy generation
    assert g["steps"] == 7 and g["repeats"] == 3 and len(g["tok_s_runs"]) == 3
    assert g["tok_s_min"] <= g["tok_s"] <= g["tok_s_max"]
    assert g["faults_per_step"] >= 0 and g["faults_per_step_steady"] >= 0 and g["loop_ms"] is None


def test_single_step_repeats_one_step_from_a_fixed_cache():
    m = FakeModel()
    kv, token = prompt_cache(m.step, m.vocab, context=3)
    m.calls.clear()
    s = single_step(m.step, kv, token, repeats=5)
    assert [len(c) for c in m.calls] == [4] * 6 and s["n"] == 5 and s["min_s"] <= s["median_s"] <= s["max_s"]


def test_measure_context_on_a_host_artifact(host_int4):
    rt = load_artifact(host_int4)
    r = measure_context(rt, context=8, steps=4, repeats=2, single_repeats=2)
    g = r["generation"]
    assert r["context"] == 8 and g["steps"] == 4 and g["tok_s"] > 0
    assert g["loop_ms"] is not None and g["loop_ms"] >= 0  # the entry call was timed inside each step
    assert r["single_step"]["tok_s"] > 0
    assert r["kernels"]["kernel_ms"] > 0 and r["kernels"]["vm_alloc_calls"] >= 0
    line = describe(r)
    assert "4 steps in a row" in line and "single step from a fixed cache" in line and "outside kernels" in line
    assert "_invoke" not in rt.__dict__  # the timing wrapper is removed afterwards
    kv, token = prompt_cache(rt.step, rt.config.vocab_size, 6)
    assert rt.vm is not None and kernel_time(rt, kv, token, steps=1)["kernel_ms"] > 0
