"""compiler.tuning and compiler.bench over TVM RPC on a loopback tracker with an x86 rpc_server
(targets/local_rpc.py): candidates are timed in the server; a session SIGKILLed and run again
resumes; a server killed mid-session that comes back costs nothing (the candidates lost with it
are measured again and the session goes on); one that stays away ends the session with a clear
error and every finished measurement kept; and compiler.bench runs a host artifact on the server."""
import gc
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
# ckpt (test-moe) and host_int4 (its host artifact): tests/conftest.py


def _tune(ckpt, db, device, trials: int, per_iter: int, *extra: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "compiler.tuning", "--target", "host", "--checkpoint", str(ckpt), "--trials",
           str(trials), "--db", str(db), "--tasks", TASK, "--per-iter", str(per_iter), "--rpc-tracker",
           f"{device.tracker_host}:{device.tracker_port}", "--rpc-key", device.key, "--population", "32", *extra]
    with open(log, "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)


def _records(db) -> list[str]:
    path = db / tdb.RECORDS
    return path.read_text().splitlines() if path.is_file() else []


def _wait(proc, done, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if done():
            return
        time.sleep(0.1)
    assert proc.poll() is None, f"compiler.tuning ended (exit {proc.returncode}) before {what}"
    raise AssertionError(f"no {what} within {timeout:.0f}s")


def _traces(lines: list[str]) -> set[str]:
    return {json.dumps(json.loads(line)[1][0]) for line in lines}


def test_tune_over_rpc_times_candidates_in_the_server(local_rpc, ckpt, tmp_path):
    from compiler.tuning.tune import table, tune
    from mobilemoe.checkpoint import load_checkpoint

    before = local_rpc.log("server").count("load_module")
    session = tune(load_checkpoint(ckpt), "host", 3, tmp_path / "db", rpc=local_rpc.rpc, only=TASK, per_iter=3,
                   verbose=False, population=32)
    print(table(session))
    (task,) = session["tasks"]
    seconds = tdb.records_by_workload(tmp_path / "db")[task["hash"]]
    # every candidate is a trial; one whose random schedule fails to build or run (MetaSchedule's
    # search space holds a few) is stored as failed with its error line kept in the session
    failed = [s for s in seconds if s >= tdb.FAILED]
    assert len(seconds) == 3 and len(failed) < 3, task
    assert len(task.get("failures", [])) == len(failed), task
    assert all(f.startswith(("build: ", "run: ")) for f in task.get("failures", [])), task
    assert task["untuned_s"] > 0 and task["best_s"] == min(seconds)
    # the untuned kernel and the 3 candidates were each loaded and timed in the server
    assert local_rpc.log("server").count("load_module") - before >= 4


@pytest.mark.slow  # minutes on 2 cores; `make test-all` runs it
def test_sigkill_then_resume_over_rpc(local_rpc, ckpt, tmp_path):
    db = tmp_path / "db"
    proc = _tune(ckpt, db, local_rpc, 4, 1, log=tmp_path / "1.log")
    try:
        _wait(proc, lambda: len(_records(db)) >= 1, "the first record")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _records(db)
    assert 1 <= len(before) < 4

    proc = _tune(ckpt, db, local_rpc, 4, 1, log=tmp_path / "2.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "2.log").read_text()[-3000:]
    after = _records(db)
    assert after[:len(before)] == before and len(after) == 4 and len(_traces(after)) == 4


@pytest.mark.slow  # minutes on 2 cores; `make test-all` runs it
def test_server_killed_mid_session_comes_back_and_tuning_goes_on(local_rpc, ckpt, tmp_path):
    db, log = tmp_path / "db", tmp_path / "tune.log"
    proc = _tune(ckpt, db, local_rpc, 6, 2, "--device-wait", "120", log=log)
    try:
        _wait(proc, lambda: len(_records(db)) >= 2, "two records")
        local_rpc.kill_server()
        _wait(proc, lambda: "lost with the device" in log.read_text(), "a lost candidate", timeout=120)
        local_rpc.start()  # the device is back: the session goes on
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        local_rpc.start()
    lines = _records(db)
    assert len(lines) == 6 and len(_traces(lines)) == 6  # the lost candidates were measured, none twice
    # none lost with the server is stored as failed: a failed record is a candidate's own failure, reported
    failed = [s for s in next(iter(tdb.records_by_workload(db).values())) if s >= tdb.FAILED]
    assert len(failed) == log.read_text().count("a candidate failed and counts as a trial"), log.read_text()[-3000:]
    session = json.loads((db / tdb.SESSION).read_text())
    assert session["tasks"][0]["trials"] == 6 and session["tasks"][0]["best_s"]


@pytest.mark.slow  # minutes on 2 cores; `make test-all` runs it
def test_server_gone_for_good_ends_tuning_with_a_clear_error(local_rpc, ckpt, tmp_path):
    db, log = tmp_path / "db", tmp_path / "tune.log"
    proc = _tune(ckpt, db, local_rpc, 8, 2, "--device-wait", "3", log=log)
    try:
        _wait(proc, lambda: len(_records(db)) >= 2, "two records")
        local_rpc.kill_server()
        assert proc.wait(timeout=180) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        local_rpc.start()  # back for the next tests
    err = log.read_text()
    assert f"error: device '{local_rpc.key}' at tracker {local_rpc.tracker_host}:{local_rpc.tracker_port} dropped" \
        in err, err[-3000:]
    assert "run the same command again to resume" in err
    kept = _records(db)
    assert 2 <= len(kept) < 8 and all(json.loads(line) for line in kept)  # whole records only


def test_bench_and_logits_of_a_host_artifact_over_rpc(local_rpc, host_int4, tmp_path):
    from compiler.bench import run
    from mobilemoe.runtimes.tvm_rpc import RemoteRuntime
    from mobilemoe.runtimes import load_artifact

    def same_logits_as_here(artifact):  # its session (and the remote KV cache) ends on return
        remote, here = RemoteRuntime(local_rpc.request_session(timeout=60), artifact), load_artifact(artifact)
        ids = [3, 14, 15, 92, 65]
        (r_logits, r_kv), (h_logits, h_kv) = remote.prefill(ids), here.prefill(ids)
        np.testing.assert_allclose(r_logits, h_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(remote.decode(7, r_kv)[0], here.decode(7, h_kv)[0], rtol=1e-5, atol=1e-5)

    artifact = host_int4
    same_logits_as_here(artifact)
    gc.collect()  # the server is free again for the benchmark's own session
    res = run(artifact, local_rpc.rpc, prompts=(4, 12), contexts=(4,), decode_steps=2, repeats=2,
              json_out=tmp_path / "bench.json", log=lambda *a: None)
    assert res["complete"] and local_rpc.key in res["where"] and res["tuning"] is False
    assert [p["tokens"] for p in res["prefill"]] == [4, 12] and res["decode"][0]["tok_s"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["complete"]
