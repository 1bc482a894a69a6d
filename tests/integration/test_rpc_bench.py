"""Tuning and benchmarking over TVM RPC on the emulated arm64 device (tracker + qemu rpc_server):
a few MetaSchedule trials measured on the device, compiler.bench remotely, and a server killed mid-benchmark: a clear error and the partial JSON."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.arm64
REPO = Path(__file__).resolve().parents[2]
TASK = r"^int4_matmul2\[tokens=1\]$"  # test-moe's LM head in decode (512 x 64 INT4 GEMV)


@pytest.fixture(scope="module")
def artifact(linux_arm64):
    return linux_arm64  # test-moe's linux-arm64 artifact (tests/conftest.py), shared with test_arm64_artifact.py


def test_tune_a_few_trials_on_the_device(arm64_device, ckpt, tmp_path):
    from compiler.tuning import database as tdb
    from compiler.tuning.tune import table, tune
    from mobilemoe.checkpoint import load_checkpoint

    rpc = (arm64_device.tracker_host, arm64_device.tracker_port, arm64_device.key)
    session = tune(load_checkpoint(ckpt), "linux-arm64", 3, tmp_path / "db", rpc=rpc, only=TASK, per_iter=3,
                   verbose=False)
    print(table(session))
    (task,) = session["tasks"]
    seconds = tdb.records_by_workload(tmp_path / "db")[task["hash"]]
    assert len(seconds) == 3 and any(s < tdb.FAILED for s in seconds)  # measured on the device
    assert task["untuned_s"] and task["best_s"]
    target = json.loads((tmp_path / "db" / tdb.RECORDS).read_text().splitlines()[0])[1][2]
    assert target["mtriple"] == "aarch64-linux-gnu"


def test_bench_on_the_device(arm64_device, artifact, tmp_path):
    from compiler.bench import run

    rpc = (arm64_device.tracker_host, arm64_device.tracker_port, arm64_device.key)
    out = tmp_path / "bench.json"
    res = run(artifact, rpc, prompts=(4, 12), contexts=(4,), decode_steps=2, warmup=1, repeats=2, json_out=out,
              profile=True)
    assert res["complete"] and res["error"] is None and arm64_device.key in res["where"]
    assert [p["tokens"] for p in res["prefill"]] == [4, 12] and res["prefill"][0]["ttft"]["median_s"] > 0
    assert [d["context"] for d in res["decode"]] == [4] and res["decode"][0]["tok_s"] > 0
    assert res["load_s"] > 0 and "peak_rss_mb" not in res  # the device reports no memory
    assert "RPC" in res["profile"]["error"]  # TVM 0.27 RPC cannot carry the VM instrument callback
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))


def test_killed_server_ends_bench_with_clear_error_and_partial_json(arm64_device, artifact, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "compiler.bench", "--artifact", str(artifact), "--rpc-tracker",
           f"{arm64_device.tracker_host}:{arm64_device.tracker_port}", "--rpc-key", arm64_device.key, "--json",
           str(out), "--prompts", "4,8,16,24,32,48", "--contexts", "8", "--repeats", "3"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_file() and json.loads(out.read_text())["prefill"]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        arm64_device.kill_server()
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        arm64_device.start()  # the next tests get their device back
    assert proc.returncode != 0
    assert "error:" in stderr and arm64_device.key in stderr and "lost" in stderr, stderr[-3000:]
    assert "results so far are in" in stderr
    res = json.loads(out.read_text())
    assert res["prefill"] and not res["complete"] and res["error"].startswith("DeviceError")
    assert len(res["prefill"]) < 6
