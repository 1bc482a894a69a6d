"""bench/llamacpp.py: the non-timing logic (arguments, llama-bench JSON, the ratio table, the build cache).

The real build (~15-20 min) never runs here; the slow test converts the bundled model with a cached
build and skips, saying why, when there is none."""
import argparse
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bench import llamacpp
from bench.llamacpp import LlamaCppError

ROW = {"build_commit": "abc", "model_filename": "/w/q4_0-pure.gguf", "n_threads": 2, "n_prompt": 512, "n_gen": 0,
       "n_depth": 0, "avg_ts": 101.0, "samples_ns": [1, 2], "samples_ts": [100.0, 102.0]}


def test_parse_llama_bench_rows():
    tg = {**ROW, "model_filename": "q4_0.gguf", "n_prompt": 0, "n_gen": 128, "n_threads": 1, "samples_ts": [30.5]}
    rows = llamacpp.parse_llama_bench(json.dumps([ROW, tg]))
    assert rows == [{"model": "q4_0-pure.gguf", "test": "pp512", "threads": 2, "tok_s": [100.0, 102.0]},
                    {"model": "q4_0.gguf", "test": "tg128", "threads": 1, "tok_s": [30.5]}]
    both = {**ROW, "n_gen": 16, "n_depth": 64}
    assert llamacpp.parse_llama_bench(json.dumps([both]))[0]["test"] == "pp512+tg16@d64"


def test_parse_llama_bench_errors():
    with pytest.raises(LlamaCppError, match="not JSON"):
        llamacpp.parse_llama_bench("main: error")
    with pytest.raises(LlamaCppError, match="samples_ts"):
        llamacpp.parse_llama_bench(json.dumps([{k: v for k, v in ROW.items() if k != "samples_ts"}]))


def test_llama_bench_cmd(tmp_path):
    b = llamacpp.Build(tmp_path / "0.3.36")
    cmd = llamacpp.llama_bench_cmd(b, [Path("a.gguf"), Path("b.gguf")], 2, (128, 512), 128, 1)
    assert cmd[0] == str(tmp_path / "0.3.36" / "bin" / "llama-bench")
    assert cmd[1:] == ["-m", "a.gguf", "-m", "b.gguf", "-p", "128,512", "-n", "128", "-t", "2", "-r", "1", "-o", "json"]


def test_arguments():
    p = argparse.ArgumentParser()
    llamacpp.add_peer_args(p)
    a = p.parse_args([])
    assert (a.llama_cpp, a.llama_threads, a.rounds, a.llama_prompts, a.llama_gen) == (False, [1, 2], 5, [128, 512], 128)
    assert p.parse_args(["--llama-cpp", "--llama-threads", "2"]).llama_threads == [2]
    for bad in ("x", "0", ""):
        with pytest.raises(SystemExit):
            p.parse_args(["--llama-threads", bad])


def test_sdist_version():
    assert llamacpp.sdist_version(Path("/d/llama_cpp_python-0.3.36.tar.gz")) == "0.3.36"
    with pytest.raises(LlamaCppError, match="not a llama-cpp-python source distribution"):
        llamacpp.sdist_version(Path("numpy-2.0.tar.gz"))


def fake_round(llama_tok_s, ours_tok_s, t):
    return [{"model": f"{q}.gguf", "test": test, "threads": t, "tok_s": [v]}
            for q, vals in llama_tok_s.items() for test, v in vals.items()], ours_tok_s


def test_alternate_swaps_the_order_every_round():
    calls = []
    rounds = llamacpp.alternate(3, [1, 2], lambda t: calls.append(("llama", t)) or [],
                                lambda t: calls.append(("ours", t)) or {})
    assert [r["threads"] for r in rounds] == [1, 1, 1, 2, 2, 2]
    assert calls[:6] == [("llama", 1), ("ours", 1), ("ours", 1), ("llama", 1), ("llama", 1), ("ours", 1)]


def test_summarize_and_table():
    rounds = []
    for t, scale in ((1, 1.0), (2, 2.0)):
        for r, jitter in enumerate((1.0, 1.1, 0.9)):
            llama, ours = fake_round({"q4_0": {"pp128": 100 * scale * jitter, "tg128": 20 * scale},
                                      "q4_0-pure": {"pp128": 110 * scale, "tg128": 25 * scale}},
                                     {"pp128": 200 * scale * jitter, "tg128": 10 * scale}, t)
            rounds.append({"threads": t, "round": r, "llama": llama, "ours": ours})
    table = llamacpp.summarize(rounds, ["pp128", "tg128"], ["q4_0", "q4_0-pure"])
    assert [(r["threads"], r["test"]) for r in table] == [(1, "pp128"), (1, "tg128"), (2, "pp128"), (2, "tg128")]
    pp1 = table[0]
    assert pp1["ours"] == {"median": 200.0, "min": 180.0, "max": 220.00000000000003, "n": 3}
    assert pp1["ours_over_q4_0"] == pytest.approx(2.0)
    assert pp1["ours_over_q4_0-pure"] == pytest.approx(200 / 110)
    assert table[3]["ours_over_q4_0-pure"] == pytest.approx(20 / 50)
    text = llamacpp.format_table(table, ["q4_0", "q4_0-pure"], "load note")
    lines = text.splitlines()
    assert "ours/q4_0-pure" in lines[0] and lines[-1] == "load note"
    assert lines[1].split()[:3] == ["pp128", "1", "200.0"] and lines[1].rstrip().endswith("1.82x")
    with pytest.raises(LlamaCppError, match="no tg128 figure for q4_0.gguf at 1"):
        llamacpp.summarize([{**rounds[0], "llama": []}], ["tg128"], ["q4_0"])


