"""compiler.build --memory-budget-mb: routed experts in an expert file, read through a slot cache.

Identical tokens to the fully resident artifact at 100%, 50% and the minimum budget (the minimum
prefills one token at a time: its cache holds one layer's top-k experts), refusals, and the
routing statistics file driving the pinned set."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compiler.bench import run as bench_run
from compiler.build import BuildError, build
from compiler.expert_file import EXPERTS_NAME
from compiler.residency import BudgetError, budget_mb_for, plan_residency, runtime_bytes, weight_bytes
from compiler.routing import load_stats, main as routing_main
from mobilemoe.artifact import ArtifactError, read_manifest
from mobilemoe.config import MobileMoEConfig
from mobilemoe.runtimes import load_artifact
from safetensors.numpy import load_file
from tests.eval_helpers import SAMPLE
from tests.runtime_helpers import logits_trace

ROOT = Path(__file__).resolve().parents[2]
CFG = MobileMoEConfig.from_name("test-moe")  # the compiler fixtures' checkpoint (conftest.ckpt)
ALL = CFG.num_layers * CFG.num_experts



@pytest.mark.parametrize("experts", [pytest.param(ALL, marks=pytest.mark.slow), ALL // 2,
                                     pytest.param(CFG.top_k, marks=pytest.mark.slow)], ids=["100%", "50%", "minimum"])
def test_identical_tokens_to_the_resident_artifact(ckpt, host_int4, tmp_path, experts):
    out = build(ckpt, "host", tmp_path / "budget", verbose=False, memory_budget_mb=budget_mb_for(CFG, experts))
    m = read_manifest(out)
    rest, one, _ = weight_bytes(CFG)
    assert m["experts"]["slots"] == experts and (out / EXPERTS_NAME).stat().st_size == ALL * m["experts"]["record_bytes"]
    assert m["experts"]["record_bytes"] % 4096 == 0 and m["experts"]["nonexpert_bytes"] == rest
    # params.safetensors holds no routed expert; what it holds is the non-expert size the budget counted
    params = load_file(out / "params.safetensors")
    assert not any("moe_w13" in n or "moe_w2" in n for n in params) and sum(a.nbytes for a in params.values()) == rest
    ref, rt = load_artifact(host_int4), load_artifact(out)
    prompt = list(range(5, 45))
    # prefill writes the planned cache in place too: a second prompt chunk lands in the first one's buffers
    assert m["entry_points"]["prefill"]["kv_cache"]["layout"] == "inplace" and rt.prefill_inplace
    _, kv = rt.prefill(prompt[:8])
    buffers = [np.from_dlpack(t).ctypes.data for t in kv.values]
    _, kv = rt.prefill(prompt[8:], kv)
    assert [np.from_dlpack(t).ctypes.data for t in kv.values] == buffers and kv.length == len(prompt)
    # compiler.bench --profile calls the entry points itself (from an empty cache: given one at capacity)
    prof = bench_run(out, prompts=[8], contexts=[16], decode_steps=2, warmup=0, repeats=1, profile=True, log=str)
    assert prof["complete"] and [p["tokens"] for p in prof["profile"]] == [min(8, rt.prefill_chunk or 8), 1], prof
    want, got = logits_trace(ref, prompt, 12), logits_trace(rt, prompt, 12)
    # the grouped prefill sums a token's experts in slot order, not expert order: rounding only
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert ref.generate(prompt, 16)[0] == rt.generate(prompt, 16)[0]
    s = rt.experts.stats()
    assert s["misses"] > 0 and s["bytes_read"] == s["misses"] * one
    assert rt.experts.max_tokens == (None if experts >= CFG.num_experts else experts // CFG.top_k)
    if experts == ALL:  # everything fits: after the first misses every expert stays
        rt.experts.reset_stats()
        rt.generate(prompt, 8)
        assert rt.experts.stats()["misses"] == 0
    # the budget holds the run: weights, expert cache, KV cache, activations, code (compiler/residency.py),
    # measured in a fresh process as bench/residency.py does (peak resident memory over its imports)
    run = subprocess.run([sys.executable, "-m", "bench.residency", "--child", "--artifact", str(out), "--mode", "warm",
                          "--ids", json.dumps(list(range(5, 5 + 2 * 150))), "--prompt-tokens", "150",
                          "--decode-tokens", "32", "--threads", "1"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    fig = json.loads(run.stdout.splitlines()[-1])
    assert fig["peak_rss"] - fig["rss0"] <= 1.1 * m["experts"]["budget_bytes"], (fig, m["experts"])


def test_an_impossible_budget_is_refused_before_building(ckpt, tmp_path):
    rest, one, _ = weight_bytes(CFG)
    reserve = runtime_bytes(CFG)
    too_small = (rest + reserve + one) / 2**20  # one expert: below top-2
    with pytest.raises(BudgetError, match=rf"non-expert weights take {rest / 2**20:.2f} MB, the runtime \(KV cache at "
                                          rf"256 tokens, activations, code\) {reserve / 2**20:.2f} MB and one layer's "
                                          rf"top-2 experts {2 * one / 2**20:.2f} MB"):
        build(ckpt, "host", tmp_path / "x", verbose=False, memory_budget_mb=too_small)
    assert not (tmp_path / "x").exists()
    assert plan_residency(CFG, budget_mb_for(CFG, 2)).slots == 2
    assert plan_residency(CFG, 10_000).slots == ALL  # never more slots than experts


def test_the_runtime_keeps_to_the_planned_context(host_int4, ckpt, tmp_path):
    """keep_to_budget (what a budgeted artifact's runtime does): chunked prompts give the same logits,
    the KV cache stays at the planned capacity, and a step past it is refused, naming the option."""
    ref, rt = load_artifact(host_int4), load_artifact(host_int4)
    rt.keep_to_budget(64, 16)
    prompt = list(range(5, 45))
    want, kv = ref.prefill(prompt)
    got, kv2 = rt.prefill(prompt)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert kv2.capacity == 64 and kv2.length == 40
    with pytest.raises(ArtifactError, match=r"70 tokens of context, past the 64 its memory budget plans for "
                                            r"\(rebuild with a larger compiler.build --budget-context\)"):
        rt.prefill(list(range(30)), kv2)
    with pytest.raises(BuildError, match="--budget-context is the context a --memory-budget-mb build plans for"):
        build(ckpt, "host", tmp_path / "x", verbose=False, budget_context=64)
    with pytest.raises(BudgetError, match=r"--budget-context 999: expected 1 to the model's max_seq_len \(256\)"):
        plan_residency(CFG, 100, None, 999)
    assert plan_residency(CFG, 100, None, 64).kv_capacity == 64


def test_refused_for_targets_without_the_expert_cache(ckpt, tmp_path):
    with pytest.raises(BuildError, match="--memory-budget-mb: onnx keeps every expert"):
        build(ckpt, "onnx", tmp_path / "x", verbose=False, memory_budget_mb=100)
    with pytest.raises(BuildError, match="--memory-budget-mb: --fallback onnx keeps every expert"):
        build(ckpt, "host", tmp_path / "x", verbose=False, memory_budget_mb=100, fallback="onnx")
    with pytest.raises(BuildError, match="holds INT4 experts"):
        build(ckpt, "host", tmp_path / "x", verbose=False, memory_budget_mb=100, quant="none")
    with pytest.raises(BuildError, match="--memory-budget-mb plans for the in-place KV cache"):
        build(ckpt, "host", tmp_path / "x", verbose=False, memory_budget_mb=100, kv_cache="grow")
    with pytest.raises(BuildError, match="--routing-stats chooses the resident experts"):
        build(ckpt, "host", tmp_path / "x", verbose=False, routing_stats=tmp_path / "r.json")


def test_routing_statistics_round_trip_into_the_pinned_set(tmp_path):
    """compiler.routing's file, read back, pins the most used (layer, expert) pairs at >= half the experts."""
    from tests.eval_helpers import make_checkpoint
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=0)
    data = tmp_path / "cal.txt"
    data.write_text(SAMPLE)
    routing_main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r"), "--max-tokens", "200"])
    stats = load_stats(tmp_path / "r" / "routing.json")
    assert json.loads((tmp_path / "r" / "routing.json").read_text()) == stats
    cfg = CFG.replace(vocab_size=8192)
    counts = np.asarray([layer["counts"] for layer in stats["layers"]])
    plan = plan_residency(cfg, budget_mb_for(cfg, ALL // 2), stats)
    assert len(plan.pinned) == ALL // 2 // 4
    pinned = [counts[layer, e] for layer, e in plan.pinned]
    rest = [counts[layer, e] for layer in range(2) for e in range(8) if (layer, e) not in plan.pinned]
    assert min(pinned) >= max(rest) and pinned == sorted(pinned, reverse=True)
    assert plan_residency(cfg, budget_mb_for(cfg, ALL // 4), stats).pinned == []  # below half: LRU only
    bad = {**stats, "layers": stats["layers"][:1]}
    with pytest.raises(BudgetError, match=r"routing statistics: \[1, 8\] \(layers, experts\), the model has \[2, 8\]"):
        plan_residency(cfg, budget_mb_for(cfg, ALL // 2), bad)


@pytest.mark.slow
def test_arm64_build_with_dot_kernels(ckpt, tmp_path):
    """The budgeted graph cross-compiles for arm64 (int8 dot-product expert kernels over the slots);
    tests/integration/test_residency_rpc.py runs such artifacts on the emulated arm64 device."""
    out = build(ckpt, "linux-arm64", tmp_path / "arm", verbose=False, memory_budget_mb=budget_mb_for(CFG, ALL // 2))
    m = read_manifest(out)
    assert "dot products" in m["quantization"]["activations"] and m["experts"]["slots"] == ALL // 2
    assert m["entry_points"]["decode"]["params"][-4:] == [f"expert_pool_{i}" for i in range(4)]
    for e in ("decode", "prefill"):  # compiler.bench --profile: the kernels reading the pools are routed experts
        calls = {k: part for k, part, _ in m["entry_points"][e]["kernel_calls"] if "moe_g" in k}
        assert len(calls) == 2 and set(calls.values()) == {"routed experts"}, calls


def test_a_server_without_the_expert_cache_is_named(tmp_path):
    """RPC: a server not started by mobilemoe.runtimes.rpc_server (a stock tvm.exec.rpc_server) has no
    expert cache; opening a budgeted artifact there says so and how to start one that has."""
    from mobilemoe.runtimes.tvm_rpc import RemoteExpertCache

    class StockServer:
        device_name = "device 'x' at 127.0.0.1:9"

        def get_function(self, name):
            raise AttributeError(f"Module has no function '{name}'")

    with pytest.raises(ArtifactError, match=r"RPC server of device 'x' at 127.0.0.1:9 has no expert cache "
                                            r"\(mobilemoe.expert_cache.open\): start it with `python -m "
                                            r"mobilemoe.runtimes.rpc_server`"):
        RemoteExpertCache(StockServer(), tmp_path, {"file": "experts.bin"})
