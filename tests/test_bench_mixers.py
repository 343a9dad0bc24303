"""Smoke test of `polyattn bench mixers --quick`: it runs every mixer and writes the table, JSON and plot."""

import argparse
import json

from polyattn.bench import mixers


def test_quick_run_writes_json_and_png(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    mixers.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path), "--dtypes", "float32", "--width", "64",
                              "--heads", "2", "--time-cap", "60"])
    assert mixers.run(args) == 0
    data = json.loads((tmp_path / "mixers.json").read_text())
    assert {"device", "torch", "git", "width"} <= set(data["header"])
    measured = {(p["mixer"], p["mode"], p["tokens"]) for p in data["points"] if not p["skipped"]}
    assert {(m, mode, t) for m in mixers.MIXERS for mode in ("fwd", "fwd+bwd") for t in (256, 1024)} == measured
    assert all(p["seconds"] > 0 for p in data["points"])
    assert all(p["mem_mib"] > 0 for p in data["points"] if p["mode"] == "fwd+bwd")
    assert (tmp_path / "mixers.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "4-scan / 1-scan LightNet on 64×64" in out and "| float32 | fwd+bwd | scan4 |" in out


def test_time_cap_skips_and_records(tmp_path):
    parser = argparse.ArgumentParser()
    mixers.add_arguments(parser)
    args = parser.parse_args(["--sides", "8", "16", "--mixers", "sdpa", "lightnet", "--dtypes", "float32",
                              "--time-cap", "0", "--repeats", "1", "--width", "16", "--heads", "2",
                              "--out", str(tmp_path)])
    assert mixers.run(args) == 0
    data = json.loads((tmp_path / "mixers.json").read_text())
    # the first size is always measured; the next one is predicted above a zero cap, skipped and recorded
    for p in data["points"]:
        assert p["skipped"] == (p["tokens"] == 256)
        if p["skipped"]:
            assert p["predicted_seconds"] > 0 and "seconds" not in p
    assert data["ratios"]["sdpa_causal_over_lightnet_causal_16k_float32"] is None