def test_compare_logits():
    ref = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    r = llamacpp.compare_logits(ref, ref + 0.01)
    assert r["top1_agreement"] == 1.0 and r["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    assert r["rel_err"] == pytest.approx(0.01 / (ref.max() - ref.min()), rel=1e-3)
    with pytest.raises(llamacpp.ConversionError, match="shapes differ"):
        llamacpp.compare_logits(ref, ref[:3])


# ------------------------------------------------------------------------------------- the build cache

def fake_sdist(d: Path, version="9.9.9") -> Path:
    path = d / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, text in (("vendor/llama.cpp/CMakeLists.txt", "# llama.cpp\n"),
                           ("vendor/llama.cpp/convert_hf_to_gguf.py", "# converter\n"), ("setup.py", "")):
            data = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-{version}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path



@pytest.mark.parametrize("filters", [True, False], ids=["data-filter", "python-3.11.2"])
def test_vendored_extraction_stays_inside(tmp_path, monkeypatch, filters):
    """vendor/llama.cpp is extracted as tarfile's "data" filter would, also on Pythons without filters
    (3.11.0-3.11.3): files land inside dest without setuid or group/other-write bits, '..' is refused."""
    if not filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    sdist = fake_sdist(tmp_path)
    llamacpp._extract_vendored(sdist, tmp_path / "ok")
    assert (tmp_path / "ok" / "convert_hf_to_gguf.py").read_text() == "# converter\n"
    bad = tmp_path / "bad" / "llama_cpp_python-6.6.6.tar.gz"
    bad.parent.mkdir()
    with tarfile.open(bad, "w:gz") as tf:
        for name, mode in (("vendor/llama.cpp/setuid.sh", 0o4777), ("vendor/llama.cpp/../../escaped.txt", 0o644)):
            info = tarfile.TarInfo(f"llama_cpp_python-6.6.6/{name}")
            info.size, info.mode = 1, mode
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises((LlamaCppError, tarfile.TarError), match="outside|escaped"):
        llamacpp._extract_vendored(bad, tmp_path / "bad" / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "bad" / "escaped.txt").exists()
    assert (tmp_path / "bad" / "out" / "setuid.sh").stat().st_mode & 0o7022 == 0

class FakeRunner:
    """Stands in for cmake and pip: the build step writes the tools; `fail_at` raises at that step."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, cmd, check=True):
        self.calls.append(cmd)
        step = "pip" if "pip" in cmd else ("build" if "--build" in cmd else "configure")
        if step == self.fail_at:
            raise subprocess.CalledProcessError(1, cmd)
        if step == "build":
            bin_dir = Path(cmd[cmd.index("--build") + 1]) / "bin"
            bin_dir.mkdir(parents=True)
            for t in llamacpp.TOOLS:
                (bin_dir / t).write_text("#!/bin/sh\n")
        if step == "pip":
            Path(cmd[cmd.index("--target") + 1], "sentencepiece").mkdir(parents=True)
        return subprocess.CompletedProcess(cmd, 0)


def test_build_is_cached_and_reused(tmp_path):
    sdist, root = fake_sdist(tmp_path), tmp_path / "cache"
    run = FakeRunner()
    b = llamacpp.build(sdist=sdist, root=root, runner=run)
    assert b.dir == root / "9.9.9" and b.info()["version"] == "9.9.9"
    assert sorted(p.name for p in b.dir.iterdir()) == ["bin", "build.json", "pydeps", "src"]
    assert b.converter.read_text() == "# converter\n" and all(b.tool(t).is_file() for t in llamacpp.TOOLS)
    assert [p.name for p in root.iterdir()] == ["9.9.9"]  # no temporary directory left
    again = FakeRunner()
    assert llamacpp.build(sdist=sdist, root=root, runner=again) == b and again.calls == []
    assert llamacpp.build(version="9.9.9", root=root, runner=again) == b and again.calls == []
    assert llamacpp.find_build(root=root) == b and llamacpp.find_build("1.0", root=root) is None


@pytest.mark.parametrize("step", ["configure", "build", "pip"])
def test_failed_build_leaves_no_cache(tmp_path, step):
    root = tmp_path / "cache"
    with pytest.raises(subprocess.CalledProcessError):
        llamacpp.build(sdist=fake_sdist(tmp_path), root=root, runner=FakeRunner(fail_at=step))
    assert list(root.iterdir()) == [] and llamacpp.find_build(root=root) is None


def test_killed_build_is_cleared(tmp_path):
    root = tmp_path / "cache"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = root / f".9.9.9.tmp-{dead.pid}"  # what a SIGKILLed build leaves: no build.json, never renamed
    (stale / "src").mkdir(parents=True)
    live = root / f".9.9.9.tmp-{os.getpid()}x"  # not a pid: left alone
    live.mkdir()
    assert llamacpp.find_build(root=root) is None
    b = llamacpp.build(sdist=fake_sdist(tmp_path), root=root, runner=FakeRunner())
    assert not stale.exists() and live.exists() and b.dir.is_dir()


def test_stale_build_is_replaced(tmp_path, monkeypatch):
    """A cached build made with other CMake flags (or another logits.c) is not found, and is rebuilt."""
    root, sdist = tmp_path / "cache", fake_sdist(tmp_path)
    b = llamacpp.build(sdist=sdist, root=root, runner=FakeRunner())
    monkeypatch.setitem(llamacpp.CMAKE_FLAGS, "GGML_NATIVE", "OFF")
    assert llamacpp.find_build("9.9.9", root=root) is None and llamacpp.find_build(root=root) is None
    run = FakeRunner()
    again = llamacpp.build(sdist=sdist, root=root, runner=run)
    assert again == b and run.calls and again.info()["cmake"]["GGML_NATIVE"] == "OFF"
    assert [p.name for p in root.iterdir()] == ["9.9.9"]


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILEMOE_CACHE", str(tmp_path))
    assert llamacpp.cache_root() == tmp_path / "llama.cpp"


# ------------------------------------------------------------------------------------- a real conversion

@pytest.mark.slow
def test_real_conversion_of_the_bundled_model(tmp_path):
    b = llamacpp.find_build()
    if b is None:
        pytest.skip(f"no cached llama.cpp build in {llamacpp.cache_root()} (`python -m bench.llamacpp build`, "
                    f"~15-20 min on 2 cores)")
    from mobilemoe.generate import DEFAULT_MODEL_DIR
    files = llamacpp.convert(b, DEFAULT_MODEL_DIR, tmp_path)
    assert all(f.stat().st_size > 0 for f in files.values())
    assert files["q4_0-pure"].stat().st_size < files["f16"].stat().st_size / 3
    r = llamacpp.conversion_check(b, files["f16"], DEFAULT_MODEL_DIR)
    assert r["ok"]
    assert llamacpp.convert(b, DEFAULT_MODEL_DIR, tmp_path) == files  # reused: the key matches
    rows = llamacpp.run_llama_bench(b, [files["q4_0-pure"]], 1, (16,), 4)
    assert [(r["test"], r["threads"]) for r in rows] == [("pp16", 1), ("tg4", 1)] and rows[0]["tok_s"][0] > 0


def test_conversion_check_fails_loudly(monkeypatch, tmp_path):
    """Logits that disagree with our PyTorch model (here: another position's) raise ConversionError."""
    import torch

    from mobilemoe.checkpoint import load_checkpoint
    from mobilemoe.generate import DEFAULT_MODEL_DIR
    model = load_checkpoint(DEFAULT_MODEL_DIR).float().eval()

    def shifted(b, gguf, ids, threads=2):
        with torch.no_grad():
            return np.roll(model(torch.tensor([ids]))[0][0].numpy(), 1, axis=0)
    monkeypatch.setattr(llamacpp, "llama_logits", shifted)
    with pytest.raises(llamacpp.ConversionError, match="disagrees with our model"):
        llamacpp.conversion_check(llamacpp.Build(tmp_path), tmp_path / "f16.gguf", DEFAULT_MODEL_DIR, n=16)
    monkeypatch.setattr(llamacpp, "llama_logits", lambda b, g, ids, threads=2: shifted(b, g, ids)[np.r_[1:len(ids), 0]])
    assert llamacpp.conversion_check(llamacpp.Build(tmp_path), tmp_path / "f16.gguf", DEFAULT_MODEL_DIR, n=16)["ok"]


def test_load_note():
    rounds = [{"threads": t, "round": 0, "load_average": la, "ours": {"tg128": 1.0, "cpu_per_wall": c},
               "llama": [{"model": "q4_0.gguf", "test": "tg128", "threads": t, "tok_s": [1.0],
                          "cpu_per_wall": c - 0.04}]}
              for t, la, c in ((1, 0.3, 0.99), (2, 2.5, 1.5))]
    note = llamacpp.load_note({"repeats": 1, "cores": 2, "threads": [1, 2], "rounds": rounds,
                               "load_average_rounds": [0.3, 2.5]}).splitlines()
    assert note[0].startswith("1 alternating rounds") and "load average 0.30..2.50" in note[0]
    assert note[1] == "CPU/wall at 1 thread(s): ours 0.99..0.99, llama-bench 0.95..0.95: ok"
    assert note[2] == ("CPU/wall at 2 thread(s): ours 1.50..1.50, llama-bench 1.46..1.46: the cores were shared with "
                       "other processes, treat small ratios as noise")
