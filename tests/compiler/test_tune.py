"""compiler.tuning on this machine: a tiny session, resume after SIGKILL, and a build that applies the
database (passes/apply_tuning_database.py) with the same numbers as the untuned build."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compiler.tuning import database as tdb

REPO = Path(__file__).resolve().parents[2]
TASK = r"^int4_matmul2\[tokens=1\]$"  # test-moe's LM head in decode: a 512 x 64 INT4 GEMV


# ckpt: test-moe (tests/conftest.py)


@pytest.fixture(scope="module")
def session(ckpt, tmp_path_factory):
    from compiler.tuning.tune import tune
    from mobilemoe.checkpoint import load_checkpoint
    db = tmp_path_factory.mktemp("tune") / "db"
    return db, tune(load_checkpoint(ckpt), "host", 3, db, only=TASK, per_iter=3, verbose=False)


def test_tiny_session_writes_database_table_and_plot(session):
    from compiler.tuning.tune import plot, table
    db, s = session
    (task,) = s["tasks"]
    assert task["name"] == "int4_matmul2[tokens=1]" and task["calls"] >= 1
    assert task["trials"] == 3 and len(tdb.records_by_workload(db)[task["hash"]]) == 3
    assert task["untuned_s"] > 0 and 0 < task["best_s"] < tdb.FAILED
    check = task["check"]  # the best record and the untuned kernel timed again, side by side
    assert check["untuned_s"] > 0 and check["tuned_s"] > 0 and check["best_s"] == task["best_s"]
    print(table(s))
    assert "int4_matmul2[tokens=1]" in table(s).splitlines()[1]
    png = plot(s, db, db / "tuning.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((db / "session.json").read_text())["target"] == "host"


def _tune_cmd(ckpt, db, trials):
    return [sys.executable, "-m", "compiler.tuning", "--target", "host", "--checkpoint", str(ckpt), "--trials",
            str(trials), "--db", str(db), "--tasks", TASK, "--per-iter", "1"]


@pytest.mark.slow  # minutes on 2 cores; `make test-all` runs it
def test_resume_after_sigkill_keeps_records_and_measures_only_the_rest(ckpt, tmp_path):
    db = tmp_path / "db"
    proc = subprocess.Popen(_tune_cmd(ckpt, db, 4), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = db / tdb.RECORDS
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_file() and len(records.read_text().splitlines()) >= 1:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the session ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = records.read_text().splitlines()
    assert 1 <= len(before) < 4
    with open(records, "a") as f:  # a write torn by the kill
        f.write('[0, [[["GetSBlock", [], ["matmul_tail"')

    r = subprocess.run(_tune_cmd(ckpt, db, 4), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropped a torn last line" in r.stderr
    after = records.read_text().splitlines()
    assert after[:len(before)] == before  # kept, as measured
    assert len(after) == 4  # only the missing trials were measured
    traces = [json.dumps(json.loads(line)[1][0]) for line in after]
    assert len(set(traces)) == 4  # no candidate measured twice


@pytest.fixture(scope="module")
def untuned(host_int4):
    return host_int4  # the session's host build of ckpt (tests/conftest.py)


def _same_logits(a, b, prompts=([3, 14, 15, 92, 65, 35, 89, 79],)):
    for ids in prompts:
        la, ka = a.prefill(ids)
        lb, kb = b.prefill(ids)
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)
        for t in (2, 71, 82):
            la, ka = a.decode(t, ka)
            lb, kb = b.decode(t, kb)
            np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)


def test_tuned_build_applies_database_with_same_numerics(ckpt, session, tmp_path):
    from compiler.build import build
    from mobilemoe.runtimes import load_artifact
    db, _ = session
    s = json.loads((db / "session.json").read_text())
    s["tasks"][0]["untuned_s"] = 1.0  # make the record a sure winner: this test is about applying it
    s["tasks"][0]["check"]["untuned_s"] = 1.0
    tdb.write_session(db, s)

    # fp32 activations: with int8 ones (a VNNI host) the LM head is a dot-product kernel, never tuned
    tuned = build(ckpt, "host", tmp_path / "tuned", quant="int4-f32", tuning_db=str(db), verbose=False)
    untuned = build(ckpt, "host", tmp_path / "untuned", quant="int4-f32", verbose=False)
    manifest = json.loads((tuned / "manifest.json").read_text())
    applied = manifest["tuning"]["static"]
    assert [a["task"] for a in applied] == ["int4_matmul2[tokens=1]"] and not manifest["tuning"]["skipped"]
    kernel = applied[0]["kernel"]
    decode_calls = [k for k, _, _ in manifest["entry_points"]["decode"]["kernel_calls"]]
    assert kernel in decode_calls  # (prefill's LM head, on the last token only, is the same workload)
    assert json.loads((untuned / "manifest.json").read_text())["tuning"] is None

    a, b = load_artifact(tuned), load_artifact(untuned)
    assert a.lib.implements_function(kernel, True) and not b.lib.implements_function(kernel, True)
    _same_logits(a, b)

    from compiler.bench import run  # and compiler.bench on it, with the per-kernel profile
    res = run(tuned, prompts=(8,), contexts=(8,), decode_steps=2, repeats=2, json_out=tmp_path / "b.json",
              profile=True)
    assert res["complete"] and res["prefill"][0]["tok_s"] > 0 and res["decode"][0]["tok_s"] > 0
    assert res["peak_rss_mb"] > 0 and json.loads((tmp_path / "b.json").read_text())["complete"]
    prefill, decode = res["profile"]
    for p in (prefill, decode):
        assert {"attention", "router", "routed experts", "shared expert", "other"} <= set(p["parts"])
        assert abs(sum(p["parts"].values()) - p["total_s"]) < 1e-9
    assert any(k["kernel"] == kernel for k in decode["kernels"])  # the tuned LM head, timed


@pytest.mark.slow  # minutes on 2 cores; `make test-all` runs it
def test_bucket_records_are_timed_replayed_and_the_build_replays_one_with_same_numerics(ckpt, untuned, tmp_path):
    """compiler.tuning times each bucket's record replayed on the whole dynamic kernel at every check
    shape; a record nowhere slower is replayed by the build, and the logits stay the same."""
    from compiler.build import build
    from compiler.tuning.tune import tune
    from compiler.tuning.replay import CHECKS, replay_table
    from mobilemoe.checkpoint import load_checkpoint
    from mobilemoe.runtimes import load_artifact

    db = tmp_path / "db"
    # prefill attention's einsum (legalized kernel names count up over both entries; the in-place
    # decode has no einsum since mobilemoe/kv_cache.py)
    s = tune(load_checkpoint(ckpt), "host", 2, db, only=r"^einsum1\[tokens=32,past=0\]$", per_iter=2,
             verbose=False, population=32)
    print(replay_table(s))
    replays = s["replays"]["einsum1"]
    labels = {"tokens=32,past=0", "tokens=128,past=0", "tokens=512,past=0", "tokens=8,past=0"}
    assert replays["entry"] == "prefill" and set(replays["untuned"]) == labels and CHECKS["prefill"]
    assert all(v > 0 for v in replays["untuned"].values())
    rows = replays["records"]
    assert [r["task"] for r in rows.values()] == ["einsum1[tokens=32,past=0]"]
    assert all(set(r["at"]) == labels and all(v > 0 for v in r["at"].values()) for r in rows.values())

    for entry in s["replays"].values():  # make the default schedule lose everywhere: this test is about applying
        entry["untuned"] = dict.fromkeys(entry["untuned"], 1.0)
    for task in s["tasks"]:
        task["untuned_s"] = 1.0
    tdb.write_session(db, s)
    tuned = build(ckpt, "host", tmp_path / "tuned", tuning_db=str(db), verbose=False)
    report = json.loads((tuned / "manifest.json").read_text())["tuning"]
    assert [r["kernel"] for r in report["replayed"]] == ["einsum1"], report
    _same_logits(load_artifact(tuned), load_artifact(untuned), ([5, 9, 200], list(range(3, 43))))


def test_pick_replay_keeps_the_default_schedule_where_a_record_is_slower(tmp_path):
    s = {"target": "host", "tasks": [], "replays": {"k": {"entry": "prefill", "untuned": {"a": 1.0, "b": 1.0},
         "records": {"r1": {"task": "k[a]", "best_s": 0.5, "at": {"a": 0.5, "b": 1.5}, "why": ""},
                     "r2": {"task": "k[b]", "best_s": 0.8, "at": {"a": 0.9, "b": 0.8}, "why": ""},
                     "r3": {"task": "k[c]", "best_s": 0.2, "at": {"a": 0.3, "b": 0.7}, "why": ""}}}}}
    tdb.write_session(tmp_path, s)
    (tmp_path / tdb.WORKLOADS).write_text("")
    (tmp_path / tdb.RECORDS).write_text("")
    tuned = tdb.TunedKernels(tmp_path, "host")
    hit = lambda h: (None, 1.0, {"hash": h, "name": h})  # noqa: E731
    assert tuned.pick_replay("k", [hit("r1"), hit("r2")])[0][2]["hash"] == "r2"  # r1 loses at b
    assert tuned.pick_replay("k", [hit("r1"), hit("r2"), hit("r3")])[0][2]["hash"] == "r3"  # the largest gain
    none, why = tuned.pick_replay("k", [hit("r1")])
    assert none is None and "1500000.0 us at b" in why and "default schedule 1000000.0 us" in why
    assert tuned.pick_replay("other", [hit("r1")])[0] is None


def test_a_bucket_record_replays_on_the_dynamic_kernel():
    """A record tuned at 32 rows schedules the kernel for any row count (the free dim stays whole)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload
    from tvm.script import relax as R

    from passes.kernel_workloads import without_tensor_intrinsics
    from passes.kernel_workloads import specialize, workload
    from passes.apply_tuning_database import replay_record

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor(("n", 64), "float32"), w: R.Tensor((64, 48), "float32")):
            return R.matmul(x, w)

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    mod = relax.transform.LegalizeOps()(Mod)
    gv = [g for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)][0]
    prim = mod[gv]
    n = prim.params[0].shape[0]
    wl = workload(specialize(prim, {n: 32}))
    with without_tensor_intrinsics():
        ctx = ms.TuneContext(mod=wl, target=target, task_name="t", space_generator=ms.space_generator.PostOrderApply(
            sch_rules=ms.ScheduleRule.create("llvm"), postprocs=ms.Postproc.create("llvm"),
            mutator_probs=ms.Mutator.create("llvm")))
    sch = ctx.generate_design_space()[0]
    assert any(inst.kind.name == "SamplePerfectTile" for inst in sch.trace.insts)
    record = TuningRecord(sch.trace, Workload(wl), [1e-4], target, None)
    func, why = replay_record(prim, record, target)
    assert func is not None, why
    assert func.attrs["tirx.is_scheduled"]
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    x, w = np.random.rand(5, 64).astype("float32"), np.random.rand(64, 48).astype("float32")
    out = tvm.runtime.tensor(np.zeros((5, 48), "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_allclose(out.numpy(), x @ w, rtol=1e-5)


def test_repair_drops_only_a_torn_last_line(tmp_path):
    (tmp_path / tdb.WORKLOADS).write_text('["1", "x"]\n')
    (tmp_path / tdb.RECORDS).write_text('[0, [1]]\n[0, [2]]\n[0, [[')
    assert tdb.repair(tmp_path) == [f"{tdb.RECORDS}: dropped a torn last line (6 bytes)"]
    assert (tmp_path / tdb.RECORDS).read_text() == '[0, [1]]\n[0, [2]]\n'
    assert tdb.repair(tmp_path) == []


@pytest.mark.parametrize("target_name", ["android-adreno", "android-mali"])
def test_opencl_targets_are_refused_with_a_clear_error(target_name, tmp_path):
    from compiler.tuning.tune import tune
    from targets import TargetError
    with pytest.raises(TargetError, match=f"tuning target '{target_name}' \\(opencl GPU kernels\\) is not supported"):
        tune(None, target_name, 4, tmp_path / "db")
    assert not (tmp_path / "db").exists()  # refused before anything was written

