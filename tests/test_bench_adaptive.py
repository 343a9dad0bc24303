"""`polyattn bench adaptive` on two tiny trained runs: the early-exit curve spans one block (threshold 0) to every
block (threshold 1.0), the Mixture-of-Depths row counts the blocks its tokens ran, and the files are written."""

import json

from polyattn.cli import main


def test_bench_adaptive_measures_both_curves(tmp_path, cache_dir):
    common = ["train.max_steps=2", f"train.out_dir={tmp_path}", "train.progress=false", "train.threads=1"]
    assert main(["train", "default", "model.early_exit=true", "train.run_name=exit", *common]) == 0
    assert main(["train", "llama_mod_shakespeare", "data.source=shakespeare", "model.dim=32", "model.mod_capacity=0.25",
                 "data.seq_len=32", "data.eval_tokens=256", "train.batch_size=4", "train.run_name=mod", *common]) == 0
    out = tmp_path / "bench"
    assert main(["bench", "adaptive", "--vision", str(tmp_path / "exit"), "--lm", str(tmp_path / "mod"),
                 "--thresholds", "0", "1", "--images", "40", "--tokens", "256", "--repeats", "1",
                 "--out", str(out)]) == 0
    result = json.loads((out / "adaptive.json").read_text())
    first, full = result["vision"]
    assert (first["threshold"], first["blocks"]) == (0.0, 1.0) and full["blocks"] == full["depth"] == 4
    assert first["images"] == 40
    (lm,) = result["lm"]
    assert lm["capacity"] == 0.25 and 0 <= lm["routed_share"] <= 1
    assert lm["blocks"] == lm["depth"] - 2 + 2 * lm["routed_share"]  # blocks 1 and 3 of 4 are routed
    assert (out / "adaptive.md").is_file() and (out / "adaptive.png").is_file()


def test_bench_adaptive_needs_a_run():
    assert main(["bench", "adaptive"]) == 2
