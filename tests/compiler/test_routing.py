"""compiler.routing: routing statistics of a MoE on real text (counts, co-occurrence, skew, reuse)."""
import json

import numpy as np
import pytest

from compiler.routing import RoutingError, layer_stats, load_stats, main, read_texts
from tests.eval_helpers import SAMPLE, make_checkpoint


def test_layer_stats_by_hand():
    ids = np.array([[0, 1], [0, 2], [0, 1], [3, 2]])  # 4 tokens, top-2 of 4 experts
    s = layer_stats(ids, 4)
    assert s["counts"] == [3, 2, 2, 1]
    assert s["cooccurrence"][0][1] == 2 and s["cooccurrence"][1][0] == 2 and s["cooccurrence"][2][3] == 1
    assert s["top25_share"] == 3 / 8  # the top 1 expert of 4 serves 3 of 8 routed slots
    assert s["reuse_prev_token"] == pytest.approx((1 + 1 + 0) / 6, abs=1e-4)  # token pairs share 1, 1, 0 experts


def test_cli_writes_stats_that_round_trip(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=0)
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in SAMPLE.split("\n\n")))
    main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "out"), "--max-tokens", "300"])
    stats = load_stats(tmp_path / "out" / "routing.json")
    assert (tmp_path / "out" / "routing.png").stat().st_size > 10_000
    assert stats["tokens"] == 300 and len(stats["layers"]) == 2
    for layer in stats["layers"]:
        co = np.asarray(layer["cooccurrence"])
        assert sum(layer["counts"]) == 300 * stats["top_k"]
        assert (co == co.T).all() and (np.diag(co) == layer["counts"]).all()
        assert 0.25 <= layer["top25_share"] <= 1
    assert "top 25% of experts serve" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(RoutingError, match=r"bad.jsonl:2: expected \{\"text\": str\}"):
        read_texts(bad)
    with pytest.raises(RoutingError, match="calibration data file not found"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "r.json").write_text('{"format": "other"}')
    with pytest.raises(RoutingError, match="format 'other', expected 'mobilemoe-routing/1'"):
        load_stats(tmp_path / "r.json")
