"""What a new user runs into first (issue 14): command-line errors in one line, no foreign warnings
in a build, reproducible artifacts, no stale temp dirs or lock files, the demo's reference check."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import BIG_LOCK, big_build_lock
from mobilemoe.artifact import MANIFEST_NAME
from compiler.reproducible import exported_symbols
from mobilemoe.checkpoint import atomic_dir, remove_stale_temps
from mobilemoe.config import MobileMoEConfig
from tests.eval_helpers import make_checkpoint

REPO = Path(__file__).resolve().parents[2]


def cli(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, cwd=REPO, timeout=timeout)
    return r.returncode, r.stdout.decode(), r.stderr.decode("utf-8", "replace")


def one_line_error(rc, err, expect):
    assert rc != 0
    assert "Traceback" not in err, err
    assert expect in err, err


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """A test-moe checkpoint with the bundled tokenizer's vocabulary, built twice by the CLI."""
    root = tmp_path_factory.mktemp("repro")
    ckpt = make_checkpoint(root / "ckpt", seed=0)
    outs, errs = [], []
    for i in range(2):
        rc, _, err = cli("compiler.build", "--target", "host", "--checkpoint", str(ckpt), "--out", str(root / f"a{i}"))
        assert rc == 0, err
        outs.append(root / f"a{i}")
        errs.append(err)
    return ckpt, outs, errs


@pytest.mark.parametrize("module", ["compiler.run", "mobilemoe.generate"])
def test_bad_prompts_are_one_line_errors(module, two_builds):
    ckpt, outs, _ = two_builds
    where = ["--artifact", str(outs[0])] if module == "compiler.run" else ["--checkpoint", str(ckpt)]
    rc, _, err = cli(module, *where, "--prompt", b"caf\xff".decode("utf-8", "surrogateescape"))
    one_line_error(rc, err, "error: --prompt: not valid UTF-8 (byte 0xff at character 3)")
    long = "word " * 3000
    rc, _, err = cli(module, *where, "--prompt", long, "--max-new-tokens", "8")
    one_line_error(rc, err, "exceed the model's context of")
    for n in ("0", "-5"):
        rc, out, err = cli(module, *where, "--prompt", "x", "--max-new-tokens", n)
        one_line_error(rc, err, "argument --max-new-tokens: must be >= 1")
        assert out == ""  # not one token emitted


def test_generate_refuses_zero_new_tokens(tiny_moe):
    from mobilemoe.generate import generate
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(tiny_moe, [0, 5], 0)


def test_prompt_outside_the_vocabulary_is_one_line_error(host_int4):
    # test-moe has 512 ids; the artifact carries the bundled 8192-id tokenizer (no tokenizer of its own)
    rc, _, err = cli("compiler.run", "--artifact", str(host_int4), "--prompt", "asynchronous generators")
    one_line_error(rc, err, "outside the model's vocabulary of 512")


def test_run_prints_what_produced_it_and_the_reference(two_builds):
    ckpt, outs, _ = two_builds
    rc, out, err = cli("compiler.run", "--artifact", str(outs[0]), "--prompt", "The event loop",
                       "--max-new-tokens", "12", "--reference", str(ckpt))
    assert rc == 0, err
    assert "[produced by: tvm artifact for host: INT4 weights (group 32" in out
    assert "reference (float32 PyTorch" in out
    agree = float(out.rsplit("with the reference: ", 1)[1].split("]")[0])
    assert 0.5 <= agree <= 1.0  # random weights: near-ties are common, yet INT4 mostly keeps the top-1


def test_build_is_reproducible_and_quiet(two_builds):
    """Two CLI builds of one checkpoint: every file but lib.so byte-identical, the same program hash and
    lib.so exports, the manifests equal but for lib.so's hash, and no foreign warnings printed."""
    _, outs, errs = two_builds
    for err in errs:
        assert "Fast mode segfaults" not in err and "FutureWarning" not in err and "Warning" not in err, err
    m = [json.loads((o / MANIFEST_NAME).read_text()) for o in outs]
    unstable = m[0]["reproducibility"]["unstable"]
    assert set(unstable) <= {"lib.so"} and "why" in m[0]["reproducibility"]
    for name in m[0]["files"]:
        if name not in unstable:
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    strip = [{**x, "files": {k: v for k, v in x["files"].items() if k not in unstable}} for x in m]
    assert strip[0] == strip[1]
    syms = exported_symbols(outs[0] / "lib.so")
    assert syms == exported_symbols(outs[1] / "lib.so") and any("fused" in n for n in syms)


def test_stale_temp_dirs_of_killed_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".art.tmp-{dead.pid}-abcd"
    stale_old = tmp_path / f".art.old-{dead.pid}"
    live = tmp_path / f".art.tmp-{os.getppid()}-efgh"  # a live process (pytest's parent)
    for d in (stale, stale_old, live):
        d.mkdir()
        (d / "lib.so").write_bytes(b"partial")
    atomic_dir(tmp_path / "art", lambda t: (t / "x").write_text("ok"))
    assert not stale.exists() and not stale_old.exists() and live.exists()
    assert (tmp_path / "art" / "x").read_text() == "ok"
    assert remove_stale_temps(tmp_path / "art") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "art"]


def test_big_build_lock_leaves_no_file():
    big = MobileMoEConfig.from_name("mobilemoe-s")
    with big_build_lock(big):
        assert BIG_LOCK.exists()
    assert not BIG_LOCK.exists()


def test_eval_says_when_heldout_is_left_out():
    rc, _, err = cli("mobilemoe.eval", "--checkpoint", "mobilemoe/assets/default-model", "--limit", "2")
    assert rc == 0, err
    if not (REPO / "data/corpus/heldout.jsonl").is_file():
        assert "note: held-out perplexity left out" in err and "python -m train.corpus" in err
